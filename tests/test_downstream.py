"""A trusted downstream set of the user's own (data.downstream), the real-data warning, and instance-dependent
noise (noise=confusion)."""
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from pmp_lightning.data.labelled import PoolDataModule, TrustedSet
from pmp_lightning.data.sources import DatasetSource
from pmp_lightning.errors import DataConfigError
from pmp_lightning.data.noise import ConfusionNoise, LabelNoise
from pmp_lightning.training import ReferenceClassifier
from pmp_lightning.pipeline import run
from tests.conftest import RandomSource
from tests.test_pipeline import make_cfg


def _digits_file(path, start, stop, test=False):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images[start:stop].reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)
    extra = {"x_test": x[:60], "y_test": d.target[start:start + 60]} if test else {}
    np.savez(path, x=x, y=d.target[start:stop], **extra)
    return path


TENSORS = ("data=tensors", "model=mlp", "model.in_features=64", "data.test_size=60", "data.pool_size=null",
           "trainer.max_epochs=2", "scoring.scores=[cosine,loss]",
           "scoring.canaries=0")  # J's source alone changes between the runs compared here (canaries: test_canaries.py)


@pytest.mark.slow
def test_a_trusted_set_from_a_file_defines_j_and_leaves_the_pool_and_trajectory_alone(tmp_path):
    pool_file = _digits_file(tmp_path / "pool.npz", 0, 400)
    args = (*TENSORS, f"data.source.path={pool_file}", "downstream=file")
    first = run(make_cfg(tmp_path / "a", *args, f"data.downstream.source.path={_digits_file(tmp_path / 'ds.npz', 1000, 1100)}",
                         cache=tmp_path / "cache"))
    agreement = first["downstream"].pop("model_agreement")
    assert first["downstream"] == {"source": str(tmp_path / "ds.npz") + " (main split)", "size": 100, "label_noise": 0.0,
                                   "wrong_labels": 0}
    assert agreement > first["test_accuracy"] - 0.2  # θ_T agrees with correct labels about as often as on the test set
    smaller = run(make_cfg(tmp_path / "b", *args, f"data.downstream.source.path={tmp_path / 'ds.npz'}", "data.downstream.size=30",
                           "data.downstream.label_noise=0.1", cache=tmp_path / "cache"))
    assert smaller["cache"]["computed"] == ["replay"]  # the same pool and trajectory, another J
    assert smaller["downstream"]["size"] == 30 and smaller["downstream"]["wrong_labels"] == 3
    assert smaller["test_accuracy"] == first["test_accuracy"]
    rows = lambda d: (tmp_path / d / "scores.csv").read_text().splitlines()  # noqa: E731
    assert [r.split(",")[:5] for r in rows("a")] == [r.split(",")[:5] for r in rows("b")]  # pool and labels alike
    x = np.load(tmp_path / "ds.npz")["x"]
    np.savez(tmp_path / "shifted.npz", x=x, y=(np.load(tmp_path / "ds.npz")["y"] + 1) % 10)  # every label wrong
    shifted = run(make_cfg(tmp_path / "c", *args, f"data.downstream.source.path={tmp_path / 'shifted.npz'}",
                           cache=tmp_path / "cache"))
    assert shifted["cache"]["computed"] == ["replay"]
    assert shifted["downstream"]["model_agreement"] < 0.2 and "many of J's labels may be wrong" in shifted["downstream"]["label_warning"]
    drawn = run(make_cfg(tmp_path / "d", *TENSORS, f"data.source.path={pool_file}", cache=tmp_path / "cache"))
    assert drawn["cache"]["computed"] == ["replay"]  # J drawn from the data: the same pool and trajectory again
    assert [r.split(",")[:5] for r in rows("d")] == [r.split(",")[:5] for r in rows("a")]


