"""The task function: train with snapshots, replay backward, score, evaluate, report, as a short sequence of stages.

``run(cfg)`` checks every setting first (``config.check_settings``), builds each object from the config once, and
passes the objects on: the data (``PoolDataModule``), the training (``training.Training``), the objective J, the
replay's settings. Everything a run reports is written under ``cfg.paths.output_dir`` (the Hydra run directory):
``ground_truth.npz``, ``scores.csv``, ``suspects.csv``/``.png``, ``metrics.json``, and the links ``snapshots/`` and
``replay/`` to the train and replay cache entries it used (``cfg.paths.cache_dir``), so that runs that differ only in
their scoring train and replay once.

Several processes (``trainer.strategy=ddp``): Lightning starts the other ranks by re-running the command line, so
every rank runs this function. Global rank zero alone decides cache hits, takes the locks, writes files and reports;
the other ranks follow its decisions (``_agree``) into the same training and replay fits and return after the
replay. With ``ddp_spawn`` only the fits run in other processes, and they hand their results back through the files
the replay writes.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from callbacks.process_group import ReleaseSpawnedProcessGroup
from callbacks.progress import log_above_bars, progress_callbacks
from pmp_lightning.scores.cleanlab_score import cleanlab_baseline, cross_validated_probs, crossval_key_config
from pmp_lightning.cache import StageCache, code_digest, train_key_config
from pmp_lightning.config import check_folds, check_settings
from pmp_lightning.replay.costate import describe, hessian_vector_product
from pmp_lightning.data.images import IndexedDataset, datamodule_from_config, language_model
from pmp_lightning.errors import DataConfigError, OutputError, ReplayConfigError, SnapshotError, UnsupportedModelError
from pmp_lightning.report.evaluate import (CANARY_CONFIDENCE, auroc_by_kind, canary_choice, contribution_auroc,
                                           detection_metrics, small_sample_caveat)
from pmp_lightning.io import save_npz
from pmp_lightning.memory import PeakMemory
from pmp_lightning.report.outputs import write_outputs
from pmp_lightning.replay.store import ReplayStats, growth_steps, replay_key_config
from pmp_lightning.scores.registry import AUTO_FAMILY, SCORER_TARGET, compute_scores
from pmp_lightning.scores.scorer import data_scorer, document_features
from pmp_lightning.scores.select import selection
from pmp_lightning.statistics.per_example import per_example_stats
from pmp_lightning.statistics.plan import make_plan
from pmp_lightning.scores.text import dsir, influence, rho_loss
from pmp_lightning.training import Training, predict_proba, trainable
from pmp_lightning.trajectory import load_manifest, network_state
from pmp_lightning.report.wandb_logging import keep_staging_in, log_results, run_identity

log = logging.getLogger(__name__)

# Lightning's start-up notes and tips, and warnings that say nothing about this project's runs
logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
for message in (".*does not have many workers.*", ".*returned `None`, this fit will run with no optimizer.*",
                ".*isinstance\\(treespec, LeafSpec\\).*", ".*torch.jit.script.*is deprecated.*"):
    warnings.filterwarnings("ignore", message=message)


AFTER_INTERRUPT = {
    "train": "the same command resumes training from its last finished epoch",
    "replay": "the same command resumes the replay after its last finished snapshot",
}

# layers whose training-mode forward differs from their eval-mode one
TRAIN_MODE_DIFFERS = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.dropout._DropoutNd,
                      torch.nn.modules.instancenorm._InstanceNorm)


@dataclass
class Stages:
    """Where a run writes and what it measures of itself: the output and cache directories, whether this process is
    global rank zero, and each stage's wall time and peak memory."""

    out: Path
    cache_dir: Path
    lead: bool
    timings: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        """Record the stage's wall time and the process's peak memory during it; say so when it is interrupted."""
        start = time.perf_counter()
        try:
            with PeakMemory("cuda" if torch.cuda.is_available() else "cpu") as peak:
                yield
        except (KeyboardInterrupt, SystemExit) as err:  # Lightning turns Ctrl-C into a graceful shutdown and exit(1)
            if isinstance(err, KeyboardInterrupt) or err.code not in (0, None):
                log.error(f"interrupted during {name} after {time.perf_counter() - start:.0f} s; no results were written; "
                          f"{AFTER_INTERRUPT.get(name, 'run the same command again')}")
            raise
        self.timings[name] = round(time.perf_counter() - start, 3)
        if peak.peak_mib is not None:
            self.memory[name] = round(peak.peak_mib, 1)


