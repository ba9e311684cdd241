"""Selection utility: does removing the lowest-scored examples help the model trained without them?

For each fraction f and each chosen score, retrain from scratch (same seed, same config) on the pool minus its
lowest-scored ⌈f·N⌉ examples and measure clean test accuracy. References: removing a random ⌈f·N⌉ examples, and
removing exactly the mislabeled examples (the oracle). The settings are checked before any work
(``config.check_settings``).
"""
from __future__ import annotations

import logging
import math

import numpy as np
from torch.utils.data import DataLoader, Subset

from pmp_lightning.training import Training

log = logging.getLogger(__name__)


def train_without(training: Training, datamodule, keep: np.ndarray, test: bool = True):
    """A model trained from scratch (the run's seed and config, one process) on the training-set examples where
    ``keep`` is true, and its clean test accuracy (None when ``test`` is false). Training examples beyond ``keep``
    (the canaries and controls of ``scoring.canaries``, after the pool) stay in every retrain."""
    keep = np.concatenate([keep, np.ones(len(datamodule.train_set) - len(keep), dtype=bool)])
    loader = DataLoader(Subset(datamodule.train_set, np.flatnonzero(keep).tolist()), batch_size=datamodule.batch_size,
                        shuffle=True)
    return training.fit(loader, datamodule.test_dataloader() if test else None, one_process=True)


def selection(training: Training, datamodule, scores: dict[str, np.ndarray], fractions, names, full_accuracy: float,
              seed: int) -> dict:
    """``{"full": acc, "oracle": acc, "<fraction>": {score: acc, ..., "random": acc}}``."""
    n = len(datamodule.pool)
    mask = datamodule.is_mislabeled
    report: dict = {"full": full_accuracy, "oracle": train_without(training, datamodule, ~mask)[1]}
    rng = np.random.default_rng(seed)
    for fraction in fractions:
        k = math.ceil(fraction * n)
        row = {}
        for name in [*names, "random"]:
            drop = rng.permutation(n)[:k] if name == "random" else np.argsort(scores[name], kind="stable")[:k]
            keep = np.ones(n, dtype=bool)
            keep[drop] = False
            row[name] = train_without(training, datamodule, keep)[1]
            log.info(f"select: without the lowest {fraction:.0%} by {name}: test accuracy {row[name]:.4f}")
        report[str(fraction)] = row
    return report