def test_either_j_scores_the_same_pool_from_the_same_training_set():
    """A trusted J leaves the pool, its noise, the training set and the test set exactly as J drawn from the data
    has them (the drawn J's examples are set aside), in every pool mode."""
    for mode, sizes in (("train", {}), ("holdout", {"train_size": 30}), ("test", {})):
        src = RandomSource(n=150, test_n=120)
        kw = dict(pool_mode=mode, pool_size=40, downstream_size=20, test_size=20, **sizes)
        drawn = PoolDataModule(src, LabelNoise("symmetric", 0.2), **kw)
        trusted = PoolDataModule(src, LabelNoise("symmetric", 0.2), **kw, downstream=TrustedSet(None, "test", 15))
        drawn.setup(), trusted.setup()
        assert len(trusted.downstream) == 15 and len(drawn.downstream) == 20
        for name in ("pool", "train_set", "test_set"):
            assert torch.equal(getattr(drawn, name).x, getattr(trusted, name).x), (mode, name)
            assert torch.equal(getattr(drawn, name).y, getattr(trusted, name).y), (mode, name)
        assert drawn.content_key() == trusted.content_key()
        pooled = PoolDataModule(src, LabelNoise("symmetric", 0.2), **{**kw, "downstream_size": 0},
                                downstream=TrustedSet(None, "test", 15))
        pooled.setup()  # downstream_size=0: nothing set aside, so the pool is drawn from other examples
        assert not torch.equal(pooled.pool.x, drawn.pool.x) or mode == "test"


def test_a_trusted_set_lacking_classes_is_named_before_training():
    src = RandomSource(n=150, test_n=90)

    class Labelled:
        name, num_classes, setting = "labelled", 10, "data.source"

        def __init__(self, labels):
            self.labels = torch.tensor(labels)

        def load(self):
            from pmp_lightning.data.sources import Images
            gen = torch.Generator().manual_seed(123)  # not the pool's seed: the set must share no image with it
            return Images(torch.randn(len(self.labels), 1, 2, 2, generator=gen), self.labels), None

    def trusted(labels):
        return PoolDataModule(src, LabelNoise("symmetric", 0.2), pool_size=60, downstream_size=20, test_size=20,
                              downstream=TrustedSet(Labelled(labels), size=None))

    dm = trusted([0, 1, 2] * 10)
    with pytest.warns(UserWarning, match=r"holds no example of class\(es\) \[3, 4, .*give it examples of every class"):
        dm.setup()
    assert dm.downstream_note["missing_classes"] == sorted(set(dm.train_set.y.tolist()) - {0, 1, 2})
    every = trusted(list(range(10)) * 3)
    every.setup()
    assert "missing_classes" not in every.downstream_note and "class_warning" not in every.downstream_note


def test_a_trusted_set_from_a_dataset_and_from_the_test_split(tmp_path):
    from torchvision.datasets import FakeData

    src = RandomSource(n=120, test_n=60)
    fake = DatasetSource(FakeData(size=40, image_size=(1, 2, 2), num_classes=10, transform=lambda im: torch.rand(1, 2, 2)))
    dm = PoolDataModule(src, LabelNoise("symmetric", 0.2), pool_size=80, test_size=20, downstream_size=20,
                        downstream=TrustedSet(fake, size=25))
    dm.setup()
    assert len(dm.downstream) == 25 and len(dm.pool) == 80
    own = PoolDataModule(src, LabelNoise("symmetric", 0.2), pool_size=80, test_size=20, downstream_size=20,
                         downstream=TrustedSet(None, "test", 30))
    own.setup()
    assert len(own.downstream) == 30 and torch.equal(own.pool.x, dm.pool.x)  # the pool does not depend on the set
    test_images = {x.numpy().tobytes() for x in own.test_set.x}
    assert not test_images & {x.numpy().tobytes() for x in own.downstream.x}  # disjoint from the test set


@pytest.mark.slow
def test_a_missing_file_and_a_set_overlapping_the_pool_are_one_line_each(tmp_path):
    pool_file = _digits_file(tmp_path / "pool.npz", 0, 400)
    args = (*TENSORS, f"data.source.path={pool_file}", "downstream=file")
    with pytest.raises(DataConfigError, match=r"data.downstream.source.path='.*absent.npz' is not a file"):
        run(make_cfg(tmp_path / "a", *args, f"data.downstream.source.path={tmp_path / 'absent.npz'}"))
    overlapping = _digits_file(tmp_path / "ds.npz", 0, 100)  # the pool's own images
    with pytest.raises(DataConfigError, match=r"the trusted downstream set \(data.downstream\) shares \d+ images with the pool"):
        run(make_cfg(tmp_path / "b", *args, f"data.downstream.source.path={overlapping}"))
    assert not list((tmp_path / "b" / "cache").glob("train/*/snapshots"))  # refused before training