def run(cfg: DictConfig) -> dict:
    """Run one experiment; returns the contents of ``metrics.json`` (an empty dict on ranks other than zero)."""
    _check_strategy(cfg)
    names, rank_by = check_settings(cfg)
    stages = Stages(Path(cfg.paths.output_dir), Path(cfg.paths.cache_dir), rank_zero_only.rank == 0)
    _require_writable(stages.out, "paths.output_dir (hydra.run.dir on the command line)")
    _require_writable(stages.cache_dir, "paths.cache_dir")
    if stages.lead:
        log.info(f"cache: {stages.cache_dir.resolve()} (paths.cache_dir); outputs: {stages.out.resolve()}")
    objective = instantiate(cfg.objective)  # a bad objective setting fails here, before any work
    training = Training.from_config(cfg)
    replay_settings = instantiate(cfg.replay, _partial_=True)
    snapshots = instantiate(cfg.snapshot, _partial_=True)
    pl.seed_everything(cfg.seed, workers=True)  # whatever the data's own loading draws is seeded too
    if cfg.get("logger") and stages.lead:
        keep_staging_in(stages.out)
    logger = instantiate(cfg.logger, **run_identity()) if cfg.get("logger") and stages.lead else False
    try:
        datamodule, training, model_code = data_stage(stages, cfg, training)
        if logger:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

        content = datamodule.content_key()
        trained, train_dir = train_stage(stages, StageCache(stages.cache_dir, "train", train_key_config(cfg, content, model_code)), training,
                                         snapshots, datamodule, logger)
        replayed, replay_dir = replay_stage(stages, StageCache(stages.cache_dir, "replay", replay_key_config(cfg, trained, datamodule.downstream_key())),
                                            replay_settings, training, objective, datamodule, train_dir / "snapshots")
        if not stages.lead:
            return {}
        _link(stages.out / "snapshots", train_dir / "snapshots")
        _link(stages.out / "replay", replay_dir)
        stats = ReplayStats.load(replay_dir / "stats.npz")
        final_probs = final_probabilities(training.net, train_dir / "snapshots", datamodule, trained["test_accuracy"])
        scores, canaries = score_stage(stats, [n for n in names if n != "cleanlab"], datamodule)
        if language_model(datamodule):
            scores.update(corpus_baselines_stage(stages, training, objective, datamodule, train_dir / "snapshots"))
        stats = stats.first(len(datamodule.pool))
        cost = {"train": trained.get("seconds"), "replay": replayed.get("seconds"),
                **({"corpus_baselines": stages.timings["corpus_baselines"]} if "corpus_baselines" in stages.timings else {})}
        cleanlab = None
        if cfg.baselines.cleanlab:
            crossval = StageCache(stages.cache_dir, "crossval", crossval_key_config(cfg, content, model_code))
            scores["cleanlab"], cleanlab = cleanlab_stage(stages, crossval, training, datamodule, cfg.baselines.folds, final_probs)
            cost["cleanlab"] = cleanlab["seconds"]
        detection = detect_stage(stages, scores, stats, datamodule)
        chosen = selection_stage(stages, cfg, training, datamodule, scores, trained["test_accuracy"])
        scorer = scorer_stage(stages, cfg, training, datamodule, train_dir / "snapshots", scores)
        metrics = assemble_metrics(stages, detection, trained, stats, objective, cfg.replay, cost, train_dir, replay_dir,
                                   datamodule, {"cleanlab": cleanlab, "selection": chosen, "canaries": canaries,
                                                "scorer": scorer}, rank_by)
        write_outputs(stages.out, datamodule, scores, metrics, None if final_probs is None else final_probs.argmax(1))
        if logger:
            log_results(logger.experiment, metrics, scores, datamodule)
        return metrics
    finally:
        if logger:
            import wandb

            wandb.finish()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # ddp ranks: a gloo group left alive aborts the process at exit


