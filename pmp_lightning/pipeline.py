"""The task function: train with snapshots, replay backward, score, evaluate, report, as a short sequence of stages.

``run(cfg)`` checks every setting first (``config.check_settings``), lets the policy make the ``auto`` settings
concrete (``policy.resolve``), builds each object from the config once, and passes the objects on: the task's data
(``data/base.py``'s ``TaskDataModule``, which says its kind), the training (``training.Training``), the objective J,
the replay's settings, the cache keys. It reads as the list of stages: data (the model checked against it before any
training, ``models/check.py``, and the replay's maths on it, ``replay/probe.py``), train, replay, scores (the score
``auto`` chosen by ``policy.choose``), the extra baselines and selection (whose stage functions live beside what
they compute, in ``scores/``), detection, metrics and outputs (``report/outputs.py``). Every cached stage
goes through ``StageCache.load_or_compute``. Everything a run reports is written under ``cfg.paths.output_dir`` (the Hydra run directory):
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

import functools
import json
import logging
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from pmp_lightning.scores.cleanlab_score import cleanlab_stage
from pmp_lightning.cache import Stages, StageCache, code_digest, train_key_config
from pmp_lightning import policy
from pmp_lightning.config import check_folds, check_settings, run_scores
from pmp_lightning.data.base import IndexedDataset, datamodule_from_config
from pmp_lightning.errors import DataConfigError, OutputError, ReplayConfigError, SnapshotError
from pmp_lightning.report.evaluate import auroc_by_kind, contribution_auroc, detection_metrics, small_sample_caveat
from pmp_lightning.io import save_npz
from pmp_lightning.report.outputs import assemble_metrics, write_outputs, write_wide_scores
from pmp_lightning.replay.store import ReplayStats, concentration, replay_key_config
from pmp_lightning.replay.costate import describe
from pmp_lightning.replay.dynamics import modelled_dynamics
from pmp_lightning.replay.costate import objective as make_objective
from pmp_lightning.scores.registry import (CLASS_VARIANTS, FITTED_VARIANTS, SCORER_TARGET, block_fit, class_scores,
                                          compute_scores)
from pmp_lightning.scores.scorer import data_scorer, document_features
from pmp_lightning.scores.select import selection, selection_stage
from pmp_lightning.scores.text import corpus_baselines_stage
from pmp_lightning.training import Training, predict_proba
from pmp_lightning.models.check import check_model
from pmp_lightning.replay.probe import check_replay_maths
from pmp_lightning.trajectory import final_network, load_manifest
from pmp_lightning.report.wandb_logging import keep_staging_in, log_results, run_identity
from pmp_lightning.task import LANGUAGE_MODEL

log = logging.getLogger(__name__)

# Lightning's start-up notes and tips, and warnings that say nothing about this project's runs
logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
for message in (".*does not have many workers.*", ".*returned `None`, this fit will run with no optimizer.*",
                ".*isinstance\\(treespec, LeafSpec\\).*", ".*torch.jit.script.*is deprecated.*"):
    warnings.filterwarnings("ignore", message=message)


def run(cfg: DictConfig) -> dict:
    """Run one experiment; returns the contents of ``metrics.json`` (an empty dict on ranks other than zero)."""
    _check_strategy(cfg)
    check_settings(cfg)  # every setting, before the policy sets the data up (noise=confusion trains its reference)
    cfg = policy.resolve(cfg)  # scoring.canaries and scoring.by_class=auto, by the network's build
    names, rank_by = run_scores(cfg)
    stages = Stages(Path(cfg.paths.output_dir), Path(cfg.paths.cache_dir), rank_zero_only.rank == 0)
    _require_writable(stages.out, "paths.output_dir (hydra.run.dir on the command line)")
    _require_writable(stages.cache_dir, "paths.cache_dir")
    if stages.lead:
        log.info(f"cache: {stages.cache_dir.resolve()} (paths.cache_dir); outputs: {stages.out.resolve()}")
    objective = instantiate(cfg.objective)  # a bad objective setting fails here, before any work
    replay_key = replay_key_config(cfg)
    training = Training.from_config(cfg)
    train_key = train_key_config(cfg)
    replay_settings = instantiate(cfg.replay, _partial_=True)
    snapshots = instantiate(cfg.snapshot, _partial_=True)
    fractions, folds = list(cfg.select.fractions), cfg.baselines.folds if cfg.baselines.cleanlab else None
    pl.seed_everything(cfg.seed, workers=True)  # whatever the data's own loading draws is seeded too
    if cfg.get("logger") and stages.lead:
        keep_staging_in(stages.out)
    logger = instantiate(cfg.logger, **run_identity()) if cfg.get("logger") and stages.lead else False
    try:
        datamodule, training, model_code = data_stage(stages, cfg, training)
        if logger:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        train_key.update(data_content=datamodule.content_key(), model_code=model_code)
        trained, train_dir = train_stage(stages, StageCache(stages.cache_dir, "train", train_key), training, snapshots,
                                         datamodule, logger)
        final = final_network(training.net, train_dir / "snapshots")  # θ_T
        dynamics = modelled_dynamics(load_manifest(train_dir / "snapshots"), cfg.replay.curvature)[1]
        if stages.lead:
            log.info(f"replay: models {dynamics}")
        replay_cache = StageCache(stages.cache_dir, "replay", replay_key, train_entry=trained["entry_id"],
                                  downstream_content=datamodule.downstream_key())
        crossval = StageCache(stages.cache_dir, "crossval", train_key, folds=folds) if folds else None
        replayed, replay_dirs = replay_stage(stages, replay_cache, replay_settings, training, objective, datamodule,
                                             train_dir / "snapshots", cfg.scoring.by_class)
        if not stages.lead:
            return {}
        replay_dir = replay_dirs.pop(None)
        _link(stages.out / "snapshots", train_dir / "snapshots")
        _link(stages.out / "replay", replay_dir)
        stats = ReplayStats.load(replay_dir / "stats.npz")
        replayed = {**replayed, "dynamics": dynamics, "concentration": concentration(stats)}
        if replayed["concentration"]:
            log.warning(replayed["concentration"]["warning"])
        final_probs = final_probabilities(final, datamodule, trained["test_accuracy"])
        scores, canaries = score_stage(stats, [n for n in names if n != "cleanlab"], datamodule, replay_dirs)
        wide_baselines = {}  # a corpus's wide slice: the loss and RHO-LOSS there, from one pass of θ_T
        if datamodule.kind is LANGUAGE_MODEL:  # its documents' baselines: DSIR, the loss filter, RHO-LOSS
            corpus, wide_baselines = corpus_baselines_stage(stages, final, training, objective, datamodule)
            scores.update(corpus)
        cleanlab = None
        if crossval is not None:
            scores["cleanlab"], cleanlab = cleanlab_stage(stages, crossval, training, datamodule, folds, final_probs)
        stats = stats.first(len(datamodule.pool))
        detection = detect_stage(stages, scores, stats, datamodule)
        extras = {"cleanlab": cleanlab, "canaries": canaries,
                  "scoring": {"canaries": cfg.scoring.canaries, "by_class": cfg.scoring.by_class},  # as resolved
                  "selection": selection_stage(stages, fractions, list(cfg.select.scores), training, datamodule, scores,
                                               trained["test_accuracy"]),
                  "scorer": scorer_stage(stages, fractions, final, training, datamodule, scores, wide_baselines)}
        metrics = assemble_metrics(stages, detection, trained, replayed, stats, objective, replay_settings.keywords,
                                   train_dir, replay_dir, datamodule, extras, rank_by)
        write_outputs(stages.out, datamodule, scores, metrics, None if final_probs is None else final_probs.argmax(1))
        if logger:
            log_results(logger.experiment, metrics, scores, datamodule)
        return metrics
    finally:
        _finish(logger)


def _finish(logger) -> None:
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
    by_class = cfg.scoring.get("by_class", False)
    with stages.stage("data"):
        datamodule = datamodule_from_config(cfg)
        datamodule.setup()
    if cfg.baselines.cleanlab and not datamodule.kind.labelled:
        raise DataConfigError("baselines.cleanlab scores labels from class probabilities; a corpus has no labels: set "
                              "baselines.cleanlab=false")
    if cfg.baselines.cleanlab and datamodule.pool_mode == "train":
        check_folds(cfg.baselines.folds, len(datamodule.pool))
    missing = sorted(set(datamodule.scored.y.tolist()) - set(datamodule.downstream.y.tolist())) if by_class else []
    if missing:  # scoring.by_class: each scored example needs its own label's class's costate
        raise DataConfigError(f"scoring.by_class: the downstream set (data.downstream) has no example of class(es) "
                              f"{missing}, which pool examples are labelled with, so those have no class costate; give a "
                              f"downstream set with every class, or leave scoring.by_class=false")
    training = training.for_data(datamodule.pool.x, datamodule.num_classes, datamodule.vocab_size)
    target = cfg.model.get("_target_")
    probe = check_model(training.net, datamodule, target or "the model", str(cfg.trainer.get("precision", "32-true")))
    check_replay_maths(probe, cfg.replay.curvature, target or "the model")
    if datamodule.wide is not None:
        document_features(probe.net, IndexedDataset(datamodule.wide.x[:2], datamodule.wide.y[:2]))  # named before training
    model_code = code_digest(probe.net, target)
    if stages.lead:  # the ground truth, written before training starts
        save_npz(stages.out / "ground_truth.npz", **datamodule.ground_truth())
        log.info(f"pool: {len(datamodule.pool)} {datamodule.kind.unit}s, {int(datamodule.is_mislabeled.sum())} "
                 f"{datamodule.kind.wrong}; training set: "
                 f"{len(datamodule.train_set)}")
    return datamodule, training, model_code


def train_stage(stages: Stages, cache: StageCache, training: Training, snapshots, datamodule, logger) -> tuple[dict, Path]:
    """The trajectory, from the cache or trained with the snapshot callback: ``{"test_accuracy", "seconds",
    "entry_id"}`` and the cache entry holding ``snapshots/``."""
    def train(directory: Path) -> dict:
        with stages.stage("train"):
            _, accuracy = training.fit(datamodule, datamodule, logger=logger, root_dir=directory,
                                       callbacks=[snapshots(dirpath=directory / "snapshots")],
                                       checkpoints=directory / "checkpoints")
        return {"test_accuracy": accuracy, "seconds": stages.timings["train"]}

    return cache.load_or_compute(train, _missing_snapshots, resume=True, lead=stages.lead, agree=_agree), cache.dir


def replay_stage(stages: Stages, cache: StageCache, replay_settings, training: Training, objective, datamodule,
                 snapshot_dir: Path, by_class: bool = False) -> tuple[dict, dict]:
    """The replay's statistics (``stats.npz``), from the cache or computed backward over the snapshots, continuing a
    replay that was cut short: the replay's result and its entry's directory (under ``None``). With ``by_class``
    (``scoring.by_class``), also the class costates of every class k of the scored examples' labels, J_k restricted to
    the downstream examples labelled k (the run's objective, not centred: J_k is one class's pull), each example scored
    along its own label's costate (``registry.CLASS_VARIANTS``): all of them in one replay
    (``replay.module.ClassReplayModule``: λ a stack of K costates, the Hessian-vector products batched over the
    classes), one cache entry holding one ``stats.npz`` per class, whose directories it returns under k."""
    def replay(directory: Path, name: str, module=None, **sets) -> dict:
        before = stages.timings.get(name, 0.0)
        with stages.stage(name):
            build = replay_settings if module is None else functools.partial(module, *replay_settings.args,
                                                                              **replay_settings.keywords)
            replayer = build(net=training.net(), snapshot_dir=snapshot_dir, train_set=datamodule.train_set,
                             progress_dir=directory, **sets)
            _fit_replay(replayer, training, directory)
        return {"seconds": round(stages.timings[name] - before + replayer.resumed_seconds, 3)}  # the interrupted part too

    whole = functools.partial(replay, name="replay", objective=objective, pool=datamodule.scored,
                              downstream=datamodule.downstream)
    done, dirs = cache.load_or_compute(whole, _missing_stats, resume=True, lead=stages.lead, agree=_agree), {None: cache.dir}
    if not by_class:
        return done, dirs
    from pmp_lightning.replay.module import ClassReplayModule
    from pmp_lightning.replay.store import class_stats_path

    classes = sorted(set(datamodule.scored.y.tolist()))
    own = make_objective(objective.name, **objective.params)
    entry = StageCache(stages.cache_dir, "replay", cache.config, by_class=classes, class_objective=describe(own),
                       class_replay="batched")
    if stages.lead:
        log.info(f"class replays: {len(classes)} class costates in one replay over the snapshots (J_k on the "
                 f"downstream examples labelled k, each pool example scored along its own label's costate); the whole "
                 f"replay took {done['seconds']:.0f} s")
    spent = entry.load_or_compute(
        functools.partial(replay, name="class_replay", module=ClassReplayModule, objective=own, classes=classes,
                          pool=datamodule.scored, downstream=datamodule.downstream),
        lambda d: [str(class_stats_path(d, k).relative_to(d)) for k in classes if not class_stats_path(d, k).is_file()],
        resume=True, lead=stages.lead, agree=_agree)["seconds"]
    dirs.update({k: class_stats_path(entry.dir, k).parent for k in classes})
    return {**done, "class_seconds": spent}, dirs


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
    trainer = training.trainer(max_epochs=replay.remaining, callbacks=training.fit_callbacks(), logger=False,
                               default_root_dir=directory, enable_checkpointing=False)
    log.info(f"replay: {replay.remaining} snapshots, {len(replay.pool)} pool examples, {trainer.world_size} process(es)")
    trainer.fit(replay)


def final_probabilities(net: torch.nn.Module, datamodule, test_accuracy: float | None) -> np.ndarray | None:
    """The trained model's (θ_T's) class probabilities for every pool example (None for a language model). On the
    way, how often θ_T agrees with the downstream set's labels goes into ``datamodule.downstream_note``
    (``model_agreement``), with a warning when it is far below the test accuracy: J's labels then disagree with what
    the model learned (wrong labels, another labelling convention, another data set)."""
    if not datamodule.kind.labelled:  # no class probabilities
        return None
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



def score_stage(stats: ReplayStats, names: list[str], datamodule,
                class_dirs: dict[int, Path]) -> tuple[dict[str, np.ndarray], dict | None]:
    """The pool's scores, the class variants from the replays of ``class_dirs`` among them (``scoring.by_class``);
    with canaries (``scoring.canaries``), also ``block_fit`` (the blocks weighted on them) and the score ``auto`` the
    policy chooses on them (``policy.choose``) and its record, for metrics.json."""
    scores = compute_scores([n for n in names if n not in CLASS_VARIANTS and n not in FITTED_VARIANTS], stats)
    if "block_fit" in names and datamodule.canary_mask is not None:  # config.run_scores: with canaries, ≥ 2 variants
        scores["block_fit"] = block_fit(stats, datamodule.canary_mask)
    if class_dirs:
        by_class = {k: ReplayStats.load(d / "stats.npz") for k, d in class_dirs.items()}
        scores.update(class_scores(by_class, datamodule.scored.y.numpy()))
    return policy.choose(scores, datamodule.canary_mask, len(datamodule.pool))



def scorer_stage(stages: Stages, fractions: list[float], net: torch.nn.Module, training: Training, datamodule,
                 scores: dict[str, np.ndarray], baselines: dict[str, np.ndarray]) -> dict | None:
    """With a corpus's wide slice (``data.wide_size``): the data scorer learns the pool's γ and scores the slice
    (``scores/scorer.py``) beside DSIR, the slice's ``baselines`` (the loss filter, RHO-LOSS) and random, each
    document's scores written to ``wide_scores.csv``; with ``select.fractions``, fresh
    models trained on the slice without each score's lowest documents, the slice's own token budget."""
    if datamodule.wide is None:
        return None
    with stages.stage("scorer"):
        gamma = scores[SCORER_TARGET]
        report, oof, wide = data_scorer(net, datamodule, gamma, training.seed, baselines)
        write_wide_scores(stages.out / "wide_scores.csv", datamodule, wide)
        report["wide"]["file"] = "wide_scores.csv"
        if datamodule.is_mislabeled.any():
            report["pool"].update(ap_exact=detection_metrics(gamma, datamodule.is_mislabeled)["ap"],
                                  ap_out_of_fold=detection_metrics(oof, datamodule.is_mislabeled)["ap"])
        report["wide"]["detection"] = ({name: detection_metrics(s, datamodule.wide_mask) for name, s in wide.items()}
                                       if datamodule.wide_mask.any() else {})
        log.info(f"data scorer: Spearman ρ {report['pool']['spearman_out_of_fold']:.3f} with the pool's exact "
                 f"{SCORER_TARGET} out of fold; scores the {report['wide']['size']} documents of the wide slice")
        if fractions:
            report["selection"] = selection(training, datamodule, wide, fractions, [n for n in wide if n != "random"],
                                            None, wide=True)
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
                "by_kind": auroc_by_kind(scores, datamodule.corruption_kind) if datamodule.corruption_kind else None}


# ----------------------------------------------------------------------------- checks and plumbing
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