@pytest.mark.slow
def test_real_data_mode_says_that_j_comes_from_unverified_data(tmp_path):
    with pytest.warns(UserWarning, match=r"J comes from 100 examples of the same data as the pool, whose labels are not "
                                         r"verified.*data.downstream"):
        metrics = run(make_cfg(tmp_path, "noise=none", "trainer.max_epochs=1", "scoring.scores=[cosine]"))
    assert "not verified" in metrics["downstream"]["warning"]
    assert "not verified" in json.loads((tmp_path / "metrics.json").read_text())["downstream"]["warning"]
    with_truth = PoolDataModule(RandomSource(n=120, test_n=60), LabelNoise("none", 0.0), pool_size=80, test_size=20, downstream_size=20,
                                downstream=TrustedSet(None, "test", 30))
    with_truth.setup()
    assert "warning" not in with_truth.downstream_note


# ------------------------------------------------------------------ noise=confusion
def _confusion(rate, seed, tmp_path):
    reference = {"model": {"_target_": "pmp_lightning.models.classifiers.mlp", "in_features": 4, "hidden": 16},
                 "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.2},
                 "trainer": {"_target_": "pytorch_lightning.Trainer", "max_epochs": 15, "enable_progress_bar": False,
                             "enable_model_summary": False, "accelerator": "cpu"}, "batch_size": 16}
    return ConfusionNoise(rate, seed, ReferenceClassifier(**reference, seed=seed, cache_dir=str(tmp_path / "cache")))


@pytest.fixture(scope="module")
def confused(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("confusion")
    source = RandomSource(n=400, test_n=300)
    dm = PoolDataModule(source, _confusion(0.3, 0, tmp), pool_size=300, downstream_size=40, test_size=300)
    dm.setup()
    return dm, tmp


@pytest.mark.slow
def test_confusion_noise_has_an_exact_rate_and_flips_to_the_confused_class(confused):
    dm, tmp = confused
    flipped = dm.is_mislabeled
    assert int(flipped.sum()) == 90  # exactly 30% of 300
    assert (dm.observed_labels[flipped] != dm.true_labels[flipped]).all()
    probs = torch.as_tensor(_confusion(0.3, 0, tmp).reference_probabilities(dm.pool.x, dm.test_set, 10))
    wrong = probs.clone()
    wrong[torch.arange(300), dm.true_labels] = 0
    assert torch.equal(dm.observed_labels[flipped], wrong.argmax(1)[flipped])  # the class the image is confused with


@pytest.mark.slow
def test_confusion_noise_is_seeded_and_cached(confused):
    dm, tmp = confused
    again = PoolDataModule(RandomSource(n=400, test_n=300), _confusion(0.3, 0, tmp), pool_size=300, downstream_size=40,
                           test_size=300)
    again.setup()  # the reference comes from the cache this time
    assert torch.equal(again.observed_labels, dm.observed_labels)
    other = PoolDataModule(RandomSource(n=400, test_n=300), _confusion(0.3, 1, tmp), pool_size=300, downstream_size=40,
                           test_size=300)
    other.setup()
    assert not torch.equal(other.observed_labels, dm.observed_labels)
    assert len(list((tmp / "cache" / "noise").glob("[!.]*"))) == 2  # one reference per seed


@pytest.mark.slow
def test_harder_images_are_corrupted_more_often(confused):
    dm, tmp = confused
    probs = torch.as_tensor(_confusion(0.3, 0, tmp).reference_probabilities(dm.pool.x, dm.test_set, 10))
    wrong = probs.clone()
    wrong[torch.arange(300), dm.true_labels] = 0
    hardness = wrong.max(1).values.numpy()
    hard = hardness >= np.median(hardness)
    rate_hard, rate_easy = dm.is_mislabeled[hard].mean(), dm.is_mislabeled[~hard].mean()
    assert rate_hard > 1.5 * rate_easy, (rate_hard, rate_easy)