# ----------------------------------------------------------------------------- stages
def data_stage(stages: Stages, cfg: DictConfig, training: Training) -> tuple:
    """The data, checked with the model before any training (``check_model``), the ground truth written: the
    datamodule, the training with the model's shape settings taken from the data (``Training.for_data``) and the
    digest of the model's code (the train cache key's)."""
    with stages.stage("data"):
        datamodule = datamodule_from_config(cfg)
        datamodule.setup()
    training = training.for_data(datamodule.pool.x, datamodule.num_classes, getattr(datamodule, "vocab_size", None))
    target = cfg.model.get("_target_")
    probe = check_model(training.net, datamodule, target or "the model", cfg.replay.curvature,
                        str(cfg.trainer.get("precision", "32-true")))
    if getattr(datamodule, "wide", None) is not None:
        document_features(probe, IndexedDataset(datamodule.wide.x[:2], datamodule.wide.y[:2]))  # named before training
    model_code = code_digest(probe, target)
    if cfg.baselines.cleanlab and language_model(datamodule):
        raise DataConfigError("baselines.cleanlab scores labels from class probabilities; a corpus has no labels: set "
                              "baselines.cleanlab=false")
    if cfg.baselines.cleanlab and datamodule.pool_mode == "train":
        check_folds(cfg.baselines.folds, len(datamodule.pool))
    record_ground_truth(stages, datamodule)
    return datamodule, training, model_code


def check_model(make_net: Callable[[], torch.nn.Module], datamodule, target: str, curvature: str,
                precision: str = "32-true") -> torch.nn.Module:
    """A model that cannot take the data's inputs, has fewer outputs than the data has classes, or whose per-example
    statistics or Hessian-vector products cannot be computed fails here, in a second or so, in one line naming the
    fix: not inside torch halfway through training, and never after it. The statistics pass's plan (which layers by
    rule, which by the fallback) is proven here on a few pool examples and logged. Returns the probe network (for the
    cache's code key)."""
    _check_same_inputs(datamodule)
    with torch.random.fork_rng(devices=[]):  # the trained model's initialisation must not depend on this probe
        net = make_net().eval()
    x, y = _probe_inputs(net, datamodule.pool.x[:8], target, precision), datamodule.pool.y[:8]
    _check_outputs(net, x, datamodule, target)
    with torch.random.fork_rng(devices=[]):
        plan = make_plan(net, x, y)
        _check_replay_maths(net, plan, x, y, curvature, target)
    if rank_zero_only.rank == 0:
        log.info(f"statistics pass for {type(net).__name__}: {plan.summary()}")
        _say_what_eval_mode_changes(net)
    return net


def _probe_inputs(net: torch.nn.Module, x: torch.Tensor, target: str, precision: str) -> torch.Tensor:
    """A few pool inputs in the precision training will give the model: a float64 model trains on float64 inputs
    under trainer.precision=64-true (Lightning converts both), and is refused, with that fix, otherwise."""
    dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), None)
    if not x.is_floating_point() or dtype is None or dtype == x.dtype:
        return x
    if dtype == torch.float64 and precision.startswith("64"):
        return x.double()
    raise DataConfigError(f"model ({target}) holds {str(dtype).replace('torch.', '')} parameters but the data is "
                          f"{str(x.dtype).replace('torch.', '')}: train in float64 with trainer.precision=64-true "
                          f"(Lightning then converts the data), or build the model in float32 (no .double())")


def _check_same_inputs(datamodule) -> None:
    """The downstream and test sets hold inputs like the pool's: a trusted set of another image size or channel count
    is named here, not in the replay after training."""
    pool = datamodule.pool.x
    for what, ds, setting in (("downstream set", datamodule.downstream, "data.downstream"),
                              ("test set", datamodule.test_set, "data.source")):
        if tuple(ds.x.shape[1:]) != tuple(pool.shape[1:]) or ds.x.is_floating_point() != pool.is_floating_point():
            raise DataConfigError(f"the {what} ({setting}) holds inputs of shape {tuple(ds.x.shape[1:])} ({ds.x.dtype}) but "
                                  f"the pool {tuple(pool.shape[1:])} ({pool.dtype}); give it inputs of the pool's size, "
                                  f"channels and kind (e.g. a transform that resizes or converts them)")


