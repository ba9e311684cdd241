"""MNIST digit pairs (data=mnist_pairs): two MNIST digits side by side, a 100-class data set built offline from the
MNIST files beside the checkout (../shared/data); skipped where they are absent."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from pmp_lightning.config import register_configs
from pmp_lightning.data.digit_pairs import DigitPairs
from pmp_lightning.errors import DataConfigError

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_mnist = pytest.mark.skipif(not (SHARED / "MNIST" / "raw").is_dir(), reason=f"no MNIST files in {SHARED}")


@pytest.fixture(scope="module")
def mnist():
    """MNIST's two splits as the project's MNIST source gives them: (N, 1, 28, 28) floats in [0, 1]."""
    from pmp_lightning.data.sources import TorchvisionSource

    return TorchvisionSource("MNIST", str(SHARED), download=False).load()


@pytest.fixture(scope="module")
def pairs():
    source = DigitPairs(str(SHARED), download=False, size=1000, test_size=300, seed=0)
    main, test = source.load()
    return source, main, test


@needs_mnist
def test_pairs_are_two_mnist_images_side_by_side_labelled_as_the_number_they_read(pairs, mnist):
    source, main, test = pairs
    assert main.x.shape == (1000, 1, 28, 56) and test.x.shape == (300, 1, 28, 56)
    for split in (main, test):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert float(split.x.min()) == 0.0 and float(split.x.max()) == 1.0  # MNIST's scale, values untouched
        assert 0 <= int(split.y.min()) and int(split.y.max()) <= 99
    # each half is an MNIST image of the same split, found by its pixels alone, and the label reads the two digits
    for split, digits, name in ((main, mnist[0], "main"), (test, mnist[1], "test")):
        label_of = {}
        for image, label in zip(digits.x.flatten(1).numpy(), digits.y.tolist()):
            label_of.setdefault(image.tobytes(), set()).add(label)
        halves = (split.x[..., :28], split.x[..., 28:])
        left, right = ([label_of[h.numpy().tobytes()] for h in half.flatten(1)] for half in halves)
        assert all(len(a) == 1 and len(b) == 1 for a, b in zip(left, right))  # an MNIST image, of one digit
        assert [10 * min(a) + min(b) for a, b in zip(left, right)] == split.y.tolist()
        # source_index says which images they are
        index = source.source_index[name]
        assert torch.equal(split.x[..., :28], digits.x[index[:, 0]]) and torch.equal(split.x[..., 28:], digits.x[index[:, 1]])
        assert len({tuple(p) for p in index.tolist()}) == len(index)  # no pair of images twice


@needs_mnist
def test_every_class_is_there_and_the_classes_are_balanced(pairs):
    _, main, test = pairs
    assert torch.bincount(main.y, minlength=100).tolist() == [10] * 100
    assert set(torch.bincount(test.y, minlength=100).tolist()) == {3}  # 300 pairs: 3 a class
    assert DigitPairs.num_classes == 100


@needs_mnist
def test_the_same_seed_gives_the_same_pairs_and_another_seed_others(pairs):
    _, main, test = pairs
    again_main, again_test = DigitPairs(str(SHARED), download=False, size=1000, test_size=300, seed=0).load()
    assert torch.equal(main.x, again_main.x) and torch.equal(main.y, again_main.y)
    assert torch.equal(test.x, again_test.x) and torch.equal(test.y, again_test.y)
    other_main, _ = DigitPairs(str(SHARED), download=False, size=1000, test_size=300, seed=1).load()
    assert not torch.equal(main.y, other_main.y) and not torch.equal(main.x, other_main.x)
    # each split draws from its own stream: the main split does not depend on the test split's size, nor on its being
    smaller = DigitPairs(str(SHARED), download=False, size=1000, test_size=None, seed=0)
    alone, no_test = smaller.load()
    assert no_test is None and torch.equal(alone.x, main.x) and "no test split" in smaller.describe()


def test_a_missing_mnist_says_where_it_was_looked_for(tmp_path):
    with pytest.raises(DataConfigError) as missing:
        DigitPairs(str(tmp_path / "nowhere"), download=False, size=10, test_size=10).load()
    message = str(missing.value)
    assert message.startswith("data.source builds its digit pairs from MNIST, and could not load MNIST from "
                              f"data.source.root='{tmp_path / 'nowhere'}'")
    assert "no such folder" in message and message.endswith("or go online with data.source.download=true")
    with pytest.raises(DataConfigError, match=r"data.source.size=0: give how many digit pairs to build"):
        DigitPairs(str(tmp_path), size=0)
    with pytest.raises(DataConfigError, match=r"data.source.test_size=2.5: .* or null for no test split"):
        DigitPairs(str(tmp_path), test_size=2.5)


def test_describe_names_the_sizes_the_seed_and_the_root():
    text = DigitPairs("some/root", size=20_000, test_size=5_000, seed=3).describe()
    assert "20,000 pairs from MNIST's training split and 5,000 from its test split" in text
    assert "seed 3" in text and "some/root" in text and "00–99" in text


@needs_mnist
def test_the_data_config_sets_up_a_100_class_pool(tmp_path):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=noisy_mnist", "data=mnist_pairs", f"data.source.root={SHARED}",
                                           "data.source.download=false", "data.source.size=900", "data.source.test_size=200",
                                           "data.downstream_size=300", "data.test_size=200", "scoring.canaries=0",
                                           "logger=none", f"paths.root_dir={ROOT}", f"paths.output_dir={tmp_path}",
                                           f"paths.cache_dir={tmp_path / 'cache'}"])
    assert cfg.data.source._target_ == "pmp_lightning.data.digit_pairs.DigitPairs"
    dm = instantiate(cfg.data, noise=instantiate(cfg.noise), canaries=0)
    dm.setup()
    assert dm.num_classes == 100
    assert len(dm.pool) == 600 and len(dm.downstream) == 300 and len(dm.test_set) == 200
    assert dm.pool.x.shape[1:] == (1, 28, 56) and dm.test_set.x.shape[1:] == (1, 28, 56)
    assert len(dm.downstream.y.unique()) > 90  # 300 drawn of 100 balanced classes: nearly every one
    assert 0.1 < dm.is_mislabeled.mean() < 0.3  # noisy_mnist's 20% symmetric noise, over the 100 classes
    assert int(dm.observed_labels.max()) < 100 and len(dm.observed_labels.unique()) == 100
    # the defaults: 20,000 main pairs, J of 2,000, the pool the rest, the whole test split as test set
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        full = compose("config", overrides=["data=mnist_pairs"])
    assert (full.data.source.size, full.data.source.test_size, full.data.downstream_size, full.data.test_size,
            full.data.pool_size) == (20000, 5000, 2000, 5000, None)
