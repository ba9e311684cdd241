"""The task function: train with snapshots, replay backward, score, evaluate, report.

Everything a run reports is written under ``cfg.paths.output_dir`` (the Hydra run directory):
``ground_truth.npz``, ``scores.csv``, ``metrics.json``, and the links ``snapshots/`` and ``replay/``
to the train and replay cache entries it used (``cfg.paths.cache_dir``), so that runs that differ
only in their scoring train and replay once.

Several processes (``trainer.strategy=ddp``): Lightning starts the other ranks by re-running the
command line, so every rank runs this function. Global rank zero alone decides cache hits, takes
the locks, writes files and reports; the other ranks follow its decisions (``_agree``) into the
same training and replay fits and return after the replay. With ``ddp_spawn`` only the fits run in
other processes, and they hand their results back through the files the replay writes.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from callbacks.process_group import ReleaseSpawnedProcessGroup
from callbacks.progress import log_above_bars, progress_callbacks
from callbacks.theta_snapshot import load_manifest
from pmp_lightning.baselines import check_folds, cleanlab_baseline, cross_validated_probs, crossval_key_config
from pmp_lightning.cache import StageCache, replay_key_config, train_key_config
from pmp_lightning.config import check_settings, score_names
from pmp_lightning.costate import describe
from pmp_lightning.errors import DataConfigError, OutputError, ReplayConfigError, SnapshotError, UnknownScoreError
from pmp_lightning.evaluate import contribution_auroc, detection_metrics, format_table, small_sample_caveat
from pmp_lightning.io import save_json, save_npz, save_text
from pmp_lightning.memory import PeakMemory
from pmp_lightning.models import Classifier, predict_proba
from pmp_lightning.replay import ReplayStats, growth_steps, network_state
from pmp_lightning.scores import compute_scores
from pmp_lightning.stats import make_plan
from pmp_lightning.select import selection
from pmp_lightning.wandb_logging import keep_staging_in, log_results, run_identity

log = logging.getLogger(__name__)

# Lightning's start-up notes and tips, and warnings that say nothing about this project's runs
logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
for message in (".*does not have many workers.*", ".*returned `None`, this fit will run with no optimizer.*",
                ".*isinstance\\(treespec, LeafSpec\\).*", ".*torch.jit.script.*is deprecated.*"):
    warnings.filterwarnings("ignore", message=message)


AFTER_INTERRUPT = {
    "train": "the train cache entry has no manifest, so the same command retrains it from scratch",
    "replay": "the same command resumes the replay after its last finished snapshot",
}


@contextmanager
def _stage(timings: dict[str, float], memory: dict[str, float], stage: str):
    """Record the stage's wall time and the process's peak memory during it; say so when it is interrupted."""
    start = time.perf_counter()
    try:
        with PeakMemory("cuda" if torch.cuda.is_available() else "cpu") as peak:
            yield
    except (KeyboardInterrupt, SystemExit) as err:  # Lightning turns Ctrl-C into a graceful shutdown and exit(1)
        if isinstance(err, KeyboardInterrupt) or err.code not in (0, None):
            log.error(f"interrupted during {stage} after {time.perf_counter() - start:.0f} s; no results were written; "
                      f"{AFTER_INTERRUPT.get(stage, 'run the same command again')}")
        raise
    timings[stage] = round(time.perf_counter() - start, 3)
    if peak.peak_mib is not None:
        memory[stage] = round(peak.peak_mib, 1)


def run(cfg: DictConfig) -> dict:
    """Run one experiment; returns the contents of ``metrics.json`` (an empty dict on ranks other than zero)."""
    lead = rank_zero_only.rank == 0  # Lightning sets it from the environment it gives the ranks it starts
    _check_strategy(cfg)
    check_settings(cfg)
    rank_by = _rank_by(cfg, [*score_names(cfg.scoring), *(["cleanlab"] if cfg.baselines.cleanlab else [])])
    out = Path(cfg.paths.output_dir)
    _require_writable(out, "paths.output_dir (hydra.run.dir on the command line)")
    _require_writable(Path(cfg.paths.cache_dir), "paths.cache_dir")
    if lead:
        log.info(f"cache: {Path(cfg.paths.cache_dir).resolve()} (paths.cache_dir); outputs: {out.resolve()}")
    objective = instantiate(cfg.objective)  # a bad objective setting fails here, before any work
    timings: dict[str, float] = {}
    memory: dict[str, float] = {}
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.get("logger") and lead:
        keep_staging_in(out)
    logger = instantiate(cfg.logger, **run_identity()) if cfg.get("logger") and lead else False
    try:
        with _stage(timings, memory, "data"):
            datamodule = instantiate(cfg.data, noise=instantiate(cfg.noise))
            datamodule.setup()
        _check_model_fits(cfg, datamodule)
        if cfg.baselines.cleanlab and datamodule.pool_mode == "train":
            check_folds(cfg.baselines.folds, len(datamodule.pool))
        mask = datamodule.is_mislabeled
        if lead:
            save_npz(
                out / "ground_truth.npz",
                index=datamodule.pool_index,
                true_label=datamodule.true_labels.numpy(),
                observed_label=datamodule.observed_labels.numpy(),
                is_mislabeled=mask,
            )
            log.info(f"pool: {len(mask)} examples, {int(mask.sum())} mislabeled; training set: {len(datamodule.train_set)}")
        if logger:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

        data_content = datamodule.content_key()
        train_cache = StageCache(cfg.paths.cache_dir, "train", train_key_config(cfg, data_content))
        with train_cache.locked() if lead else nullcontext():
            trained = _agree("train", train_cache.load(missing=_missing_snapshots) if lead else None)
            if trained is None:
                result = _train(cfg, datamodule, logger, train_cache.start() if lead else train_cache.dir, timings, memory)
                trained = _agree("trained", train_cache.commit(result) if lead else None)
        replay_cache = StageCache(cfg.paths.cache_dir, "replay", replay_key_config(cfg, trained, datamodule.downstream_key()))
        with replay_cache.locked() if lead else nullcontext():
            replayed = _agree("replay", replay_cache.load(missing=_missing_stats) if lead else None)
            if replayed is None:
                _replay(cfg, objective, datamodule, train_cache.dir / "snapshots",
                        replay_cache.start(resume=True) if lead else replay_cache.dir, timings, memory)
                replayed = replay_cache.commit({"seconds": timings["replay"]}) if lead else None
        if not lead:
            return {}
        _link(out / "snapshots", train_cache.dir / "snapshots")
        _link(out / "replay", replay_cache.dir)
        stats = ReplayStats.load(replay_cache.dir / "stats.npz")
        final_probs = _final_probs(cfg, train_cache.dir / "snapshots", datamodule)
        cost = {"train": trained.get("seconds"), "replay": replayed.get("seconds")}

        scores = compute_scores(score_names(cfg.scoring), stats)
        cleanlab = None
        if cfg.baselines.cleanlab:
            scores["cleanlab"], cleanlab = _cleanlab(cfg, datamodule, data_content, final_probs, timings, memory)
            cost["cleanlab"] = cleanlab["seconds"]

        with _stage(timings, memory, "score"):
            caveat = small_sample_caveat(mask) if mask.any() else None
            if caveat:
                log.warning(caveat)
            if mask.any():
                detection = {name: detection_metrics(s, mask) for name, s in scores.items()}
                per_snapshot = contribution_auroc(stats.contribution, mask)
            else:
                per_snapshot = []
                log.warning("the pool has no known mislabeled examples (noise=none and no data.known_errors): detection "
                            "metrics are skipped; suspects.csv ranks the pool")
                detection = {}

        if cfg.select.fractions:
            with _stage(timings, memory, "select"):
                chosen = selection(cfg, datamodule, scores, trained["test_accuracy"])

        metrics = {
            "detection": detection,
            "test_accuracy": trained["test_accuracy"],
            "costate": {"mode": cfg.replay.curvature, "horizon": cfg.replay.horizon,
                        "objective": describe(objective),
                        "lambda_norms": stats.lambda_norm.tolist(), "participation": stats.participation.tolist(),
                        "contribution_auroc": per_snapshot,
                        "growth_warnings": growth_steps(stats.lambda_norm, cfg.replay.growth_warning)},
            "timings": timings,
            "cost_s": cost,
            "peak_memory_mib": memory,
            "cache": {"train": str(train_cache.dir), "replay": str(replay_cache.dir),
                      "computed": [stage for stage in ("train", "replay") if stage in timings]},
        }
        if caveat:
            metrics["detection_caveat"] = caveat
        if datamodule.known_error_counts is not None:
            metrics["known_errors"] = {"file": str(datamodule.known_errors), **datamodule.known_error_counts}
        if cleanlab is not None:
            metrics["cleanlab"] = cleanlab
        if cfg.select.fractions:
            metrics["selection"] = chosen
        metrics["suspects"] = {"rank_by": rank_by, "file": "suspects.csv"}
        _write_scores(out / "scores.csv", datamodule, scores)
        _write_suspects(out, datamodule, scores[rank_by], rank_by, final_probs.argmax(1))
        save_json(out / "metrics.json", metrics)
        _report(metrics, out)
        if logger:
            log_results(logger.experiment, metrics, scores, datamodule)
        return metrics
    finally:
        if logger:
            import wandb

            wandb.finish()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # ddp ranks: a gloo group left alive aborts the process at exit


def _train(cfg: DictConfig, datamodule, logger, directory: Path, timings: dict, memory: dict) -> dict:
    """Train with the snapshot callback writing into ``directory/snapshots``; returns the test accuracy and the time taken."""
    with _stage(timings, memory, "train"):
        classifier = Classifier.from_config(cfg)
        snapshots = instantiate(cfg.snapshot, dirpath=directory / "snapshots")
        callbacks = [snapshots, ReleaseSpawnedProcessGroup(), *progress_callbacks(cfg.trainer.enable_progress_bar)]
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger,
                              default_root_dir=directory)
        with log_above_bars(cfg.trainer.enable_progress_bar):
            trainer.fit(classifier, datamodule=datamodule)
    with _stage(timings, memory, "test"):
        accuracy = float(trainer.test(classifier, datamodule=datamodule, verbose=False)[0]["test/accuracy"])
    return {"test_accuracy": accuracy, "seconds": timings["train"]}


def _replay(cfg: DictConfig, objective, datamodule, snapshot_dir: Path, directory: Path, timings: dict, memory: dict) -> None:
    """Replay the snapshots backward into ``directory`` (``stats.npz``), continuing a replay that was cut short."""
    with _stage(timings, memory, "replay"):
        replay = instantiate(cfg.replay, net=instantiate(cfg.model), objective=objective,
                             snapshot_dir=snapshot_dir, pool=datamodule.pool,
                             downstream=datamodule.downstream, train_set=datamodule.train_set, progress_dir=directory)
        if replay.remaining < replay.T + 1:
            log.info(f"replay: resuming in {directory}, {replay.T + 1 - replay.remaining} of {replay.T + 1} snapshots already done")
        if replay.remaining:
            callbacks = [ReleaseSpawnedProcessGroup(), *progress_callbacks(cfg.trainer.enable_progress_bar, replay=True)]
            replay_trainer = instantiate(cfg.trainer, max_epochs=replay.remaining, callbacks=callbacks, logger=False,
                                         default_root_dir=directory, enable_checkpointing=False)
            log.info(f"replay: {replay.remaining} snapshots, {len(replay.pool)} pool examples, "
                     f"{replay_trainer.world_size} process(es)")
            with log_above_bars(cfg.trainer.enable_progress_bar):
                replay_trainer.fit(replay)  # global rank zero writes stats.npz when the last snapshot is done
        elif rank_zero_only.rank == 0:  # every snapshot was done before an interruption; only stats.npz is missing
            replay.save_stats()


def _check_model_fits(cfg: DictConfig, datamodule) -> None:
    """A model that cannot take the data's inputs, has fewer outputs than the data has classes, or whose per-example
    statistics cannot be computed fails here, in a second or so, in one line naming the fix: not inside torch halfway
    through training, and never after it. The statistics pass's plan (which layers by rule, which by the fallback)
    is proven here on a few pool examples and logged."""
    with torch.random.fork_rng(devices=[]):  # the trained model's initialisation must not depend on this probe
        net = instantiate(cfg.model).eval()
    x, y = datamodule.pool.x[:8], datamodule.pool.y[:8]
    target = cfg.model.get("_target_", "the model")
    try:
        with torch.no_grad():
            logits = net(x)
    except Exception as err:  # shape errors come from deep inside torch, in many types
        raise DataConfigError(f"model ({target}) cannot take the data's inputs of shape {tuple(x.shape[1:])} ({x.dtype}): "
                              f"{str(err).splitlines()[0]}. {_input_advice(net, datamodule.pool.x)}") from err
    if logits.dim() != 2 or logits.shape[1] < datamodule.num_classes:
        raise DataConfigError(f"model ({target}) gives outputs of shape {tuple(logits.shape[1:])} per example, but the labels "
                              f"have {datamodule.num_classes} classes; set model.num_classes={datamodule.num_classes}")
    with torch.random.fork_rng(devices=[]):
        plan = make_plan(net, x, y)
    if rank_zero_only.rank == 0:
        log.info(f"statistics pass for {type(net).__name__}: {plan.summary()}")
        differs = sorted({type(m).__name__ for m in net.modules() if isinstance(m, TRAIN_MODE_DIFFERS)})
        if differs:
            log.info(f"the replay differentiates the network in eval mode, where {', '.join(differs)} act otherwise than "
                     f"in training (BatchNorm on its running statistics, dropout off): the exact identity of the scores "
                     f"holds for that eval-mode network")


# layers whose training-mode forward differs from their eval-mode one
TRAIN_MODE_DIFFERS = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.dropout._DropoutNd,
                      torch.nn.modules.instancenorm._InstanceNorm)


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


def _final_probs(cfg: DictConfig, snapshot_dir: Path, datamodule) -> np.ndarray:
    """The trained model's (θ_T's) class probabilities for every pool example."""
    net = instantiate(cfg.model)
    net.load_state_dict(network_state(snapshot_dir, load_manifest(snapshot_dir)["snapshots"][-1]))
    return predict_proba(net, datamodule.pool.x)


def _cleanlab(cfg: DictConfig, datamodule, data_content: dict, final_probs: np.ndarray, timings: dict,
             memory: dict) -> tuple[np.ndarray, dict]:
    """cleanlab's score from out-of-sample probabilities: K-fold cross-validation (cached) for pool=train,
    the final model's for a held-out pool. Returns the score and what goes under ``cleanlab`` in metrics.json."""
    if datamodule.pool_mode == "train":
        cache = StageCache(cfg.paths.cache_dir, "crossval", crossval_key_config(cfg, data_content))
        with cache.locked():
            done = cache.load(missing=_missing_probs)
            if done is None:
                with _stage(timings, memory, "cleanlab"):
                    probs = cross_validated_probs(cfg, datamodule, cache.start(resume=True))
                    save_npz(cache.dir / "pred_probs.npz", probs=probs)
                done = cache.commit({"seconds": timings["cleanlab"]})
        with np.load(cache.dir / "pred_probs.npz") as z:
            probs = z["probs"]
        source, seconds = f"{cfg.baselines.folds}-fold cross-validation", done["seconds"]
    else:
        probs, source, seconds = final_probs, "the trained model (the pool is held out)", 0.0
    score, summary = cleanlab_baseline(datamodule.observed_labels.numpy(), probs, datamodule.is_mislabeled)
    return score, {"probabilities": source, "seconds": seconds, **summary}