def _check_outputs(net: torch.nn.Module, x: torch.Tensor, datamodule, target: str) -> None:
    try:
        with torch.no_grad():
            logits = net(x)
    except Exception as err:  # shape errors come from deep inside torch, in many types
        raise DataConfigError(f"model ({target}) cannot take the data's inputs of shape {tuple(x.shape[1:])} ({x.dtype}): "
                              f"{str(err).splitlines()[0]}. {_input_advice(net, datamodule.pool.x)}") from err
    if not isinstance(logits, torch.Tensor):
        kind = type(logits).__name__
        raise DataConfigError(f"model ({target}) returns a {kind}, not a tensor of logits: its forward must return one "
                              f"tensor (batch × classes); return the logits alone (e.g. `return out[0]` or "
                              f"`return out['logits']`), or wrap the model in a module that does")
    if language_model(datamodule):
        if logits.shape[:2] != x.shape[:2] or logits.dim() != 3 or logits.shape[2] < datamodule.num_classes:
            raise DataConfigError(f"model ({target}) gives outputs of shape {tuple(logits.shape[1:])} per document of "
                                  f"{x.shape[1]} tokens; a language model gives next-token logits (tokens × vocabulary "
                                  f"of {datamodule.num_classes}): set model.vocab_size={datamodule.num_classes}")
        return
    if logits.dim() != 2 or logits.shape[1] < datamodule.num_classes:
        raise DataConfigError(f"model ({target}) gives outputs of shape {tuple(logits.shape[1:])} per example, but the labels "
                              f"have {datamodule.num_classes} classes; set model.num_classes={datamodule.num_classes}")
    if logits.shape[1] > datamodule.num_classes:
        log.warning(f"model ({target}) has {logits.shape[1]} outputs but the data {datamodule.num_classes} classes: the "
                    f"extra outputs are trained towards probability 0; set model.num_classes={datamodule.num_classes} "
                    f"unless the data lacks classes on purpose")


def _check_replay_maths(net: torch.nn.Module, plan, x: torch.Tensor, y: torch.Tensor, curvature: str, target: str) -> None:
    """What the plan's float64 proof does not try: the statistics pass in the network's own precision must give finite
    values, and the curvature modes need Hessian-vector products (forward-mode derivatives, which some layers, e.g.
    torch's fused LSTM on the CPU, do not have)."""
    params = {k: p.detach() for k, p in trainable(net).items()}
    direction = {k: torch.ones_like(p) for k, p in params.items()}
    if curvature != "none":
        try:
            hessian_vector_product(net, params, direction, lambda: [(x[:2], y[:2])])
        except Exception as err:  # a missing forward-mode derivative surfaces as one of several types deep inside torch
            raise ReplayConfigError(f"model ({target}): replay.curvature={curvature} needs Hessian-vector products "
                                    f"(forward-mode derivatives), which fail for it: {str(err).splitlines()[0]}. Use "
                                    f"replay.curvature=none (the Hessian term left out), or a layer with forward-mode "
                                    f"derivatives") from err
    stats = per_example_stats(net, x, y, direction, plan=plan, by_layer=True)
    bad = [part.label for k, part in enumerate(plan.parts)
           if not (torch.isfinite(stats["layer_dot"][:, k]).all() and torch.isfinite(stats["layer_sq"][:, k]).all())]
    if bad:
        dtype = str(next(iter(params.values())).dtype).replace("torch.", "")
        raise UnsupportedModelError(f"model ({target}): the per-example statistics of {', '.join(bad)} are not finite in "
                                    f"{dtype} for some examples (they are in float64, where the plan was proven); train "
                                    f"in float64 (trainer.precision=64-true) or replace that layer")


def _say_what_eval_mode_changes(net: torch.nn.Module) -> None:
    differs = [m for m in net.modules() if isinstance(m, TRAIN_MODE_DIFFERS)]
    if differs:
        how = [text for kind, text in ((torch.nn.modules.batchnorm._BatchNorm, "BatchNorm on its running statistics"),
                                       (torch.nn.modules.instancenorm._InstanceNorm,
                                        "InstanceNorm on its running statistics where it keeps them"),
                                       (torch.nn.modules.dropout._DropoutNd, "dropout off"))
               if any(isinstance(m, kind) for m in differs)]
        log.info(f"the replay differentiates the network in eval mode, where "
                 f"{', '.join(sorted({type(m).__name__ for m in differs}))} act otherwise than in training "
                 f"({', '.join(how)}): the exact identity of the scores holds for that eval-mode network")


