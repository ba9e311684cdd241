"""Label noise, splits, and the data sources."""
import warnings
from pathlib import Path

import pytest
import torch

from pmp_lightning.data.labelled import PoolDataModule
from pmp_lightning.data.sources import MlxtendMNIST, TorchvisionSource
from pmp_lightning.data.noise import LabelNoise
from pmp_lightning.errors import DataConfigError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_symmetric_noise_flips_exactly_the_rate_to_other_classes():
    labels = torch.arange(1000) % 10
    noisy = LabelNoise("symmetric", 0.3, seed=3)(labels)
    flipped = noisy != labels
    assert int(flipped.sum()) == 300
    assert set(((noisy[flipped] - labels[flipped]) % 10).tolist()) == set(range(1, 10))  # every other class is reached


def test_pairflip_moves_each_corrupted_label_to_the_next_class():
    labels = torch.arange(500) % 10
    noisy = LabelNoise("pairflip", 0.2)(labels)
    flipped = noisy != labels
    assert int(flipped.sum()) == 100 and torch.equal(noisy[flipped], (labels[flipped] + 1) % 10)


def test_noise_is_seeded():
    labels = torch.arange(200) % 10
    assert torch.equal(LabelNoise("symmetric", 0.2, seed=1)(labels), LabelNoise("symmetric", 0.2, seed=1)(labels))
    assert not torch.equal(LabelNoise("symmetric", 0.2, seed=1)(labels), LabelNoise("symmetric", 0.2, seed=2)(labels))


def test_unknown_noise_kind():
    with pytest.raises(DataConfigError, match="unknown noise kind 'uniform'; choose one of symmetric, pairflip, none"):
        LabelNoise("uniform", 0.2)


@pytest.mark.parametrize("mode", ["train", "holdout"])
def test_splits_are_disjoint_and_only_the_pool_is_noisy(mode):
    dm = PoolDataModule(MlxtendMNIST(), LabelNoise("symmetric", 0.2), pool_mode=mode, pool_size=1000, downstream_size=200, test_size=500)
    dm.setup()
    assert len(dm.pool) == 1000 and len(dm.downstream) == 200 and len(dm.test_set) == 500
    assert int(dm.is_mislabeled.sum()) == 200
    flat = lambda ds: {x.numpy().tobytes() for x in ds.x}  # noqa: E731  (image content, not positions)
    assert not flat(dm.pool) & flat(dm.downstream) and not flat(dm.pool) & flat(dm.test_set)
    if mode == "holdout":
        assert len(dm.train_set) == 5000 - 1000 - 200 - 500 and not flat(dm.train_set) & flat(dm.pool)
    else:
        assert dm.train_set is dm.pool
    x, y, i = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (1, 28, 28) and x.dtype == torch.float32 and i.dtype == torch.long


def test_pool_from_the_test_split_and_the_reported_leak():
    from tests.conftest import RandomSource

    source = RandomSource(n=100, test_n=50)
    fixed = PoolDataModule(source, LabelNoise("symmetric", 0.2), pool_mode="test", pool_size=20, downstream_size=10, test_size=None)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*downstream set shares")  # disjoint sets: no overlap warning
        fixed.setup()
    assert (len(fixed.pool), len(fixed.downstream), len(fixed.test_set), len(fixed.train_set)) == (20, 10, 20, 100)
    assert fixed.check_overlap() == 0

    leaky = PoolDataModule(source, LabelNoise("symmetric", 0.2), pool_mode="test", pool_size=20, test_size=None,
                           downstream_includes_pool=True)
    with pytest.warns(UserWarning, match="downstream set shares 20 images with the pool"):
        leaky.setup()
    assert len(leaky.downstream) == 50  # the whole test split, the pool's true labels included


def test_pool_from_a_test_split_that_is_not_there():
    with pytest.raises(DataConfigError, match="has no test split; use data=mnist"):
        PoolDataModule(MlxtendMNIST(), LabelNoise("symmetric", 0.2), pool_mode="test", pool_size=10).setup()


def test_holdout_with_nothing_left_to_train_on():
    dm = PoolDataModule(MlxtendMNIST(), LabelNoise("symmetric", 0.2), pool_mode="holdout", pool_size=3800, downstream_size=200, test_size=1000)
    with pytest.raises(DataConfigError, match="pool=holdout leaves no examples to train on"):
        dm.setup()


@pytest.mark.parametrize("name", ["MNIST", "FashionMNIST"])
def test_full_sets_load_offline_from_a_local_root(name):
    if not (SHARED_DATA / name / "raw").is_dir():
        pytest.skip(f"{SHARED_DATA / name / 'raw'} is not here")
    train, test = TorchvisionSource(name, str(SHARED_DATA), download=False).load()
    assert len(train) == 60000 and len(test) == 10000 and train.x.shape[1:] == (1, 28, 28)
    assert 0.0 <= float(train.x.min()) and float(train.x.max()) <= 1.0
    assert torch.bincount(test.y).tolist() == ([980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009] if name == "MNIST" else [1000] * 10)


def test_a_missing_local_root_says_where_to_point(tmp_path):
    with pytest.raises(DataConfigError, match=r"could not load MNIST from data.source.root=.*Point data.source.root at a folder"):
        TorchvisionSource("MNIST", str(tmp_path / "absent"), download=False).load()
