"""Labelled data, a classifier's task: the pool with its (noisy) labels, a clean downstream set defining J, a clean test
set and the training set, drawn from a source (``data/sources.py``), with label noise (``data/noise.py``), known
errors, a labels file of your own, canaries and a trusted downstream set of your own (``TrustedSet``).

Every dataset yields ``(x, y, i)`` where ``i`` is the example's position in its split, so per-example outputs can be
written at the right place; ``PoolDataModule.pool_index`` maps the pool's positions to the source split's own indices
(the ``index`` column of ``scores.csv``).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from pmp_lightning.data.base import IndexedDataset, TaskDataModule
from pmp_lightning.data.noise import LabelNoise, read_labels_file
from pmp_lightning.data.sources import Images, check_source
from pmp_lightning.errors import DataConfigError

MAX_INDEX = 2**62  # far beyond any data set; a larger "index" is a typo or a different column


def read_known_errors(path: str | Path) -> tuple[np.ndarray, int]:
    """The distinct source indices listed in a known-errors file and how many entries listed them: integers
    separated by newlines, commas or spaces (``#`` starts a comment), or a CSV file whose header has an ``index``
    column. An index listed more than once counts once, with a warning that names the repeats."""
    path = Path(path)
    if not path.is_file():
        raise DataConfigError(f"data.known_errors={str(path)!r} is not a file (resolved to {path.resolve()}); give a file of "
                              f"known-wrong source indices, one per line")
    lines = [(n, line.split("#", 1)[0].strip()) for n, line in enumerate(path.read_text().splitlines(), start=1)]
    lines = [(n, line) for n, line in lines if line]
    header = [c.strip() for c in lines[0][1].split(",")] if lines else []
    if "index" in header:
        column = header.index("index")
        tokens = [(n, line.split(",")[column].strip() if len(line.split(",")) > column else "") for n, line in lines[1:]]
    else:
        tokens = [(n, tok) for n, line in lines for tok in line.replace(",", " ").split()]
    seen: dict[int, list[int]] = {}
    for line_no, tok in tokens:
        try:
            value = int(tok)
        except ValueError:
            hint = (" (a CSV file needs a column named 'index' in its header line, e.g. 'index,note'; a plain file holds "
                    "integers separated by newlines, commas or spaces)" if line_no == lines[0][0] and "," in lines[0][1] else "")
            raise DataConfigError(f"data.known_errors: {path} line {line_no} holds {tok!r}, not a source index{hint}") from None
        if value < 0:
            raise DataConfigError(f"data.known_errors: {path} line {line_no} holds {value}; source indices are ≥ 0")
        if value > MAX_INDEX:
            raise DataConfigError(f"data.known_errors: {path} line {line_no} holds {value}, beyond any data set's size; source "
                                  f"indices are positions 0..N-1 in the source (fix that line)")
        seen.setdefault(value, []).append(line_no)
    repeats = {i: where for i, where in seen.items() if len(where) > 1}
    if repeats:
        named = "; ".join(f"{i} on lines {', '.join(map(str, where))}" for i, where in list(repeats.items())[:5])
        warnings.warn(f"data.known_errors: {path} lists {sum(len(w) - 1 for w in repeats.values())} duplicate entries "
                      f"({named}{' …' if len(repeats) > 5 else ''}); each index counts once: {len(seen)} distinct of "
                      f"{len(tokens)} listed", stacklevel=2)
    return np.array(sorted(seen), dtype=np.int64), len(tokens)


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


class TrustedSet:
    """A downstream set whose labels the user trusts (``data.downstream``), defining J instead of examples drawn from
    the data source beside the pool.

    ``source``: any data source (``TensorSource`` for a file, ``DatasetSource``, ``TorchvisionSource``), or None for
    the run's own source; ``split``: its ``main`` or ``test`` split; ``size``: examples drawn from it (null: all that
    are left); ``label_noise``: a fraction of its labels made wrong on purpose (symmetric, seeded), to measure what
    an imperfect set costs.
    """

    def __init__(self, source=None, split: str = "main", size: int | None = None, label_noise: float = 0.0, seed: int = 0):
        if split not in ("main", "test"):
            raise DataConfigError(f"data.downstream.split={split!r}: give main or test")
        if source is None and split == "main":
            raise DataConfigError("data.downstream from the run's own source needs split=test (the training split is the "
                                  "pool's); give a source of its own (downstream=file or dataset) for anything else")
        self.source, self.split, self.size, self.seed = source, split, size, int(seed)
        if source is not None:
            source.setting = "data.downstream.source"
        self.label_noise = float(label_noise)
        self.wrong_labels = 0
        own_name = getattr(source, "path", None) or getattr(source, "name", None) or type(source).__name__
        self.name = f"{own_name} ({split} split)" if source is not None else "the data source's test split"

    def draw(self, own: dict, num_classes: int) -> IndexedDataset:
        """The set's examples: from the run's own test split (what the other splits left of it) or from its own source,
        with ``label_noise`` of the labels made wrong."""
        if self.source is None:
            images, draw = own["test"]
            if draw is None:
                raise DataConfigError("data.downstream: the data source has no test split; use downstream=file or dataset")
            idx = draw.take(self.size, "trusted downstream set (data.downstream.size)")
        else:
            main, test = self.source.load()
            images = main if self.split == "main" else test
            if images is None:
                raise DataConfigError(f"data.downstream: {type(self.source).__name__} has no test split; set "
                                      f"data.downstream.split=main")
            check_source(images, None, getattr(self.source, "num_classes", None) or num_classes, "data.downstream")
            idx = _Draw(images, torch.Generator().manual_seed(self.seed), self.name).take(
                self.size, "trusted downstream set (data.downstream.size)")
        x, y = images.x[idx], images.y[idx]
        if int(y.max()) >= num_classes:
            raise DataConfigError(f"data.downstream holds label {int(y.max())}, but the data has {num_classes} classes")
        noisy = LabelNoise("symmetric", self.label_noise, self.seed)(y, num_classes)
        self.wrong_labels = int((noisy != y).sum())
        return IndexedDataset(x, noisy)


class PoolDataModule(TaskDataModule):
    """The scored pool, a clean downstream set defining J, a clean test set, and the training set.

    ``pool_mode='train'``: the trajectory trains on the (noisy) pool, which is what is scored.
    ``pool_mode='holdout'``: the trajectory trains on ``train_size`` clean examples (``None``: all
    that remain) and a disjoint held-out pool with corrupted labels is scored.
    ``pool_mode='test'`` (sources with a test split): the trajectory trains on the training split and
    the pool is ``pool_size`` test images with corrupted labels, as in the original problem report.
    With ``downstream_includes_pool`` the downstream set is the whole test split, the pool's images
    with their true labels included: the report's set-up, which leaks the answers into J (warned).
    ``pool_size=None`` takes every example left after the downstream (and test) sets.

    ``downstream``: a trusted downstream set of its own (``TrustedSet``: a file, a dataset, or the test split) instead
    of ``downstream_size`` examples drawn from the training source; it is drawn after every other split, so the
    pool, its noise and the trajectory do not depend on it, and it must share no image with the pool.

    ``labels_file`` (and ``labels_key`` for a file of named arrays): labels that replace the source's own for the pool, one
    per training-split example (CIFAR-10N's human labels; format in ``noise.read_labels_file``): the file's labels are
    observed, the source's the ground truth. With pool=holdout the training set keeps the source's labels.

    ``known_errors``: a file of source indices known to be mislabeled (e.g. from a human review; format in
    ``read_known_errors``). They count as mislabeled beside any synthetic noise, so detection is measured
    against both; listed indices that are not in the pool are skipped with a warning.
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
        known_errors: str | None = None,
        downstream: "TrustedSet | None" = None,
        canaries: int = 0,
        labels_file: str | None = None,
        labels_key: str | None = None,
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
        self.known_errors = known_errors
        if labels_file is not None and pool_mode == "test":
            raise DataConfigError("data.labels_file replaces the labels of the source's training split, but pool=test scores "
                                  "test-split images; use pool=train or pool=holdout")
        if labels_file is not None and getattr(noise, "rate", 0) > 0:
            raise DataConfigError(f"data.labels_file gives the observed labels, and noise={getattr(noise, 'kind', 'noise')} "
                                  f"would corrupt them again (noise.rate={noise.rate}); add noise=none")
        if labels_key is not None and labels_file is None:
            raise DataConfigError(f"data.labels_key={labels_key!r} names an array of data.labels_file, which is not set")
        self.labels_file, self.labels_key = labels_file, labels_key
        self.trusted = downstream
        self.canaries = canaries
        self._canary_source = None  # J drawn from the data: the canaries' 2k images, drawn beside it (_draw_canaries)
        self._ready = False

    # ------------------------------------------------------------------ splits
    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        main, test_split = self.source.load()
        self.num_classes = check_source(main, test_split, getattr(self.source, "num_classes", None))
        gen = torch.Generator().manual_seed(self.split_seed)
        train_draw = _Draw(main, gen, "the training source")
        test_draw = _Draw(test_split, gen, "the test split") if test_split is not None else None

        trusted = self.trusted is not None
        if self.pool_mode == "test":
            if test_draw is None:
                raise DataConfigError(f"pool=test scores test-split images but {type(self.source).__name__} has no test "
                                      f"split; use data=mnist or data=fashion_mnist")
            pool_src, pool_idx = test_split, test_draw.take(self.pool_size, "pool (data.pool_size)")
            if self.downstream_includes_pool:  # the reported set-up: J is the whole test split
                self.downstream = IndexedDataset(test_split.x, test_split.y)
            else:
                self._draw_downstream(test_split, test_draw)
            test_idx = self._draw_with_canaries(test_split, test_draw, self.test_size, "test set (data.test_size)")
            self.test_set = IndexedDataset(test_split.x[test_idx], test_split.y[test_idx])
            train_idx = train_draw.take(self.train_size, "training set (data.train_size)")
        else:
            test_src, test_from = (main, train_draw) if test_split is None else (test_split, test_draw)
            test_idx = test_from.take(self.test_size, "test set (data.test_size)")
            self.test_set = IndexedDataset(test_src.x[test_idx], test_src.y[test_idx])
            self._draw_downstream(main, train_draw)
            pool_src = main
            if self.pool_mode == "holdout":
                pool_idx = train_draw.take(self.pool_size, "held-out pool (data.pool_size)")
                if self.train_size is None and len(train_draw.rest()) <= 2 * self.canaries:
                    raise DataConfigError("pool=holdout leaves no examples to train on; lower data.pool_size or set data.train_size")
                train_idx = self._draw_with_canaries(main, train_draw, self.train_size, "clean training set (data.train_size)")
            else:
                pool_idx = train_idx = self._draw_with_canaries(main, train_draw, self.pool_size, "pool (data.pool_size)")
        if trusted:  # drawn last, so the pool, its noise and the trajectory do not depend on it
            self.downstream = self.trusted.draw({"main": (main, train_draw), "test": (test_split, test_draw)},
                                                self.num_classes)

        self.pool_index = pool_idx.numpy()
        self.true_labels = pool_src.y[pool_idx].clone()
        if len(self.true_labels.unique()) < 2:
            raise DataConfigError(
                f"the pool holds a single class ({int(self.true_labels[0])}) in its {len(self.true_labels)} examples: "
                f"label noise and detection need several classes; raise data.pool_size"
            )
        self.observed_labels = self._observed_labels(main, pool_src, pool_idx, train_idx)
        self.known_error_mask = self._known_errors(len(pool_src))
        self.pool = IndexedDataset(pool_src.x[pool_idx], self.observed_labels)
        self.train_set = self.pool if self.pool_mode == "train" else IndexedDataset(main.x[train_idx], main.y[train_idx])
        self._hold_out_canaries()
        shared = self.check_overlap()
        if shared and trusted:
            raise DataConfigError(f"the trusted downstream set (data.downstream) shares {shared} images with the pool; J must "
                                  f"not contain examples it scores: remove them from the set, or draw it elsewhere")
        self.downstream_note = self._describe_downstream()
        self._ready = True

    def _observed_labels(self, main: Images, pool_src: Images, pool_idx: torch.Tensor, train_idx: torch.Tensor):
        """The pool's labels as observed: a labels file's (the source's are the ground truth), or the noise's."""
        if self.labels_file is not None:
            return read_labels_file(self.labels_file, self.labels_key, main.y, self.num_classes)[pool_idx]
        return self.noise(self.true_labels, self.num_classes, self._noise_classes(main.y[train_idx]),
                          images=pool_src.x[pool_idx], reference=self.test_set)

    def _draw_with_canaries(self, images: Images, draw: "_Draw", size: int | None, what: str) -> torch.Tensor:
        """A set of ``size`` examples (null: the rest of the draw) and the canaries beside it, drawn so that the set is
        the one the run without canaries draws when its size is given: the canaries after it, else before."""
        if size is None:
            self._draw_canaries(images, draw)
        idx = draw.take(size, what)
        if size is not None:
            self._draw_canaries(images, draw)
        return idx

    def _draw_canaries(self, images: Images, draw: "_Draw") -> None:
        """With J drawn from the data, the canaries' ``2 * canaries`` images are drawn beside it, as J is, after the
        pool: J, the pool and the test set stay those of the run without canaries (only a set of the rest of the
        images, a null data.pool_size, train_size or test_size, is 2k smaller). A trusted set gives its own
        (``_hold_out_canaries``), and these are set aside unused, as J's are (``_draw_downstream``), so either J trains
        on the same examples."""
        k = int(self.canaries)
        if not k or self.downstream_includes_pool or (self.trusted is not None and not self.downstream_size):
            return
        idx = draw.take(2 * k, f"canaries and controls (2 × scoring.canaries={k}, drawn beside J)")
        if self.trusted is None:
            self._canary_source = IndexedDataset(images.x[idx], images.y[idx])

    def _hold_out_canaries(self) -> None:
        """``canaries`` examples with a label made wrong on purpose, and as many with their own label (controls),
        scored beside the pool and kept out of J: a variant that ranks the canaries below the controls finds wrong
        labels, and the run's data, not the pool's ground truth, says so (``scoring.rank_by=auto``). With J drawn from
        the data they are drawn beside it (J keeps its size); a trusted set gives up its first 2k examples for them.
        With pool=train they join the training set, as the pool's own examples do. ``scored`` is what the replay scores:
        the pool, then the canaries, then the controls (``canary_mask`` marks the canaries among the last two)."""
        self.scored, self.canary_mask = self.pool, None
        k = int(self.canaries)
        if not k:
            return
        held = self._canary_source
        if held is None:
            if k < 0 or 2 * k > len(self.downstream) - 20:
                raise DataConfigError(f"scoring.canaries={k}: twice that many examples are held out of the downstream set "
                                      f"({len(self.downstream)} examples), and J keeps at least 20; lower it, or give a "
                                      f"larger downstream set (data.downstream.size)")
            held = IndexedDataset(self.downstream.x[: 2 * k], self.downstream.y[: 2 * k])
            self.downstream = IndexedDataset(self.downstream.x[2 * k :], self.downstream.y[2 * k :])
        gen = torch.Generator().manual_seed(self.split_seed + 7919)
        shift = torch.randint(1, self.num_classes, (k,), generator=gen)
        wrong = (held.y[:k] + shift) % self.num_classes
        held = IndexedDataset(held.x, torch.cat([wrong, held.y[k:]]))
        self.canary_mask = np.arange(2 * k) < k
        self.scored = IndexedDataset(torch.cat([self.pool.x, held.x]), torch.cat([self.pool.y, held.y]))
        if self.pool_mode == "train":
            self.train_set = self.scored

    def _draw_downstream(self, images: Images, draw: "_Draw") -> None:
        """J's ``downstream_size`` examples, drawn beside the pool. With a trusted set they are set aside all the same,
        unused, so that the pool, its noise and the trajectory are those of the run with J drawn from the data: the
        two J's score the same pool from the same trajectory (``data.downstream_size=0`` pools them instead)."""
        if self.trusted is not None and not self.downstream_size:
            return
        idx = draw.take(self.downstream_size, "downstream set (data.downstream_size)" if self.trusted is None else
                        "set-aside drawn downstream set (data.downstream_size; with a trusted set it is set aside unused, "
                        "so the pool is the one J drawn from the data scores; data.downstream_size=0 pools it instead)")
        if self.trusted is None:
            self.downstream = IndexedDataset(images.x[idx], images.y[idx])

    def _describe_downstream(self) -> dict:
        """Where J's examples come from, for the log and metrics.json; in real-data mode (no synthetic noise) without a
        trusted set, a warning that J comes from the same unverified data as the pool."""
        if self.trusted is not None:
            note = {"source": self.trusted.name, "size": len(self.downstream), "label_noise": self.trusted.label_noise,
                    "wrong_labels": self.trusted.wrong_labels}
            trained = torch.unique(torch.cat([self.train_set.y, self.true_labels])).tolist()
            missing = sorted(set(trained) - set(torch.unique(self.downstream.y).tolist()))
            if missing:
                note["missing_classes"] = missing
                note["class_warning"] = (f"the trusted downstream set (data.downstream) holds no example of class(es) "
                                   f"{missing[:10]}{' …' if len(missing) > 10 else ''} of the {len(trained)} the model "
                                   f"trains on: J cannot credit or blame pool examples through those classes, and "
                                   f"detection suffers; give it examples of every class")
                warnings.warn(note["class_warning"], stacklevel=3)
            return note
        note = {"source": "drawn from the data source, beside the pool", "size": len(self.downstream)}
        if getattr(self.noise, "rate", 0) == 0 and self.labels_file is None:
            note["warning"] = (f"J comes from {len(self.downstream)} examples of the same data as the pool, whose labels "
                               f"are not verified: a source with label errors puts some of them into J. Give a small set "
                               f"you trust as data.downstream (downstream=file, dataset or test_split)")
            warnings.warn(note["warning"], stacklevel=3)
        return note

    def _noise_classes(self, train_labels: torch.Tensor) -> torch.Tensor:
        """The classes label noise may flip into: those some pool or training example truly has. A pool that lacks
        a class of the K is worth a word: K comes from the data, and the model keeps K outputs."""
        in_pool = torch.unique(self.true_labels)
        if len(in_pool) < self.num_classes and self.noise.rate > 0:
            missing = sorted(set(range(self.num_classes)) - set(in_pool.tolist()))
            warnings.warn(f"the pool holds no example of class(es) {missing[:10]}{' …' if len(missing) > 10 else ''} "
                          f"of the data's {self.num_classes}: label noise flips labels only into classes that some pool "
                          f"or training example truly has, and the model keeps {self.num_classes} outputs", stacklevel=3)
        return torch.unique(torch.cat([in_pool, train_labels]))

    def _known_errors(self, source_size: int) -> np.ndarray:
        """The pool positions listed in ``known_errors`` (all False without a file); warns about the rest."""
        mask = np.zeros(len(self.pool_index), dtype=bool)
        if self.known_errors is None:
            self.known_error_counts = None
            return mask
        listed, entries = read_known_errors(self.known_errors)
        mask = np.isin(self.pool_index, listed)
        skipped = len(listed) - int(mask.sum())
        self.known_error_counts = {"listed": len(listed), "in_pool": int(mask.sum()), "skipped": skipped,
                                   "duplicates": entries - len(listed)}
        if skipped:
            beyond = int((listed >= source_size).sum())
            warnings.warn(
                f"data.known_errors: {skipped} of the {len(listed)} listed indices are not in the pool, skipped "
                f"({beyond} beyond the source's {source_size} examples, {skipped - beyond} in its other splits); the pool "
                f"holds {len(self.pool_index)} examples",
                stacklevel=2,
            )
        return mask

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
        """The ground truth detection is measured against: synthetic label noise or a listed known error."""
        return (self.true_labels != self.observed_labels).numpy() | self.known_error_mask

    def ground_truth(self) -> dict[str, np.ndarray]:
        """What ``ground_truth.npz`` holds, written before training."""
        return {"index": self.pool_index, "true_label": self.true_labels.numpy(),
                "observed_label": self.observed_labels.numpy(), "is_mislabeled": self.is_mislabeled}

    def pool_columns(self) -> dict[str, list]:
        """What scores.csv says of each pool example before its scores. is_mislabeled: synthetic noise (true_label !=
        observed_label) or a listed known error (known_error = 1)."""
        return {"index": self.pool_index.tolist(), "true_label": self.true_labels.tolist(),
                "observed_label": self.observed_labels.tolist(), "is_mislabeled": self.is_mislabeled.astype(int).tolist(),
                "known_error": self.known_error_mask.astype(int).tolist()}

    def suspect_columns(self, predicted: np.ndarray | None) -> dict[str, list]:
        """What suspects.csv says of each pool example: its label and the trained model's."""
        return {"index": self.pool_index.tolist(), "observed_label": self.observed_labels.tolist(),
                "predicted_label": predicted.tolist()}