def record_ground_truth(stages: Stages, datamodule) -> None:
    """``ground_truth.npz``, written before training starts."""
    if not stages.lead:
        return
    mask = datamodule.is_mislabeled
    save_npz(stages.out / "ground_truth.npz", **datamodule.ground_truth())
    wrong = "corrupted" if language_model(datamodule) else "mislabeled"
    log.info(f"pool: {len(mask)} examples, {int(mask.sum())} {wrong}; training set: {len(datamodule.train_set)}")


def train_stage(stages: Stages, cache: StageCache, training: Training, snapshots, datamodule, logger) -> tuple[dict, Path]:
    """The trajectory, from the cache or trained with the snapshot callback: ``{"test_accuracy", "seconds",
    "entry_id"}`` and the cache entry holding ``snapshots/``."""
    def train(directory: Path) -> dict:
        with stages.stage("train"):
            _, accuracy = training.fit(datamodule, datamodule, logger=logger, root_dir=directory,
                                       callbacks=[snapshots(dirpath=directory / "snapshots"), ReleaseSpawnedProcessGroup()],
                                       checkpoints=directory / "checkpoints")
        return {"test_accuracy": accuracy, "seconds": stages.timings["train"]}

    return cache.load_or_compute(train, _missing_snapshots, resume=True, lead=stages.lead, agree=_agree), cache.dir


def replay_stage(stages: Stages, cache: StageCache, replay_settings, training: Training, objective, datamodule,
                 snapshot_dir: Path) -> tuple[dict, Path]:
    """The replay's statistics (``stats.npz``), from the cache or computed backward over the snapshots, continuing a
    replay that was cut short."""
    def replay(directory: Path) -> dict:
        with stages.stage("replay"):
            module = replay_settings(net=training.net(), objective=objective, snapshot_dir=snapshot_dir,
                                     pool=datamodule.scored, downstream=datamodule.downstream,
                                     train_set=datamodule.train_set, progress_dir=directory)
            _fit_replay(module, training, directory)
        return {"seconds": round(stages.timings["replay"] + module.resumed_seconds, 3)}  # the interrupted part too

    return cache.load_or_compute(replay, _missing_stats, resume=True, lead=stages.lead, agree=_agree), cache.dir


def _fit_replay(replay, training: Training, directory: Path) -> None:
    """Run the replay's own Trainer over the snapshots still to do (global rank zero writes stats.npz at the end)."""
    total = replay.T + 1
    if replay.remaining < total:
        log.info(f"replay: resuming in {directory}, {total - replay.remaining} of {total} snapshots already done "
                 f"({replay.resumed_seconds:.0f} s of replay before the interruption)")
    if not replay.remaining:  # every snapshot was done before an interruption; only stats.npz is missing
        if rank_zero_only.rank == 0:
            replay.save_stats()
        return
    callbacks = [ReleaseSpawnedProcessGroup(), *progress_callbacks(training.progress, replay=True)]
    trainer = training.trainer(max_epochs=replay.remaining, callbacks=callbacks, logger=False, default_root_dir=directory,
                               enable_checkpointing=False)
    log.info(f"replay: {replay.remaining} snapshots, {len(replay.pool)} pool examples, {trainer.world_size} process(es)")
    with log_above_bars(training.progress):
        trainer.fit(replay)


def final_probabilities(make_net: Callable[[], torch.nn.Module], snapshot_dir: Path, datamodule,
                        test_accuracy: float | None) -> np.ndarray | None:
    """The trained model's (θ_T's) class probabilities for every pool example (None for a language model). On the
    way, how often θ_T agrees with the downstream set's labels goes into ``datamodule.downstream_note``
    (``model_agreement``), with a warning when it is far below the test accuracy: J's labels then disagree with what
    the model learned (wrong labels, another labelling convention, another data set)."""
    if language_model(datamodule):
        return None
    net = final_network(make_net, snapshot_dir)
    agreement = float((predict_proba(net, datamodule.downstream.x).argmax(1) == datamodule.downstream.y.numpy()).mean())
    note = datamodule.downstream_note
    note["model_agreement"] = round(agreement, 4)
    if test_accuracy is not None:
        slack = max(0.05, 3 * math.sqrt(test_accuracy * (1 - test_accuracy) / len(datamodule.downstream)))
        if agreement < test_accuracy - slack:
            note["label_warning"] = (f"the trained model agrees with {agreement:.1%} of the downstream set's labels but "
                                     f"reaches {test_accuracy:.1%} on the test set: many of J's labels may be wrong, or "
                                     f"come from another labelling; check data.downstream")
            log.warning(note["label_warning"])
    return predict_proba(net, datamodule.pool.x)


