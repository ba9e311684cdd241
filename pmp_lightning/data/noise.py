"""Label noise: which pool labels are corrupted, and into what.

``LabelNoise`` flips exactly ``round(rate · N)`` labels chosen uniformly at random (symmetric or pair-flip).
``ConfusionNoise`` flips as many, chosen by how hard a reference classifier finds each image, to the class it
confuses the image with: instance-dependent noise, which looks like human error.
"""
from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

import numpy as np
import torch

from pmp_lightning.errors import DataConfigError
from pmp_lightning.data.sources import NUM_CLASSES
from pmp_lightning.io import load_arrays, why_unreadable

log = logging.getLogger(__name__)


def _rate(rate) -> float:
    try:
        rate = float(rate)
    except (TypeError, ValueError):
        raise DataConfigError(f"noise.rate={rate!r} is not a number: it is the fraction of pool labels to corrupt; "
                              f"use e.g. noise.rate=0.2") from None
    if not 0.0 <= rate < 1.0:
        raise DataConfigError(f"noise.rate={rate} is outside [0, 1): it is the fraction of pool labels to corrupt; "
                              f"use e.g. noise.rate=0.2")
    return rate


class LabelNoise:
    """Corrupts exactly ``round(rate * N)`` labels, chosen uniformly at random.

    ``symmetric``: the new label is uniform over the other classes; ``pairflip``: c -> c+1 mod K;
    ``none``: labels are left alone (rate must be 0). ``classes`` (sorted) limits the new labels to the classes
    that some example truly has: with class 3 absent, pairflip sends 2 to 4 and symmetric never draws 3.
    """

    KINDS = ("symmetric", "pairflip", "none")

    def __init__(self, kind: str = "symmetric", rate: float = 0.2, seed: int = 0):
        if kind not in self.KINDS:
            raise DataConfigError(f"unknown noise kind {kind!r}; choose one of {', '.join(self.KINDS)} (or noise=confusion)")
        rate = _rate(rate)
        if kind == "none" and rate != 0:
            raise DataConfigError(f"noise=none corrupts nothing but noise.rate={rate}; drop the rate or pick noise=symmetric")
        self.kind, self.rate, self.seed = kind, float(rate), int(seed)

    def __call__(self, labels: torch.Tensor, num_classes: int = NUM_CLASSES, classes: torch.Tensor | None = None,
                 images: torch.Tensor | None = None, reference=None) -> torch.Tensor:
        classes = torch.arange(num_classes) if classes is None else classes
        if len(classes) < 2 and self.kind != "none":
            raise DataConfigError(f"noise={self.kind} needs at least 2 classes, the data has {len(classes)}")
        observed = labels.clone()
        n_flip = int(round(self.rate * len(labels))) if self.kind != "none" else 0
        if n_flip == 0:
            return observed
        gen = torch.Generator().manual_seed(self.seed)
        flip = torch.randperm(len(labels), generator=gen)[:n_flip]
        k = len(classes)
        position = torch.searchsorted(classes, labels[flip])  # the label's place among the classes that exist
        if self.kind == "pairflip":
            observed[flip] = classes[(position + 1) % k]
        else:  # a uniform draw over the k-1 other classes
            shift = torch.randint(1, k, (n_flip,), generator=gen)
            observed[flip] = classes[(position + shift) % k]
        return observed




class ConfusionNoise:
    """Instance-dependent label noise, after Chen et al. (2021), "Beyond Class-Conditional Assumption: A Primary
    Attempt to Combat Instance-Dependent Label Noise" (AAAI): label errors that look like human ones.

    A reference classifier, trained with clean labels on data disjoint from the pool (the run's test set), reads
    every pool image. Exactly ``round(rate · N)`` images are corrupted, drawn without replacement with probability
    proportional to how strongly the reference believes a wrong class (its largest wrong-class probability), and each
    gets that class: the one the image is confused with. Chen et al. corrupt the r% most confusing images outright;
    drawing in proportion keeps the rate exact while hard images are corrupted more often, not always. Seeded and
    deterministic. ``reference`` gives the reference's class probabilities for the pool's images
    (``training.ReferenceClassifier``: the run's model, optimizer and trainer settings, trained through the run's own
    training loop, its probabilities cached by the content of its training data and of the pool).
    """

    kind = "confusion"

    def __init__(self, rate: float = 0.2, seed: int = 0, reference=None):
        self.rate, self.seed = _rate(rate), int(seed)
        if not callable(reference):
            raise DataConfigError("noise=confusion needs noise.reference, the reference classifier (model, optimizer, "
                                  "trainer); start from conf/noise/confusion.yaml")
        self.reference_probabilities = reference

    def __call__(self, labels: torch.Tensor, num_classes: int = NUM_CLASSES, classes: torch.Tensor | None = None,
                 images: torch.Tensor | None = None, reference=None) -> torch.Tensor:
        n_flip = int(round(self.rate * len(labels)))
        if n_flip == 0:
            return labels.clone()
        if images is None or reference is None:
            raise DataConfigError("noise=confusion needs the pool's images and a clean set disjoint from the pool to train "
                                  "its reference classifier on (the run's test set)")
        probs = torch.as_tensor(self.reference_probabilities(images, reference, num_classes), dtype=torch.float64)
        wrong = probs.clone()
        wrong[torch.arange(len(labels)), labels] = 0.0
        if classes is not None:  # only into classes that some example truly has
            absent = torch.ones(probs.shape[1], dtype=torch.bool)
            absent[classes] = False
            wrong[:, absent] = 0.0
        confusion, target = wrong.max(1)
        gen = torch.Generator().manual_seed(self.seed)
        flip = torch.multinomial(confusion.clamp_min(torch.finfo(torch.float64).tiny), n_flip, replacement=False, generator=gen)
        observed = labels.clone()
        observed[flip] = target[flip]
        return observed


