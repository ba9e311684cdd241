"""MNIST digit pairs: a 100-class image data set built offline from MNIST's own files.

Each example is two MNIST digits side by side read as a two-digit number: a 28 × 56 image (28 high, 56 wide), the
left digit's image in columns 0–27 and the right digit's in columns 28–55, labelled ``10 · left + right`` (0..99).
Both halves come from the same MNIST split: the training split's digits make the main split, the test split's the test
split, so no digit image is shared between the two.
"""
from __future__ import annotations

import numpy as np
import torch

from pmp_lightning.data.sources import Images, TorchvisionSource
from pmp_lightning.errors import DataConfigError

DIGITS = 10
SPLITS = ("main", "test")  # each split draws from a random stream of its own: its pairs do not depend on the other's size


class DigitPairs:
    """Pairs of MNIST digits as two-digit numbers (100 classes), read through torchvision's MNIST (``root``,
    ``download``: as ``TorchvisionSource``, whose messages name a missing data set and where it may be found).

    ``size`` pairs are built from MNIST's training split (the main split) and ``test_size`` from its test split (null or
    0: no test split; the data module then carves its test set out of the main split). Images are float32 in [0, 1],
    (N, 1, 28, 56), as MNIST's are (N, 1, 28, 28). The classes are balanced, each holding ``size // 100`` or one more
    pairs; each pair's two images are drawn at random among the MNIST images of its digits, and no pair of images
    occurs twice in a split. The same ``seed`` gives the same pairs (vectorised: a few seconds for the defaults, most of
    it torchvision reading MNIST). After ``load()``, ``source_index[split]`` holds each pair's (left, right) MNIST
    indices in that split.
    """

    setting = "data.source"  # where its settings live in the config, for messages (a trusted set moves it)
    name = "mnist_pairs"
    num_classes = DIGITS * DIGITS

    def __init__(self, root: str, download: bool = True, size: int = 20_000, test_size: int | None = 5_000, seed: int = 0):
        self.size = self._count(size, "size", optional=False)
        self.test_size = self._count(test_size, "test_size", optional=True)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise DataConfigError(f"{self.setting}.seed={seed!r}: give an integer")
        self.seed = int(seed)
        self.root, self.download = root, download
        self.mnist = TorchvisionSource("MNIST", root, download)  # MNIST's files, and the messages when they are missing
        self.source_index: dict[str, torch.Tensor] = {}

    def _count(self, value, key: str, optional: bool) -> int | None:
        if optional and not value:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise DataConfigError(f"{self.setting}.{key}={value!r}: give how many digit pairs to build (a positive "
                                  f"integer{', or null for no test split' if optional else ''})")
        return int(value)

    def describe(self) -> str:
        test = f" and {self.test_size:,} from its test split" if self.test_size else " (no test split)"
        return (f"MNIST digit pairs (two-digit numbers 00–99, 28 × 56 images): {self.size:,} pairs from MNIST's training "
                f"split{test}, seed {self.seed}, MNIST read from {self.root}")

    def load(self) -> tuple[Images, Images | None]:
        self.mnist.setting = self.setting
        try:
            train, test = self.mnist.load()
        except DataConfigError as err:
            raise DataConfigError(f"{self.setting} builds its digit pairs from MNIST, and {err}") from err
        main = self._pairs(train, self.size, "main")
        return main, (self._pairs(test, self.test_size, "test") if self.test_size else None)

    def _pairs(self, digits: Images, n: int, split: str) -> Images:
        """``n`` pairs of the images of ``digits`` (one MNIST split), seeded by the seed and the split."""
        rng = np.random.default_rng([self.seed, SPLITS.index(split)])
        labels = rng.permutation(np.arange(n) % self.num_classes)  # balanced: each class n // 100 or one more times
        left_digit, right_digit = labels // DIGITS, labels % DIGITS
        y = digits.y.numpy()
        counts = np.bincount(y, minlength=DIGITS)[:DIGITS]
        if (counts == 0).any():
            raise DataConfigError(f"{self.setting}: MNIST's {split} split holds no image of digit(s) "
                                  f"{np.flatnonzero(counts == 0).tolist()}; its files are damaged: download them again")
        by_digit = np.argsort(y, kind="stable")  # the images of digit d at by_digit[starts[d] : starts[d] + counts[d]]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])

        def image_of(digit: np.ndarray) -> np.ndarray:
            return by_digit[starts[digit] + rng.integers(0, counts[digit])]

        left, right = image_of(left_digit), image_of(right_digit)
        for _ in range(100):  # a pair of images drawn twice is drawn again (rare: a few in a million draws)
            _, first = np.unique(left * len(y) + right, return_index=True)
            repeat = np.ones(n, dtype=bool)
            repeat[first] = False
            if not repeat.any():
                break
            left[repeat], right[repeat] = image_of(left_digit[repeat]), image_of(right_digit[repeat])
        else:
            raise DataConfigError(f"{self.setting}: {n:,} distinct digit pairs cannot be drawn from MNIST's {split} split; "
                                  f"lower the number of pairs")
        index = torch.from_numpy(np.stack([left, right], 1)).long()
        self.source_index[split] = index
        x = torch.cat([digits.x[index[:, 0]], digits.x[index[:, 1]]], dim=-1)  # side by side: (n, 1, 28, 56)
        return Images(x, torch.from_numpy(labels).long())