def final_network(make_net: Callable[[], torch.nn.Module], snapshot_dir: Path) -> torch.nn.Module:
    """The trained model θ_T, the trajectory's last snapshot."""
    net = make_net()
    net.load_state_dict(network_state(snapshot_dir, load_manifest(snapshot_dir)["snapshots"][-1]))
    return net


def corpus_baselines_stage(stages: Stages, training: Training, objective, datamodule, snapshot_dir: Path) -> dict:
    """A corpus's language-model baselines (``text_scores``): DSIR, RHO-LOSS (one small training more, on the target
    set) and the IF-score at θ_T."""
    with stages.stage("corpus_baselines"):
        net = final_network(training.net, snapshot_dir)
        return {"dsir": dsir(datamodule.pool_documents, datamodule.target_documents),
                "rho_loss": rho_loss(net, training, datamodule), "influence": influence(net, objective, datamodule)}


def score_stage(stats: ReplayStats, names: list[str], datamodule) -> tuple[dict[str, np.ndarray], dict | None]:
    """The pool's scores; with canaries (``scoring.canaries``), also the PMP variant that ranks them lowest, as the
    score ``auto`` (and what every variant reached on them, for metrics.json)."""
    scores = compute_scores(names, stats)
    if datamodule.canary_mask is None:
        return scores, None
    n = len(datamodule.pool)
    # the family in its order, the cosine first, so that it wins a tie (small sets of easy canaries often tie at AP 1)
    candidates = {name: scores[name][n:] for name in AUTO_FAMILY if name in scores}  # check_settings: there is one
    choice = canary_choice(candidates, datamodule.canary_mask)
    scores = {name: s[:n] for name, s in scores.items()}
    scores["auto"] = scores[choice["chosen"]]
    first = next(iter(candidates))
    log.info(f"canaries: {choice['chosen']} is the score auto (AP on the {choice['canaries']} canaries among as many "
             f"controls: " + ", ".join(f"{name} {ap:.3f}" for name, ap in choice["ap"].items())
             + f"; another than {first} only where it does better in ≥ {CANARY_CONFIDENCE:.0%} of resamples)")
    return scores, choice


def cleanlab_stage(stages: Stages, cache: StageCache, training: Training, datamodule, folds: int,
                   final_probs: np.ndarray) -> tuple[np.ndarray, dict]:
    """cleanlab's score from out-of-sample probabilities: K-fold cross-validation (cached) for pool=train,
    the final model's for a held-out pool. Returns the score and what goes under ``cleanlab`` in metrics.json."""
    if datamodule.pool_mode == "train":
        def cross_validate(directory: Path) -> dict:
            with stages.stage("cleanlab"):
                save_npz(directory / "pred_probs.npz", probs=cross_validated_probs(training, datamodule, folds, directory))
            return {"seconds": stages.timings["cleanlab"]}

        done = cache.load_or_compute(cross_validate, _missing_probs, resume=True)
        with np.load(cache.dir / "pred_probs.npz") as z:
            probs = z["probs"]
        source, seconds = f"{folds}-fold cross-validation", done["seconds"]
    else:
        probs, source, seconds = final_probs, "the trained model (the pool is held out)", 0.0
    score, summary = cleanlab_baseline(datamodule.observed_labels.numpy(), probs, datamodule.is_mislabeled)
    return score, {"probabilities": source, "seconds": seconds, **summary}


def selection_stage(stages: Stages, cfg: DictConfig, training: Training, datamodule, scores: dict[str, np.ndarray],
                    full_accuracy: float | None) -> dict | None:
    """With ``select.fractions``: the test accuracy of retraining without each score's lowest-scored examples."""
    if not cfg.select.fractions:
        return None
    with stages.stage("select"):
        return selection(training, datamodule, scores, cfg.select.fractions, cfg.select.scores, full_accuracy, cfg.seed,
                         cfg.trainer.max_epochs)


