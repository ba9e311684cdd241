"""The task function: train with snapshots, replay backward, score, evaluate, report.

Everything is written under ``cfg.paths.output_dir`` (the Hydra run directory):
``snapshots/``, ``replay/stats.npz``, ``ground_truth.npz``, ``scores.csv``, ``metrics.json``.
"""
from __future__ import annotations

import csv
import io
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import warnings

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from callbacks.replay_progress import ReplayProgressBar
from pmp_lightning.evaluate import detection_metrics, format_table
from pmp_lightning.io import save_json, save_npz, save_text
from pmp_lightning.memory import PeakMemory
from pmp_lightning.models import Classifier
from pmp_lightning.scores import compute_scores

log = logging.getLogger(__name__)

# Lightning's start-up notes and tips, and warnings that say nothing about this project's runs
logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
for message in (".*does not have many workers.*", ".*returned `None`, this fit will run with no optimizer.*",
                ".*isinstance\\(treespec, LeafSpec\\).*", ".*torch.jit.script.*is deprecated.*"):
    warnings.filterwarnings("ignore", message=message)


@contextmanager
def _stage(timings: dict[str, float], memory: dict[str, float], stage: str):
    """Record the stage's wall time and the process's peak memory during it."""
    start = time.perf_counter()
    with PeakMemory("cuda" if torch.cuda.is_available() else "cpu") as peak:
        yield
    timings[stage] = round(time.perf_counter() - start, 3)
    if peak.peak_mib is not None:
        memory[stage] = round(peak.peak_mib, 1)


def run(cfg: DictConfig) -> dict:
    """Run one experiment; returns the contents of ``metrics.json``."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    memory: dict[str, float] = {}
    pl.seed_everything(cfg.seed, workers=True)
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    try:
        with _stage(timings, memory, "data"):
            datamodule = instantiate(cfg.data, noise=instantiate(cfg.noise))
            datamodule.setup()
        mask = datamodule.is_mislabeled
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

        with _stage(timings, memory, "train"):
            classifier = Classifier(
                net=instantiate(cfg.model),
                optimizer=instantiate(cfg.optimizer),
                lr_schedule=instantiate(cfg.lr_schedule) if cfg.get("lr_schedule") else None,
            )
            snapshots = instantiate(cfg.snapshot, dirpath=out / "snapshots")
            trainer = instantiate(cfg.trainer, callbacks=[snapshots], logger=logger, default_root_dir=out)
            trainer.fit(classifier, datamodule=datamodule)
        with _stage(timings, memory, "test"):
            test_accuracy = float(trainer.test(classifier, datamodule=datamodule, verbose=False)[0]["test/accuracy"])

        with _stage(timings, memory, "replay"):
            replay = instantiate(
                cfg.replay,
                net=instantiate(cfg.model),
                snapshot_dir=out / "snapshots",
                pool=datamodule.pool,
                downstream=datamodule.downstream,
                train_set=datamodule.train_set,
            )
            progress = [ReplayProgressBar()] if cfg.trainer.enable_progress_bar else []
            replay_trainer = instantiate(
                cfg.trainer, max_epochs=replay.T, callbacks=progress, logger=False, default_root_dir=out / "replay",
                enable_checkpointing=False,
            )
            replay_trainer.fit(replay)
            stats = replay.results()
            stats.save(out / "replay" / "stats.npz")

        with _stage(timings, memory, "score"):
            scores = compute_scores(list(cfg.scoring.scores), stats)
            if mask.any():
                detection = {name: detection_metrics(s, mask) for name, s in scores.items()}
            else:
                log.warning("the pool has no mislabeled examples (noise=none): detection metrics are skipped")
                detection = {}

        metrics = {
            "detection": detection,
            "test_accuracy": test_accuracy,
            "costate": {
                "mode": replay.curvature,
                "objective": replay.objective,
                "lambda_norms": stats.lambda_norm.tolist(),
                "growth_warnings": replay.growth_warnings,
            },
            "timings": timings,
            "peak_memory_mib": memory,
        }
        _write_scores(out / "scores.csv", datamodule, scores)
        save_json(out / "metrics.json", metrics)
        _report(metrics, out)
        if logger:
            _log_summary(logger, metrics)
        return metrics
    finally:
        if logger:
            import wandb

            wandb.finish()


def _write_scores(path: Path, datamodule, scores: dict[str, np.ndarray]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["index", "true_label", "observed_label", "is_mislabeled", *scores])
    columns = [datamodule.pool_index, datamodule.true_labels.numpy(), datamodule.observed_labels.numpy(), datamodule.is_mislabeled.astype(int)]
    for row in zip(*columns, *scores.values()):
        writer.writerow([int(v) for v in row[:4]] + [repr(float(v)) for v in row[4:]])
    save_text(path, buf.getvalue())


def _report(metrics: dict, out: Path) -> None:
    norms = ", ".join(f"{v:.3g}" for v in metrics["costate"]["lambda_norms"])
    lines = [
        f"test accuracy: {metrics['test_accuracy']:.4f}",
        f"costate ({metrics['costate']['mode']}, J={metrics['costate']['objective']}) ‖λ_t‖, t=1..T: {norms}",
    ]
    if metrics["detection"]:
        lines += ["", "detection of mislabeled examples (low score = suspect), best AP first:", format_table(metrics["detection"])]
    lines += ["", "timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in metrics["timings"].items())]
    if metrics["peak_memory_mib"]:
        lines += ["peak memory (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in metrics["peak_memory_mib"].items())]
    lines += [f"outputs: {out}"]
    print("\n".join(lines), flush=True)


def _log_summary(logger, metrics: dict) -> None:
    summary = {f"detection/{name}/{m}": v for name, row in metrics["detection"].items() for m, v in row.items()}
    summary["test_accuracy"] = metrics["test_accuracy"]
    summary.update({f"timings/{k}": v for k, v in metrics["timings"].items()})
    for t, norm in enumerate(metrics["costate"]["lambda_norms"], start=1):
        logger.experiment.log({"costate/lambda_norm": norm, "costate/t": t})
    logger.experiment.summary.update(summary)
