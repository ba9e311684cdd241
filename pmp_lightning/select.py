"""Selection utility: does removing the lowest-scored examples help the model trained without them?

For each fraction f and each chosen score, retrain from scratch (same seed, same config) on the pool
minus its lowest-scored ⌈f·N⌉ examples and measure clean test accuracy. References: removing a
random ⌈f·N⌉ examples, and removing exactly the mislabeled examples (the oracle).
"""
from __future__ import annotations

import logging
import math

import numpy as np
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset

from callbacks.progress import log_above_bars, progress_callbacks
from pmp_lightning.errors import DataConfigError
from pmp_lightning.models import Classifier

log = logging.getLogger(__name__)


def retrain(cfg: DictConfig, datamodule, keep: np.ndarray) -> tuple[Classifier, pl.Trainer]:
    """A model trained from scratch (same seed and config as the run) on the training-set examples where ``keep`` is true."""
    pl.seed_everything(cfg.seed, workers=True)
    classifier = Classifier.from_config(cfg)
    # one process even when the run uses several: the retrains are small and run on global rank zero only
    trainer = instantiate(cfg.trainer, strategy="auto", devices=1, logger=False, enable_checkpointing=False,
                          callbacks=progress_callbacks(cfg.trainer.enable_progress_bar))
    train = DataLoader(Subset(datamodule.train_set, np.flatnonzero(keep).tolist()), batch_size=datamodule.batch_size, shuffle=True)
    with log_above_bars(cfg.trainer.enable_progress_bar):
        trainer.fit(classifier, train_dataloaders=train)
    return classifier, trainer


def retrain_accuracy(cfg: DictConfig, datamodule, keep: np.ndarray) -> float:
    """Test accuracy of a model trained from scratch on the pool examples where ``keep`` is true."""
    classifier, trainer = retrain(cfg, datamodule, keep)
    return float(trainer.test(classifier, dataloaders=datamodule.test_dataloader(), verbose=False)[0]["test/accuracy"])


def selection(cfg: DictConfig, datamodule, scores: dict[str, np.ndarray], full_accuracy: float) -> dict:
    """``{"full": acc, "oracle": acc, "<fraction>": {score: acc, ..., "random": acc}}``."""
    if datamodule.pool_mode != "train":
        raise DataConfigError("select.fractions removes examples from the training set, so it needs pool=train")
    unknown = [s for s in cfg.select.scores if s not in scores]
    if unknown:
        raise DataConfigError(f"select.scores {unknown} were not computed; add them to scoring.scores (cleanlab: "
                              f"baselines.cleanlab=true) or pick from {sorted(scores)}")
    n = len(datamodule.pool)
    mask = datamodule.is_mislabeled
    report: dict = {"full": full_accuracy, "oracle": retrain_accuracy(cfg, datamodule, ~mask)}
    rng = np.random.default_rng(cfg.seed)
    for fraction in cfg.select.fractions:
        if not 0 < fraction < 1:
            raise DataConfigError(f"select.fractions holds {fraction}; each fraction must be in (0, 1)")
        k = math.ceil(fraction * n)
        row = {}
        for name in [*cfg.select.scores, "random"]:
            drop = rng.permutation(n)[:k] if name == "random" else np.argsort(scores[name], kind="stable")[:k]
            keep = np.ones(n, dtype=bool)
            keep[drop] = False
            row[name] = retrain_accuracy(cfg, datamodule, keep)
            log.info(f"select: without the lowest {fraction:.0%} by {name}: test accuracy {row[name]:.4f}")
        report[str(fraction)] = row
    return report