def scorer_stage(stages: Stages, cfg: DictConfig, training: Training, datamodule, snapshot_dir: Path,
                 scores: dict[str, np.ndarray]) -> dict | None:
    """With a corpus's wide slice (``data.wide_size``): the data scorer learns the pool's γ and scores the slice
    (``scores/scorer.py``); with ``select.fractions``, fresh models trained on the slice without each score's lowest
    documents, the slice's own token budget."""
    if getattr(datamodule, "wide", None) is None:
        return None
    with stages.stage("scorer"):
        gamma = scores[SCORER_TARGET]
        report, oof, wide = data_scorer(final_network(training.net, snapshot_dir), datamodule, gamma, cfg.seed)
        if datamodule.is_mislabeled.any():
            report["pool"].update(ap_exact=detection_metrics(gamma, datamodule.is_mislabeled)["ap"],
                                  ap_out_of_fold=detection_metrics(oof, datamodule.is_mislabeled)["ap"])
        report["wide"]["detection"] = ({name: detection_metrics(s, datamodule.wide_mask) for name, s in wide.items()}
                                       if datamodule.wide_mask.any() else {})
        log.info(f"data scorer: Spearman ρ {report['pool']['spearman_out_of_fold']:.3f} with the pool's exact "
                 f"{SCORER_TARGET} out of fold; scores the {report['wide']['size']} documents of the wide slice")
        if cfg.select.fractions:
            report["selection"] = selection(training, datamodule, wide, cfg.select.fractions,
                                            [n for n in wide if n != "random"], None, cfg.seed, cfg.trainer.max_epochs,
                                            wide=True)
    return report


def detect_stage(stages: Stages, scores: dict[str, np.ndarray], stats: ReplayStats, datamodule) -> dict:
    """Detection metrics per score and the per-snapshot AUROC of c_t (empty without a ground truth), with the
    small-sample caveat when the pool has few mislabeled or clean examples; for a corpus, each score's AUROC per
    corruption kind."""
    mask = datamodule.is_mislabeled
    with stages.stage("score"):
        if not mask.any():
            log.warning("the pool has no known mislabeled examples (noise=none and no data.known_errors): detection "
                        "metrics are skipped; suspects.csv ranks the pool")
            return {"detection": {}, "per_snapshot": [], "caveat": None}
        caveat = small_sample_caveat(mask)
        if caveat:
            log.warning(caveat)
        return {"detection": {name: detection_metrics(s, mask) for name, s in scores.items()},
                "per_snapshot": contribution_auroc(stats.contribution, mask), "caveat": caveat,
                "by_kind": auroc_by_kind(scores, datamodule.corruption_kind) if language_model(datamodule) else None}


def assemble_metrics(stages: Stages, detected: dict, trained: dict, stats: ReplayStats, objective, replay_cfg, cost: dict,
                     train_dir: Path, replay_dir: Path, datamodule, extras: dict, rank_by: str) -> dict:
    """The contents of ``metrics.json``."""
    metrics = {
        "detection": detected["detection"],
        "test_accuracy": trained["test_accuracy"],
        "ground_truth": "corrupted documents" if language_model(datamodule) else "mislabeled examples",
        "costate": {"mode": replay_cfg.curvature, "horizon": replay_cfg.horizon, "objective": describe(objective),
                    "lambda_norms": stats.lambda_norm.tolist(), "participation": stats.participation.tolist(),
                    "contribution_auroc": detected["per_snapshot"],
                    "growth_warnings": growth_steps(stats.lambda_norm, replay_cfg.growth_warning)},
        "timings": stages.timings,
        "cost_s": cost,
        "peak_memory_mib": stages.memory,
        "cache": {"train": str(train_dir), "replay": str(replay_dir),
                  "computed": [stage for stage in ("train", "replay") if stage in stages.timings]},
    }
    if detected["caveat"]:
        metrics["detection_caveat"] = detected["caveat"]
    if detected.get("by_kind"):
        metrics["auroc_by_corruption"] = detected["by_kind"]
    metrics["downstream"] = datamodule.downstream_note
    if datamodule.known_error_counts is not None:
        metrics["known_errors"] = {"file": str(datamodule.known_errors), **datamodule.known_error_counts}
    metrics.update({name: value for name, value in extras.items() if value is not None})  # cleanlab, selection, canaries
    metrics["suspects"] = {"rank_by": rank_by, "file": "suspects.csv"}
    return metrics