def read_labels_file(path: str | Path, key: str | None, originals: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Labels that replace the data source's own, one per example of its training split in the source's order: the
    way CIFAR-10N's human label sets are used (``data.labels_file=CIFAR-10_human.pt data.labels_key=worse_label``).
    The file's labels are the observed ones and the source's the ground truth.

    Formats: a ``.pt`` (torch.save) or ``.npz`` file holding a dict, whose array ``key`` names (CIFAR-10N: worse_label,
    aggre_label, random_label1..3), or holding the array itself (``.pt``, ``.npy``); or a text file with one label per
    line. A dict that also holds ``clean_label`` (as CIFAR-10N's does) must agree with the source's labels, so a file
    made for another data set or order is refused."""
    setting = "data.labels_file"
    path = Path(path)
    if not path.is_file():
        raise DataConfigError(f"{setting}={str(path)!r} is not a file (resolved to {path.resolve()}); give a file with one "
                              f"label per training example (e.g. CIFAR-10N's CIFAR-10_human.pt with data.labels_key=worse_label)")
    content = _read_labels(path, setting)
    if isinstance(content, dict):
        if key is None or key not in content:
            named = " is not set" if key is None else f"={key!r} is not among them"
            raise DataConfigError(f"{setting}: {path} holds the arrays {sorted(content)}; data.labels_key{named}: name the "
                                  f"labels to use, {_which_key(content, originals, num_classes)}")
        clean = content.get("clean_label")
        labels = content[key]
    else:
        if key is not None:
            raise DataConfigError(f"{setting}: {path} holds one array, not named ones; drop data.labels_key={key!r}")
        clean, labels = None, content
    labels = _label_array(labels, f"{setting} ({path}{'' if key is None else ', ' + key})", len(originals), num_classes)
    if clean is not None:
        clean = _label_array(clean, f"{setting} ({path}, clean_label)", len(originals), num_classes)
        differ = int((clean != originals).sum())
        if differ:
            raise DataConfigError(f"{setting}: the file's clean_label differs from the data's own labels at {differ} of "
                                  f"{len(originals)} examples: the file was made for another data set or another order "
                                  f"of it; use the file that goes with data.source")
    return labels


# array names that say "the true labels" (CIFAR-10N's clean_label): never the one to suggest as the observed labels
CLEAN_NAMES = re.compile(r"clean|true|gt|ground|orig", re.IGNORECASE)


def _which_key(content: dict, originals: torch.Tensor, num_classes: int) -> str:
    """A suggestion for ``data.labels_key`` among a labels file's arrays: one whose labels differ from the source's
    (observed labels with errors to find), never one equal to them (CIFAR-10N's clean_label: no errors at all), with
    how many labels each array changes; by the names where no array fits the data."""
    changes = {}
    for name in sorted(content):
        with contextlib.suppress(DataConfigError):  # not one label per example of this data: no count
            changes[name] = int((_label_array(content[name], name, len(originals), num_classes) != originals).sum())
    noisy = sorted((name for name, count in changes.items() if count), key=lambda name: (bool(CLEAN_NAMES.search(name)), name))
    if noisy:
        counted = ", ".join(f"{name} {changes[name]}" for name in noisy)
        same = [name for name, count in changes.items() if not count]
        return (f"e.g. data.labels_key={noisy[0]} (of the source's {len(originals)} labels, {counted} differ"
                + (f"; {', '.join(same)} equal{'s' if len(same) == 1 else ''} them, so it would leave no errors to find"
                   if same else "") + ")")
    if changes:
        return (f"but {'each of them equals' if len(changes) > 1 else 'it equals'} the source's own labels, so there "
                f"would be no errors to find; give a file of the observed (noisy) labels")
    names = sorted(content, key=lambda name: (bool(CLEAN_NAMES.search(name)), name))
    return f"e.g. data.labels_key={names[0]} (none of them is one label per training example of this data yet)"


def _read_labels(path: Path, setting: str):
    try:
        if path.suffix in (".npz", ".npy", ".pt"):
            return load_arrays(path)
        return np.array([int(line) for line in path.read_text().split()])
    except Exception as err:  # a damaged or foreign file raises various errors inside torch or numpy

        raise DataConfigError(f"{setting}={str(path)!r} cannot be read ({why_unreadable(err)}); save the labels as a "
                              f"tensor, a numpy array or a dict of them (torch.save({{'worse_label': labels}}, path), "
                              f"numpy.save or numpy.savez), or as text with one label per line") from err


def _label_array(values, what: str, size: int, num_classes: int) -> torch.Tensor:
    labels = torch.as_tensor(np.asarray(values))
    if labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise DataConfigError(f"{what}: holds {tuple(labels.shape)} {labels.dtype} values; the labels must be one integer "
                              f"class per example")
    if len(labels) != size:
        raise DataConfigError(f"{what}: holds {len(labels)} labels, the data source's training split has {size} examples; "
                              f"the file must give one label per example, in the source's order")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataConfigError(f"{what}: labels run from {int(labels.min())} to {int(labels.max())}; the data's classes are "
                              f"0..{num_classes - 1}")
    return labels.long()
