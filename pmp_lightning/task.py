"""What a task is, in one place: its loss per example, how a per-position quantity becomes one per example, and the
words a run uses for it. Two kinds exist: ``CLASSIFICATION`` (an example with a class label; logits (N, K), labels
(N,)) and ``LANGUAGE_MODEL`` (a document with a target per position; next-token logits (N, T, V), targets (N, T),
padding ``IGNORE``).

A data module says its kind (``TaskDataModule.kind``, ``data/base.py``): everything above the tensors asks it. The
functions that see only tensors (training's loss, the replay's objective and Hessian-vector products, the statistics
pass) read it from the outputs' shape with ``kind_of``, the one place where a shape means a kind. A third kind (a
regression, token labelling) is one class here and a data module that names it.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

IGNORE = -100  # a target left out of a document's loss (F.cross_entropy's ignore_index): the padding of a short file


class Classification:
    """An example with one class label: l_n is the cross-entropy of its logits with its observed label."""

    name, unit, wrong, labelled = "classification", "example", "mislabeled", True
    measure = "test accuracy"  # what a retrain on a selection reaches (scores/select.py)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(logits, labels, reduction=reduction)

    def per_example(self, fn: Callable, logits: torch.Tensor, labels: torch.Tensor):
        """``fn`` (of (rows, K) logits and (rows,) labels: a tensor per row, or a dict of them) per example."""
        return fn(logits, labels)

    def weights(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """How an example's loss weighs each of its outputs: one output, weight 1."""
        return logits.new_ones(labels.shape)

    def average(self, values: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """A quantity of each output (N,) as one per example: itself."""
        return values

    def accuracy(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The fraction predicted right and how many predictions it counts."""
        return (logits.argmax(1) == labels).float().mean(), len(labels)


class LanguageModel:
    """A document with a target per position: l_n is the mean next-token cross-entropy over its targets, those equal
    to ``IGNORE`` (padding) left out; a per-position quantity is averaged over the same targets."""

    name, unit, wrong, labelled = "language_model", "document", "corrupted", False
    measure = "test loss"

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        per_token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
        losses = per_token.sum(1) / (labels != IGNORE).sum(1).clamp_min(1)
        return {"none": losses, "sum": losses.sum(), "mean": losses.mean()}[reduction]

    def per_example(self, fn: Callable, logits: torch.Tensor, labels: torch.Tensor):
        """``fn`` on every target position as a row, averaged over each document's targets."""
        kept = labels != IGNORE
        rows = fn(logits[kept], labels[kept])
        counts = kept.sum(1).clamp_min(1)

        def average(values: torch.Tensor) -> torch.Tensor:
            return logits.new_zeros(labels.shape).masked_scatter(kept, values).sum(1) / counts

        return {k: average(v) for k, v in rows.items()} if isinstance(rows, dict) else average(rows)

    def weights(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """How a document's loss weighs each position (B, T): 1/T_m at its targets, 0 at padding."""
        kept = (labels != IGNORE).to(logits.dtype)
        return kept / kept.sum(1, keepdim=True).clamp_min(1)

    def average(self, values: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """A quantity of each position (N, T) as one per document: weighted as its loss weighs the positions."""
        return (values * self.weights(logits, labels)).sum(1)

    def accuracy(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The next-token accuracy over the targets, and how many targets it counts."""
        kept = labels != IGNORE
        return (logits.argmax(2) == labels)[kept].float().mean(), int(kept.sum())


CLASSIFICATION, LANGUAGE_MODEL = Classification(), LanguageModel()


def kind_of(logits: torch.Tensor, labels: torch.Tensor) -> Classification | LanguageModel:
    """The kind that outputs and labels of these shapes belong to: next-token logits (N, T, V) with targets (N, T) are
    a language model's documents, anything else a classifier's examples."""
    return LANGUAGE_MODEL if logits.dim() == 3 and labels.dim() == 2 else CLASSIFICATION


def training_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The loss training descends: the one definition that training, the replay's Hessian-vector products and the
    statistics pass all use (the task's loss per example, reduced)."""
    return kind_of(logits, labels).loss(logits, labels, reduction)