# ----------------------------------------------------------------------------- checks and plumbing
def _input_advice(net: torch.nn.Module, x: torch.Tensor) -> str:
    """What to change when ``net`` cannot take inputs like ``x``, read from its first layer with parameters."""
    first = next(((name, m) for name, m in net.named_modules() if list(m.parameters(recurse=False))), (None, None))
    name, layer = first
    if not x.is_floating_point() and not isinstance(layer, torch.nn.Embedding):
        return (f"The inputs are integers (values {int(x.min())} to {int(x.max())}): if they are 8-bit images, set "
                f"data.source.scale=255 to make them floats in [0, 1]; integer inputs are token ids, for a model whose "
                f"first layer is an nn.Embedding")
    if isinstance(layer, torch.nn.modules.conv._ConvNd):
        spatial = len(layer.kernel_size)
        if x.dim() - 1 == spatial:
            return (f"Its first layer {name!r} is a {type(layer).__name__}, which takes (channels, {', '.join('HWD'[:spatial])}) "
                    f"per example, but each input is {tuple(x.shape[1:])}: add a channel axis (x[:, None] before saving, "
                    f"or x.unsqueeze(1))")
        return f"Its first layer {name!r} is a {type(layer).__name__} with in_channels={layer.in_channels}; build it for the data"
    return (f"Build the model for that input size (e.g. model.in_features={int(np.prod(x.shape[1:]))} for an MLP) "
            f"or pick another model=...")


def _missing_probs(entry: Path) -> list[str]:
    return [] if (entry / "pred_probs.npz").is_file() else ["pred_probs.npz"]


def _missing_snapshots(entry: Path) -> list[str]:
    """Files of a train cache entry's trajectory that are gone (a usable manifest, or snapshots it lists)."""
    try:
        manifest = load_manifest(entry / "snapshots")
    except SnapshotError as err:
        return [f"a usable snapshots manifest ({err})"]
    return [f"snapshots/{name}" for s in manifest["snapshots"] for name in (s["file"], s.get("preconditioner"))
            if name and not (entry / "snapshots" / name).is_file()]


def _missing_stats(entry: Path) -> list[str]:
    return [] if (entry / "stats.npz").is_file() else ["stats.npz"]


def _agree(name: str, value):
    """Global rank zero's ``value`` on every rank of a ``ddp`` run; ``value`` itself in a single process.

    Before the ranks are connected, rank zero leaves its value in the environment, which Lightning
    copies into the processes it starts at the first fit; afterwards it broadcasts it.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    key = f"PMP_AGREED_{name.upper()}"
    if rank_zero_only.rank == 0:
        os.environ[key] = json.dumps(value)
        return value
    if key not in os.environ:
        raise ReplayConfigError(
            "this rank was not started by Lightning's launcher (torchrun or srun tasks start every rank at once); "
            "start one process per node and let trainer.strategy=ddp start the others"
        )
    return json.loads(os.environ[key])


def _require_writable(directory: Path, setting: str) -> None:
    """Fail before any work when ``directory`` cannot take files (read-only, not a directory, no permission)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise OutputError(f"cannot write to {directory} ({err.strerror or err}); point {setting} at a writable directory") from err


def _check_strategy(cfg: DictConfig) -> None:
    """``ddp`` re-runs the command line in each process, which cannot reproduce one job of a Hydra multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    strategy = str(cfg.trainer.get("strategy", "auto"))
    relaunches = strategy.startswith("ddp") and not any(k in strategy for k in ("spawn", "fork", "notebook"))
    if relaunches and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ReplayConfigError(
            f"trainer.strategy={strategy} starts its other processes by re-running the command line, which does not "
            f"work inside a Hydra multirun; use trainer.strategy=ddp_spawn for sweeps"
        )


def _link(link: Path, target: Path) -> None:
    """Point ``link`` in the run directory at the cache entry it used."""
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target.resolve(), target_is_directory=True)