def _rank_by(cfg: DictConfig, names: list[str]) -> str:
    """The score that orders suspects.csv: ``scoring.rank_by``, by default the recommended cosine when computed."""
    wanted = cfg.scoring.get("rank_by")
    if wanted is None:
        return "cosine" if "cosine" in names else names[0]
    if wanted not in names:
        raise UnknownScoreError(f"scoring.rank_by={wanted} is not among the scores this run computes; pick one of "
                                f"{', '.join(names)}")
    return wanted


def _missing_probs(entry: Path) -> list[str]:
    return [] if (entry / "pred_probs.npz").is_file() else ["pred_probs.npz"]


def _missing_snapshots(entry: Path) -> list[str]:
    """Files of a train cache entry's trajectory that are gone (a usable manifest, or snapshots it lists)."""
    try:
        manifest = load_manifest(entry / "snapshots")
    except SnapshotError as err:
        return [f"a usable snapshots manifest ({err})"]
    return [f"snapshots/{s['file']}" for s in manifest["snapshots"] if not (entry / "snapshots" / s["file"]).is_file()]


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


def _write_suspects(out: Path, datamodule, score: np.ndarray, name: str, predicted: np.ndarray) -> None:
    """``suspects.csv``: the whole pool, most suspect (lowest score) first, and ``suspects.png``, the first 32."""
    from pmp_lightning.compare import N_SUSPECTS, suspect_grid

    order = np.argsort(score, kind="stable")
    truth = datamodule.is_mislabeled if datamodule.is_mislabeled.any() else None
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["rank", "index", "observed_label", "predicted_label", name, *(["is_mislabeled"] if truth is not None else [])])
    observed = datamodule.observed_labels.numpy()
    for rank, i in enumerate(order, start=1):
        row = [rank, int(datamodule.pool_index[i]), int(observed[i]), int(predicted[i]), repr(float(score[i]))]
        writer.writerow(row + ([int(truth[i])] if truth is not None else []))
    save_text(out / "suspects.csv", buf.getvalue())
    top = order[:N_SUSPECTS]
    titles = [f"#{datamodule.pool_index[i]}: {observed[i]}, model {predicted[i]}" for i in top]
    suspect_grid(datamodule.pool.x[top], titles, None if truth is None else truth[top],
                 f"{N_SUSPECTS} most suspect by {name}: index: observed label, model's label"
                 + ("" if truth is None else " (red = mislabeled)"), out / "suspects.png")


