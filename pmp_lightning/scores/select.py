"""Selection utility: does removing the lowest-scored examples help the model trained without them?

For each fraction f and each chosen score, retrain from scratch (same seed, same config) on the pool minus its
lowest-scored ⌈f·N⌉ examples and measure what the retrained model reaches: a classifier's clean test accuracy; a
language model's loss on the test documents, trained with the whole pool's token budget (its number of steps:
fewer documents, more passes over them), the paper's headline measure: the loss on the target's distribution. With a
target set of your own (``data.downstream``) the test documents are held out of it (never J's own, which chose the
PMP scores), or come from a test file of your own (``data.test``); metrics.json names them (``measured_on``).
References: removing a random ⌈f·N⌉ examples, and removing exactly the mislabeled (corrupted) examples (the oracle).
The settings are checked before any work (``config.check_settings``).
"""
from __future__ import annotations

import logging
import math

import numpy as np
from torch.utils.data import DataLoader, Subset

from pmp_lightning.cache import Stages
from pmp_lightning.scores.text import token_loss
from pmp_lightning.training import Training

log = logging.getLogger(__name__)
REPORT_KEYS = ("measure", "measured_on", "full", "oracle")  # a selection report's entries that are not removed fractions


def train_without(training: Training, datamodule, keep: np.ndarray, test: bool = True, steps: int | None = None,
                  dataset=None):
    """A model trained from scratch (the run's seed and config, one process) on the examples of ``dataset`` (the
    training set by default) where ``keep`` is true, and its clean test accuracy (None when ``test`` is false);
    ``steps``: train for that many steps instead of the configured epochs. Examples beyond ``keep`` (the canaries and
    controls of ``scoring.canaries``, after the pool) stay in every retrain."""
    dataset = datamodule.train_set if dataset is None else dataset
    keep = np.concatenate([keep, np.ones(len(dataset) - len(keep), dtype=bool)])
    loader = DataLoader(Subset(dataset, np.flatnonzero(keep).tolist()), batch_size=datamodule.batch_size, shuffle=True)
    return training.fit(loader, datamodule.test_dataloader() if test else None, one_process=True, max_steps=steps)


def _retrained(training: Training, datamodule, keep: np.ndarray, budget: int | None, dataset=None) -> float:
    """What a retrain on the kept examples reaches: a classifier's test accuracy, or (with a step ``budget``) a
    language model's test loss."""
    if budget is None:
        return train_without(training, datamodule, keep, dataset=dataset)[1]
    model, _ = train_without(training, datamodule, keep, test=False, steps=budget, dataset=dataset)
    return token_loss(model.net, datamodule.test_set)


def selection(training: Training, datamodule, scores: dict[str, np.ndarray], fractions, names, full_accuracy: float,
              wide: bool = False) -> dict:
    """``{"measure": ..., "full": value, "oracle": value, "<fraction>": {score: value, ..., "random": value}}``; the
    measure is the test accuracy, or for a language model the test loss after the run's epochs' worth of steps over
    the whole set (the full run retrained the same way), on the documents ``measured_on`` names (the datamodule's
    ``test_note``); the random removals are drawn with the run's seed. ``wide``: select from a corpus's wide slice
    (``data.wide_size``, documents the proxy never saw) instead of the pool. A corpus without ground truth
    (``noise=none``) has no oracle to retrain: removing no document is the full run."""
    pool, mask = (datamodule.wide, datamodule.wide_mask) if wide else (datamodule.pool, datamodule.is_mislabeled)
    n = len(pool)
    lm = not datamodule.kind.labelled  # a language model: retrained at the pool's token budget, measured by test loss
    source = pool if wide else datamodule.train_set
    budget = training.epochs * math.ceil(len(source) / datamodule.batch_size) if lm else None
    measure = datamodule.kind.measure
    retrain = lambda keep: _retrained(training, datamodule, keep, budget, source)  # noqa: E731
    full = retrain(np.ones(n, dtype=bool)) if lm else full_accuracy
    report: dict = {"measure": measure, "full": full, "oracle": full if lm and not mask.any() else retrain(~mask)}
    if lm:
        report["measured_on"] = f"{datamodule.test_note['size']} {datamodule.test_note['source']}"
    rng = np.random.default_rng(training.seed)
    for fraction in fractions:
        k = math.ceil(fraction * n)
        row = {}
        for name in [*names, "random"]:
            drop = rng.permutation(n)[:k] if name == "random" else np.argsort(scores[name], kind="stable")[:k]
            keep = np.ones(n, dtype=bool)
            keep[drop] = False
            row[name] = retrain(keep)
            log.info(f"select{' (wide slice)' if wide else ''}: without the lowest {fraction:.0%} by {name}: {measure} "
                     f"{row[name]:.4f}")
        report[str(fraction)] = row
    return report


def selection_stage(stages: Stages, fractions: list[float], names: list[str], training: Training, datamodule,
                    scores: dict[str, np.ndarray], full_accuracy: float | None) -> dict | None:
    """With ``select.fractions``: the test accuracy of retraining without each score's lowest-scored examples."""
    if not fractions:
        return None
    with stages.stage("select"):
        return selection(training, datamodule, scores, fractions, names, full_accuracy)
