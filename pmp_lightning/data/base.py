"""What the pipeline needs from a task's data, written down once: ``TaskDataModule``, the base of the labelled data
(``data/labelled.py``: a classifier's examples) and the corpus (``data/corpus.py``: a language model's documents).

After ``setup()`` a task's data module holds:

- ``kind``: what the task is (``task.CLASSIFICATION``, ``task.LANGUAGE_MODEL``): its loss per example, its unit
  ("example", "document"), what a bad one is called ("mislabeled", "corrupted"), whether it has class labels, and
  what a retrain on a selection is measured by;
- the splits, each an ``IndexedDataset``: ``pool`` (scored), ``scored`` (the pool and any canaries after it),
  ``downstream`` (J's examples), ``test_set`` and ``train_set`` (what the trajectory trains on);
- ``num_classes`` (a language model: its vocabulary), ``pool_mode``, ``batch_size``;
- the ground truth, if any: ``is_mislabeled`` and ``ground_truth()`` (``ground_truth.npz``);
- the examples' ids and what the reports say of them: ``pool_columns()`` (scores.csv), ``suspect_columns(predicted)``
  (suspects.csv);
- the cache keys, by content: ``content_key()`` (the trajectory's) and ``downstream_key()`` (the replay's);
- the loaders a training reads (``train_dataloader``, ``test_dataloader``); a retrain on a subset of the training
  set is ``scores/select.train_without``, measured as ``kind.measure`` says.

What only some tasks have defaults to None here: ``canary_mask`` (labelled data: the canaries among ``scored``),
``corruption_kind`` (a corpus: each pool document's corruption), ``wide`` (a corpus's wide slice), ``vocab_size``,
``split_note`` (a corpus: where its texts went).
"""
from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from pmp_lightning.cache import content_digest
from pmp_lightning.task import CLASSIFICATION


class IndexedDataset(Dataset):
    """In-memory ``(x, y, position)`` triples."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i

    def where(self, keep: torch.Tensor) -> "IndexedDataset":
        """The examples where ``keep`` is true, in their order."""
        return IndexedDataset(self.x[keep], self.y[keep])

    def to(self, dtype: torch.dtype) -> "IndexedDataset":
        """The same examples with floating inputs in ``dtype``; integer inputs (token ids) stay integers."""
        return IndexedDataset(self.x.to(dtype) if self.x.is_floating_point() else self.x, self.y)


class TaskDataModule(pl.LightningDataModule):
    """The written interface of a task's data (the module docstring), with what every task shares: the cache keys by
    content and the loaders."""

    kind = CLASSIFICATION
    canary_mask: np.ndarray | None = None
    corruption_kind: list[str] | None = None
    wide: IndexedDataset | None = None
    vocab_size: int | None = None
    split_note: dict | None = None

    @property
    def is_mislabeled(self) -> np.ndarray:
        raise NotImplementedError

    def ground_truth(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def pool_columns(self) -> dict[str, list]:
        raise NotImplementedError

    def suspect_columns(self, predicted: np.ndarray | None) -> dict[str, list]:
        raise NotImplementedError

    def content_key(self) -> dict[str, str]:
        """What the trajectory and its evaluation read, by content: the training set, the pool with its observed
        labels, and the test set (the train cache key). The downstream set has a key of its own (the replay's)."""
        return {"train": content_digest(self.train_set.x, self.train_set.y), "pool": content_digest(self.pool.x, self.pool.y),
                "test": content_digest(self.test_set.x, self.test_set.y)}

    def downstream_key(self) -> str:
        """The downstream set that defines J and the scored set (the pool and any canaries), by content (the replay
        cache key)."""
        return content_digest(self.downstream.x, self.downstream.y, self.scored.x, self.scored.y)

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


def datamodule_from_config(cfg) -> TaskDataModule:
    """The run's data as its config describes it (``data``, ``noise``, ``scoring.canaries``), not yet set up: the one
    place that builds it, so that the reports (``compare``, ``diagnose``) rebuild the very pool the run scored. A
    config's ``scoring.canaries=auto`` is made concrete first (``policy.resolve``)."""
    from hydra.utils import instantiate

    canaries = cfg.scoring.get("canaries", 0)
    if canaries == "auto":
        raise TypeError("scoring.canaries=auto is resolved by policy.resolve(cfg) before the data is built")
    return instantiate(cfg.data, noise=instantiate(cfg.noise), canaries=canaries)