def _write_scores(path: Path, datamodule, scores: dict[str, np.ndarray]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    # is_mislabeled: synthetic noise (true_label != observed_label) or a listed known error (known_error = 1)
    writer.writerow(["index", "true_label", "observed_label", "is_mislabeled", "known_error", *scores])
    columns = [datamodule.pool_index, datamodule.true_labels.numpy(), datamodule.observed_labels.numpy(),
               datamodule.is_mislabeled.astype(int), datamodule.known_error_mask.astype(int)]
    for row in zip(*columns, *scores.values()):
        writer.writerow([int(v) for v in row[:5]] + [repr(float(v)) for v in row[5:]])
    save_text(path, buf.getvalue())


def _report(metrics: dict, out: Path) -> None:
    norms = ", ".join(f"{v:.3g}" for v in metrics["costate"]["lambda_norms"])
    lines = [
        f"test accuracy: {metrics['test_accuracy']:.4f}",
        f"costate ({metrics['costate']['mode']}, J = {metrics['costate']['horizon']} of {metrics['costate']['objective']}) "
        f"‖λ_t‖, t=1..T: {norms}",
        "downstream examples carrying ∇J(θ_t), t=1..T: "
        + ", ".join(f"{v:.0%}" for v in metrics["costate"]["participation"]),
    ]
    if metrics["detection"]:
        lines += ["", "detection of mislabeled examples (low score = suspect), best AP first:", format_table(metrics["detection"])]
    if "known_errors" in metrics:
        known = metrics["known_errors"]
        repeats = f" ({known['duplicates']} duplicate entries counted once)" if known["duplicates"] else ""
        lines += [f"known errors: {known['in_pool']} of the {known['listed']} distinct indices listed in {known['file']} "
                  f"are in the pool{repeats}"]
    if "cleanlab" in metrics:
        cl = metrics["cleanlab"]
        found = f"find_label_issues flags {cl['issues_found']}"
        if "precision" in cl:
            found += f" (precision {cl['precision']:.3f}, recall {cl['recall']:.3f})"
        lines += [f"cleanlab: probabilities from {cl['probabilities']}, {cl['seconds']:.0f} s; {found}"]
    if "selection" in metrics:
        sel = metrics["selection"]
        lines += ["", f"test accuracy after retraining without the lowest-scored examples (all kept: {sel['full']:.4f}, "
                      f"oracle without exactly the mislabeled: {sel['oracle']:.4f}):"]
        lines += [f"  removed {float(f):.0%}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items())
                  for f, row in sel.items() if f not in ("full", "oracle")]
    lines += ["", "timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in metrics["timings"].items())]
    if metrics["peak_memory_mib"]:
        lines += ["peak memory (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in metrics["peak_memory_mib"].items())]
    costs = ", ".join(f"{k} {v:.0f} s" for k, v in metrics["cost_s"].items() if v is not None)
    if costs:
        lines += [f"cost of the cached results: {costs}"]
    lines += [f"suspects, most suspect first by {metrics['suspects']['rank_by']}: {out / 'suspects.csv'}", f"outputs: {out}"]
    print("\n".join(lines), flush=True)
