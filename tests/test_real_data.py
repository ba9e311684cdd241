"""Real-data mode: suspects without ground truth, known errors as ground truth, cleanlab in the same harness,
and a model and data of the user's own built from config."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from pmp_lightning.trajectory import load_manifest, network_state
from pmp_lightning.scores.cleanlab_score import cleanlab_baseline
from pmp_lightning.config import register_configs
from pmp_lightning.data.labelled import PoolDataModule, read_known_errors
from pmp_lightning.data.sources import DatasetSource, TensorSource
from pmp_lightning.data.noise import LabelNoise
from pmp_lightning.errors import DataConfigError, UnknownScoreError
from pmp_lightning.pipeline import run
from tests.test_pipeline import ROOT, make_cfg

EXAMPLES = ROOT / "docs" / "examples"


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


@pytest.mark.slow
def test_without_ground_truth_the_pool_is_still_ranked(tmp_path):
    metrics = run(make_cfg(tmp_path, "noise=none", "scoring.scores=[cosine,loss]"))
    assert metrics["detection"] == {} and metrics["suspects"] == {"rank_by": "cosine", "file": "suspects.csv"}
    suspects = _rows(tmp_path / "suspects.csv")
    scores = {int(r["index"]): float(r["cosine"]) for r in _rows(tmp_path / "scores.csv")}
    assert list(suspects[0]) == ["rank", "index", "observed_label", "predicted_label", "cosine"]  # no truth column
    assert len(suspects) == len(scores) == 600
    assert [int(r["rank"]) for r in suspects] == list(range(1, 601))
    # the ranking is the score order: most suspect (lowest) first, and each row carries its example's own score
    assert [int(r["index"]) for r in suspects] == sorted(scores, key=lambda i: (scores[i], list(scores).index(i)))
    assert all(float(r["cosine"]) == scores[int(r["index"])] for r in suspects)
    assert all(0 <= int(r["predicted_label"]) < 10 for r in suspects)
    assert (tmp_path / "suspects.png").stat().st_size > 10_000


@pytest.mark.slow
def test_rank_by_picks_the_score_and_a_score_not_computed_is_refused_before_work(tmp_path):
    run(make_cfg(tmp_path, "scoring.scores=[cosine,aum]", "scoring.rank_by=aum"))
    suspects = _rows(tmp_path / "suspects.csv")
    assert "aum" in suspects[0] and [float(r["aum"]) for r in suspects] == sorted(float(r["aum"]) for r in suspects)
    with pytest.raises(UnknownScoreError, match="scoring.rank_by=raw is not among the scores this run computes; pick one of cosine, aum"):
        run(make_cfg(tmp_path / "again", "scoring.scores=[cosine,aum]", "scoring.rank_by=raw"))
    assert not (tmp_path / "again" / "ground_truth.npz").exists()


@pytest.mark.slow
def test_known_errors_become_the_ground_truth_and_outsiders_are_skipped_with_a_warning(tmp_path):
    first = tmp_path / "first"
    run(make_cfg(first, "noise=none", "scoring.scores=[loss]", cache=tmp_path / "cache"))
    pool = [int(r["index"]) for r in _rows(first / "scores.csv")]
    outside = sorted(set(range(5000)) - set(pool))[:3] + [10_000_000]  # other splits' images, and beyond the source
    listed = pool[:20]
    known = tmp_path / "reviewed.txt"
    known.write_text("# a human review\n" + "\n".join(map(str, listed[:10])) + "\n" + ", ".join(map(str, listed[10:] + outside)) + "\n")

    with pytest.warns(UserWarning, match=r"data.known_errors: 4 of the 24 listed indices are not in the pool, skipped "
                                         r"\(1 beyond the source's 5000 examples, 3 in its other splits\)"):
        metrics = run(make_cfg(tmp_path / "run", "noise=none", f"data.known_errors={known}", "scoring.scores=[loss,random]",
                               cache=tmp_path / "cache"))
    assert metrics["known_errors"] == {"file": str(known), "listed": 24, "in_pool": 20, "skipped": 4, "duplicates": 0}
    rows = _rows(tmp_path / "run" / "scores.csv")
    assert sorted(int(r["index"]) for r in rows if r["is_mislabeled"] == "1") == sorted(listed)
    loss = metrics["detection"]["loss"]
    assert set(loss) == {"auroc", "ap", "precision_at_k", "recall_at_10pct", "hits_in_lowest_1pct"}
    suspects = _rows(tmp_path / "run" / "suspects.csv")
    flagged = [int(r["index"]) for r in sorted(rows, key=lambda r: float(r["loss"]))[:6]]  # the lowest ⌈1% of 600⌉
    assert loss["hits_in_lowest_1pct"] == len(set(flagged) & set(listed))
    assert "is_mislabeled" in suspects[0]
    # the file changes what is measured, not what is trained: the trajectory came from the cache
    assert metrics["cache"]["computed"] == []


@pytest.mark.slow
def test_known_errors_add_to_synthetic_noise(tmp_path):
    plain = run(make_cfg(tmp_path / "plain", "scoring.scores=[loss]"))
    rows = _rows(tmp_path / "plain" / "scores.csv")
    clean = [int(r["index"]) for r in rows if r["is_mislabeled"] == "0"][:5]
    known = tmp_path / "known.csv"
    known.write_text("index,note\n" + "".join(f"{i},looks wrong\n" for i in clean))  # a CSV with an index column
    both = run(make_cfg(tmp_path / "both", f"data.known_errors={known}", "scoring.scores=[loss]"))
    truth = {int(r["index"]): r["is_mislabeled"] == "1" for r in _rows(tmp_path / "both" / "scores.csv")}
    assert sum(truth.values()) == 120 + 5 and all(truth[i] for i in clean)
    assert both["detection"]["loss"] != plain["detection"]["loss"]


@pytest.mark.parametrize(("text", "message"), [
    ("12\nabc\n", r"line 2 holds 'abc', not a source index"),
    ("3 -4\n", r"line 1 holds -4; source indices are ≥ 0"),
    ("12\n99999999999999999999999\n", r"line 2 holds 99999999999999999999999, beyond any data set's size"),
    ("id,note\n3,looks wrong\n", r"line 1 holds 'id', not a source index \(a CSV file needs a column named 'index'"),
])
def test_a_bad_known_errors_file_names_the_line(tmp_path, text, message):
    path = tmp_path / "known.txt"
    path.write_text(text)
    with pytest.raises(DataConfigError, match=message):
        read_known_errors(path)
    with pytest.raises(DataConfigError, match=r"data.known_errors='.*absent.txt' is not a file"):
        read_known_errors(tmp_path / "absent.txt")


@pytest.mark.slow
def test_cleanlab_from_cross_validation_is_a_score_column_and_is_cached(tmp_path):
    metrics = run(make_cfg(tmp_path / "a", "baselines.cleanlab=true", "baselines.folds=2", "scoring.scores=[cosine,loss]"))
    cl = metrics["cleanlab"]
    assert cl["probabilities"] == "2-fold cross-validation" and cl["seconds"] > 0
    assert 0 < cl["issues_found"] < 600 and 0 < cl["precision"] <= 1 and 0 < cl["recall"] <= 1
    assert metrics["detection"]["cleanlab"]["auroc"] > 0.8  # cleanlab finds the noise on this easy problem
    assert "cleanlab" in _rows(tmp_path / "a" / "scores.csv")[0]
    assert metrics["cost_s"]["cleanlab"] == cl["seconds"] and "cleanlab" in metrics["timings"]
    again = run(make_cfg(tmp_path / "b", "baselines.cleanlab=true", "baselines.folds=2", "scoring.scores=[raw]",
                         cache=tmp_path / "a" / "cache"))
    assert "cleanlab" not in again["timings"]  # the folds came from the cache
    assert again["cleanlab"] == cl and again["detection"]["cleanlab"] == metrics["detection"]["cleanlab"]


@pytest.mark.slow
def test_cleanlab_on_a_held_out_pool_needs_no_extra_training(tmp_path):
    metrics = run(make_cfg(tmp_path, "pool=holdout", "data.pool_size=300", "baselines.cleanlab=true", "scoring.scores=[loss]"))
    assert metrics["cleanlab"]["probabilities"] == "the trained model (the pool is held out)"
    assert metrics["cleanlab"]["seconds"] == 0.0 and "cleanlab" not in metrics["timings"]
    assert metrics["detection"]["cleanlab"]["auroc"] > 0.9


def test_cleanlab_baseline_scores_label_quality():
    labels = np.array([0, 0, 1, 1, 2, 2, 0, 1, 2, 0] * 3)
    probs = np.full((30, 3), 0.05)
    probs[np.arange(30), labels] = 0.9
    wrong = np.array([3, 14, 25])
    probs[wrong] = [[0.05, 0.9, 0.05]] * 3
    probs[wrong, labels[wrong]] = 0.05
    probs[wrong, (labels[wrong] + 1) % 3] = 0.9
    truth = np.zeros(30, dtype=bool)
    truth[wrong] = True
    score, summary = cleanlab_baseline(labels, probs, truth)
    assert set(np.argsort(score)[:3]) == set(wrong)
    assert summary == {"issues_found": 3, "precision": 1.0, "recall": 1.0}


def test_a_bad_folds_setting_is_refused_before_work(tmp_path):
    with pytest.raises(DataConfigError, match=r"baselines.folds=1: cross-validation needs an integer from 2 to the pool size"):
        run(make_cfg(tmp_path, "baselines.cleanlab=true", "baselines.folds=1"))
    assert not (tmp_path / "ground_truth.npz").exists()  # refused before the data was loaded
    with pytest.raises(DataConfigError, match=r"baselines.folds=601: cross-validation needs an integer from 2 to the pool size \(600\)"):
        run(make_cfg(tmp_path, "baselines.cleanlab=true", "baselines.folds=601"))
    assert "cleanlab" not in [p.name for p in (tmp_path / "cache").glob("*")]


# ------------------------------------------------------------------ bring your own model and data
def _byo_cfg(tmp_path, *overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"hydra.searchpath=[file://{EXAMPLES / 'conf'}]", "trainer.enable_progress_bar=false",
                                            "trainer.max_epochs=3", "replay.hvp_samples=64", "logger=none",
                                            f"paths.root_dir={ROOT}", f"paths.output_dir={tmp_path}",
                                            f"paths.cache_dir={tmp_path / 'cache'}", *overrides])


@pytest.fixture
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # where the README's PYTHONPATH=docs/examples puts my_model


@pytest.mark.slow
def test_own_model_and_own_tensors_from_config(tmp_path, examples_on_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images[:700], dtype=torch.float32).unsqueeze(1) / 16.0
    np.savez(tmp_path / "digits.npz", x=x.numpy(), y=digits.target[:700])
    metrics = run(_byo_cfg(tmp_path, "+experiment=byo_digits", f"data.source.path={tmp_path / 'digits.npz'}",
                           "data.test_size=100", "data.downstream_size=60"))
    assert metrics["test_accuracy"] > 0.5
    assert len(_rows(tmp_path / "scores.csv")) == 700 - 100 - 60 - 80  # the rest, less 40 canaries and 40 controls
    assert metrics["detection"]["loss"]["auroc"] > 0.6  # above chance (0.5 ± 0.03 with 108 of 540 mislabeled) after 3 epochs
    manifest = json.loads((tmp_path / "snapshots" / "manifest.json").read_text())
    assert manifest["param_shapes"]["net.0.weight"] == [16, 1, 3, 3]  # the user's TinyConvNet was trained and replayed


@pytest.mark.slow
def test_a_torchvision_style_dataset_from_config(tmp_path):
    dataset = {"_target_": "torchvision.datasets.FakeData", "size": 300, "image_size": [1, 28, 28], "num_classes": 10,
               "transform": {"_target_": "torchvision.transforms.ToTensor"}}
    overrides = [f"+data.source.train.{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in dataset.items() if k != "transform"]
    cfg = _byo_cfg(tmp_path, "+experiment=noisy_mnist", "data=dataset", "model=mlp", *overrides,
                   "+data.source.train.transform._target_=torchvision.transforms.ToTensor",
                   "data.test_size=50", "data.downstream_size=50", "scoring.scores=[cosine,loss]")
    metrics = run(cfg)
    rows = _rows(tmp_path / "scores.csv")
    assert len(rows) == 300 - 50 - 50 - 80 and set(metrics["detection"]) == {"cosine", "loss"}  # 80: the canaries
    assert (tmp_path / "suspects.png").is_file()
    # the run read the dataset the config built: each scored example's true label is FakeData's at its index, and
    # the model was built for its 1 × 28 × 28 images
    from torchvision.datasets import FakeData

    fake = FakeData(size=300, image_size=(1, 28, 28), num_classes=10)
    assert [int(r["true_label"]) for r in rows] == [int(fake[int(r["index"])][1]) for r in rows]
    assert len({int(r["index"]) for r in rows}) == 120 and len({int(r["true_label"]) for r in rows}) > 5
    manifest = json.loads((tmp_path / "snapshots" / "manifest.json").read_text())
    first_linear = next(shape for shape in manifest["param_shapes"].values() if len(shape) == 2)
    assert first_linear[1] == 28 * 28


def test_dataset_source_reads_pil_images_and_counts_classes():
    from torchvision.datasets import FakeData

    main, test = DatasetSource(FakeData(size=12, image_size=(3, 8, 8), num_classes=4)).load()
    assert main.x.shape == (12, 3, 8, 8) and main.x.dtype == torch.float32 and test is None
    assert 0.0 <= float(main.x.min()) and float(main.x.max()) <= 1.0 and int(main.y.max()) < 4


def test_the_class_count_comes_from_the_data(tmp_path):
    x, y = torch.randn(90, 4), torch.arange(90) % 3
    torch.save({"x": x, "y": y}, tmp_path / "three.pt")
    dm = PoolDataModule(TensorSource(str(tmp_path / "three.pt")), LabelNoise("symmetric", 0.5), pool_size=60, downstream_size=10,
                        test_size=20)
    dm.setup()
    assert dm.num_classes == 3 and set(dm.observed_labels.tolist()) == {0, 1, 2}


@pytest.mark.parametrize(("content", "message"), [
    ({"images": torch.zeros(3, 4)}, r"holds \['images'\]; it needs the keys 'x' \(inputs\) and 'y' \(labels\)"),
    ({"x": torch.zeros(3, 4), "y": torch.zeros(3)}, r"the labels must be a 1-D integer array, got \(3,\) of torch.float32"),
    ({"x": torch.zeros(3, 4), "y": torch.zeros(2, dtype=torch.long)}, r"one row per label; got \(3, 4\) for 2 labels"),
])
def test_bad_tensors_files_say_what_is_wrong(tmp_path, content, message):
    torch.save(content, tmp_path / "mine.pt")
    with pytest.raises(DataConfigError, match=message):
        TensorSource(str(tmp_path / "mine.pt")).load()
    with pytest.raises(DataConfigError, match=r"data.source.path='.*nothing.pt' is not a file"):
        TensorSource(str(tmp_path / "nothing.pt")).load()



def test_a_pickled_or_damaged_tensors_file_is_one_line_without_torchs_paragraph(tmp_path):
    """A data file that torch.load(weights_only=True) refuses: the message carried torch's paragraph about
    weights_only (several lines, advice to load it unsafely). Now one line naming what the file holds, and the fix."""
    from pathlib import PurePosixPath

    torch.save({"x": torch.zeros(3, 4), "y": torch.zeros(3, dtype=torch.long), "meta": PurePosixPath("a")},
               tmp_path / "pickled.pt")
    (tmp_path / "damaged.pt").write_bytes(b"not a torch file")
    for name, says in (("pickled", "holds Python objects (a pathlib.PurePosixPath), and only tensors and numpy arrays"),
                       ("damaged", "it is damaged, or not a file of tensors and arrays (torch: ")):
        with pytest.raises(DataConfigError) as refused:
            TensorSource(str(tmp_path / f"{name}.pt")).load()
        message = str(refused.value)
        assert "\n" not in message and says in message and "torch.save({'x': x, 'y': y}, path)" in message
        assert "weights_only" not in message and "safe_globals" not in message and "\x1b" not in message


@pytest.mark.parametrize(("override", "message"), [
    ("model=mlp model.in_features=100", r"model \(pmp_lightning.models.classifiers.mlp\) cannot take the data's inputs of shape \(1, 28, 28\) \(torch.float32\): "
                                        r".*model.in_features=784"),
    ("model=mlp model.num_classes=5", r"gives outputs of shape \(5,\) per example, but the labels have 10 classes; set model.num_classes=10"),
])
def test_a_model_that_does_not_fit_the_data_is_one_clear_error(tmp_path, override, message):
    with pytest.raises(DataConfigError, match=message):
        run(make_cfg(tmp_path, *override.split()))
    assert not list((tmp_path / "cache").glob("train/*/snapshots"))  # refused before training


def _token_file(path, n=400, length=12, vocab=20):
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(1, vocab, (n, length), generator=gen)
    y = (x[:, :3].sum(1) % 10)  # a rule on the first tokens: learnable
    torch.save({"x": x, "y": y}, path)
    return path


def test_integer_inputs_stay_integers_through_the_data_and_the_replay(tmp_path):
    dm = PoolDataModule(TensorSource(str(_token_file(tmp_path / "tokens.pt"))), LabelNoise("symmetric", 0.2), pool_size=300,
                        downstream_size=40, test_size=60)
    dm.setup()
    assert dm.pool.x.dtype == dm.train_set.x.dtype == torch.int64
    assert dm.pool.to(torch.float64).x.dtype == torch.int64  # only floating inputs take the trajectory's dtype


@pytest.mark.slow
def test_a_text_model_on_token_ids_from_config(tmp_path):
    path = _token_file(tmp_path / "tokens.pt")
    metrics = run(make_cfg(tmp_path, "data=tensors", f"data.source.path={path}", "model=text", "model.vocab_size=20",
                           "data.test_size=60", "data.downstream_size=40", "data.pool_size=null", "trainer.max_epochs=2",
                           "scoring.scores=[cosine,loss]"))
    assert set(metrics["detection"]) == {"cosine", "loss"} and len(_rows(tmp_path / "scores.csv")) == 300 - 80  # canaries
    manifest = json.loads((tmp_path / "snapshots" / "manifest.json").read_text())
    assert manifest["param_shapes"]["net.tokens.weight"] == [20, 64]


@pytest.mark.slow
def test_a_transformer_of_ones_own_from_config(tmp_path, examples_on_path):
    """A user's own nn.Module of the kinds people train (bare parameters, nn.MultiheadAttention, LayerNorm) runs end to
    end through a _target_, its statistics proven before training. The default draws 40 canaries and their controls
    (80 examples) from what would have been the pool; scoring.by_class=true adds the class replays' variants, and the
    canaries choose among them too."""
    from pmp_lightning.policy import combine
    from pmp_lightning.scores.registry import CLASS_VARIANTS

    from sklearn.datasets import load_digits

    digits = load_digits()
    np.savez(tmp_path / "digits.npz", x=digits.images[:500, None].astype(np.float32) / 16.0, y=digits.target[:500])
    metrics = run(_byo_cfg(tmp_path, "+experiment=byo_digits", "model=tiny_transformer", "scoring.by_class=true",
                           f"data.source.path={tmp_path / 'digits.npz'}", "data.test_size=100", "data.downstream_size=60",
                           "scoring.scores=[cosine,loss]"))
    assert len(_rows(tmp_path / "scores.csv")) == 340 - 80
    assert set(metrics["detection"]) == {"cosine", "loss", "auto", "block_fit", *CLASS_VARIANTS}
    assert metrics["scoring"] == {"canaries": 40, "by_class": True}  # as resolved: what the reports rebuild from
    rows, choice = _rows(tmp_path / "scores.csv"), metrics["canaries"]
    column = lambda name: np.array([float(r[name]) for r in rows])  # noqa: E731
    expected = combine([column(name) for name in choice["combined"]])
    assert np.allclose(column("auto"), expected)
    assert "net.attn.in_proj_weight" in json.loads((tmp_path / "snapshots" / "manifest.json").read_text())["param_shapes"]


def batch_statistics_net(num_classes: int = 10):
    """A network whose examples interact even in eval mode: BatchNorm without running statistics."""
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4, track_running_stats=False), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 26 * 26, num_classes))


def test_a_network_that_truly_cannot_be_handled_is_refused_before_training(tmp_path):
    from pmp_lightning.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match=r"layer '1' \(BatchNorm2d\) normalises with the batch's own statistics"):
        run(make_cfg(tmp_path, "model._target_=tests.test_real_data.batch_statistics_net",
                     "~model.hidden"))
    assert not list((tmp_path / "cache").glob("train/*/snapshots"))  # refused before training


def _fake_cifar10(root, per_batch=16, test=40, seed=0):
    """CIFAR-10's on-disk layout (cifar-10-batches-py: five pickled training batches, a test batch, the meta file),
    filled with random colour images, so torchvision's own loader reads it offline."""
    import pickle

    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]
    for name in batches:
        n = test if name == "test_batch" else per_batch
        entry = {"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{k}" for k in range(10)]}))


@pytest.mark.slow
def test_cifar10_runs_a_resnet_with_no_shape_setting(tmp_path, monkeypatch):
    """data=cifar10 with model=resnet: the model takes 3 channels (and the class count) from the data, with no yaml
    edit. Offline on a fake set of CIFAR-10's layout (torchvision's checksums patched out for it). Guard: the same run
    with the shape written into the config wrongly (model.in_channels=1) is refused before training."""
    import torchvision

    from pmp_lightning.errors import DataConfigError

    _fake_cifar10(tmp_path / "cifar")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    small = ["data=cifar10", f"data.source.root={tmp_path / 'cifar'}", "data.source.download=false", "model=resnet",
             "data.pool_size=40", "data.downstream_size=20", "data.test_size=30", "trainer.max_epochs=1",
             "replay.hvp_samples=8", "scoring.scores=[cosine,loss]"]
    with pytest.raises(DataConfigError, match="cannot take the data's inputs of shape \\(3, 32, 32\\)"):
        run(make_cfg(tmp_path / "wrong", *small, "model.in_channels=1"))
    assert not (tmp_path / "wrong" / "cache" / "train").exists()
    metrics = run(make_cfg(tmp_path / "run", *small))
    assert set(metrics["detection"]) == {"cosine", "loss"}
    snapshots = tmp_path / "run" / "snapshots"
    state = network_state(snapshots, load_manifest(snapshots)["snapshots"][0])
    assert state["stem.0.weight"].shape[1] == 3 and state["fc.weight"].shape[0] == 10  # built for the data


def test_a_root_without_the_data_set_says_so_and_is_not_suggested_again(tmp_path, monkeypatch):
    """data=cifar10 offline with data.source.root given (a folder holding MNIST, not CIFAR-10): the message said to
    point data.source.root at ../shared/data, the folder given. Now it says that folder lacks CIFAR-10, names what
    torchvision looked for, and suggests a folder only where that one holds the data set. No network: download=false,
    and the download's failure is a stand-in."""
    import urllib.error

    import torchvision

    from pmp_lightning.data.sources import TorchvisionSource

    shared = tmp_path / "shared"
    (shared / "MNIST" / "raw").mkdir(parents=True)  # the layout, without the files: torchvision finds no MNIST
    monkeypatch.setattr(TorchvisionSource, "OFFLINE_ROOTS", (str(shared),))
    with pytest.raises(DataConfigError) as given:
        TorchvisionSource("CIFAR10", str(shared), download=False).load()
    message = str(given.value)
    assert f"that folder holds no CIFAR10 (torchvision looked for {shared / 'cifar-10-batches-py'}" in message
    assert "e.g." not in message and "../shared/data" not in message and "\n" not in message
    assert message.endswith("or go online with data.source.download=true")
    with pytest.raises(DataConfigError) as same:  # the suggested folder itself, lacking the files: not suggested
        TorchvisionSource("MNIST", str(shared), download=False).load()
    assert "that folder holds no MNIST" in str(same.value) and "e.g." not in str(same.value)
    with pytest.raises(DataConfigError) as absent:  # guard: a folder that is not there, and one that holds it
        monkeypatch.setattr(TorchvisionSource, "OFFLINE_ROOTS", (str(tmp_path / "other"),))
        (tmp_path / "other" / "cifar-10-batches-py").mkdir(parents=True)
        TorchvisionSource("CIFAR10", str(tmp_path / "nowhere"), download=False).load()
    assert "no such folder. Point data.source.root at a folder that holds cifar-10-batches-py/ " in str(absent.value)
    assert f"(e.g. data.source.root={tmp_path / 'other'})" in str(absent.value)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataConfigError) as download:
        TorchvisionSource("CIFAR10", str(tmp_path / "empty"), download=True).load()
    assert "that folder holds no CIFAR10" in str(download.value)
    assert "downloading it failed (<urlopen error [Errno -2] Name or service not known>)" in str(download.value)


def _labelled_tensors(tmp_path, n=120, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, 1, 8, 8, generator=gen), torch.randint(0, 4, (n,), generator=gen)
    torch.save({"x": x, "y": y}, tmp_path / "data.pt")
    return y


def _datamodule(tmp_path, pool_mode="train", noise=None, **kw):
    kw = {"pool_size": 60, "downstream_size": 20, "test_size": 20, **kw}
    if pool_mode == "holdout":
        kw["train_size"] = 20
    return PoolDataModule(TensorSource(str(tmp_path / "data.pt")), noise or LabelNoise("none", 0.0), pool_mode=pool_mode, **kw)


@pytest.mark.parametrize("pool_mode", ["train", "holdout"])
def test_a_labels_file_gives_the_observed_labels_and_the_source_the_ground_truth(tmp_path, pool_mode):
    """data.labels_file as CIFAR-10N's human labels are used: a torch.save'd dict of numpy arrays (one label per
    training example, in the source's order) whose ``clean_label`` is the source's own. The pool's observed labels
    are the file's, its ground truth the source's, and the mislabeled are where they differ; with pool=holdout the
    training set keeps the source's labels. Guard: a file whose clean_label disagrees with the source is refused."""
    y = _labelled_tensors(tmp_path)
    human = y.clone()
    wrong = torch.arange(0, len(y), 7)
    human[wrong] = (human[wrong] + 1) % 4
    torch.save({"clean_label": y.numpy(), "worse_label": human.numpy(), "aggre_label": y.numpy()}, tmp_path / "human.pt",
               _use_new_zipfile_serialization=False)  # the legacy format, which older files have
    dm = _datamodule(tmp_path, pool_mode, labels_file=str(tmp_path / "human.pt"), labels_key="worse_label")
    dm.setup()
    idx = torch.as_tensor(dm.pool_index)
    assert torch.equal(dm.observed_labels, human[idx]) and torch.equal(dm.true_labels, y[idx])
    assert np.array_equal(dm.is_mislabeled, (human[idx] != y[idx]).numpy()) and dm.is_mislabeled.any()
    assert torch.equal(dm.pool.y, human[idx])
    if pool_mode == "holdout":
        train_x = {x.numpy().tobytes(): int(label) for x, label in zip(dm.train_set.x, dm.train_set.y)}
        source = torch.load(tmp_path / "data.pt")
        truth = {x.numpy().tobytes(): int(label) for x, label in zip(source["x"], source["y"])}
        assert all(truth[k] == v for k, v in train_x.items())
    # the same file read through its other array, and as a plain text file of labels
    same = _datamodule(tmp_path, pool_mode, labels_file=str(tmp_path / "human.pt"), labels_key="aggre_label")
    same.setup()
    assert not same.is_mislabeled.any()
    (tmp_path / "labels.txt").write_text("\n".join(str(int(v)) for v in human))
    text = _datamodule(tmp_path, pool_mode, labels_file=str(tmp_path / "labels.txt"))
    text.setup()
    assert torch.equal(text.observed_labels, dm.observed_labels)
    torch.save({"clean_label": human.numpy(), "worse_label": human.numpy()}, tmp_path / "other.pt")
    with pytest.raises(DataConfigError, match=r"clean_label differs from the data's own labels at \d+ of 120"):
        _datamodule(tmp_path, pool_mode, labels_file=str(tmp_path / "other.pt"), labels_key="worse_label").setup()


@pytest.mark.parametrize("case, match", [
    ("short", r"holds 119 labels, the data source's training split has 120 examples"),
    ("range", r"labels run from 0 to 6; the data's classes are 0..3"),
    ("no key", r"holds the arrays \['worse_label'\]; data.labels_key is not set"),
    ("bad key", r"data.labels_key='worst' is not among them"),
    ("missing", r"is not a file"),
    ("noise", r"noise=symmetric would corrupt them again \(noise.rate=0.2\); add noise=none"),
    ("pool=test", r"pool=test scores test-split images"),
    ("pickle", r"holds Python objects"),
])
def test_a_labels_file_that_cannot_work_is_named_before_training(tmp_path, case, match):
    y = _labelled_tensors(tmp_path)
    files = {"short": y[:-1], "range": y * 2, "no key": {"worse_label": y.numpy()}, "bad key": {"worse_label": y.numpy()},
             "pickle": {"worse_label": Path("x")}}
    if case in files:
        torch.save(files[case], tmp_path / "labels.pt")
    kw = {"labels_file": str(tmp_path / "labels.pt"), "labels_key": "worst" if case == "bad key" else None}
    with pytest.raises(DataConfigError, match=match):
        _datamodule(tmp_path, "test" if case == "pool=test" else "train",
                    LabelNoise("symmetric", 0.2) if case == "noise" else None, **kw).setup()


def test_a_labels_file_without_a_key_suggests_the_noisy_labels_not_the_clean_ones(tmp_path):
    """A labels file of named arrays and no data.labels_key: the message suggested the first name, clean_label, whose
    labels are the source's own and leave no errors to find. Now it suggests an array that differs from the source's,
    and says how many labels each changes and which one equals the source's."""
    y = _labelled_tensors(tmp_path)
    worse = y.clone()
    worse[:30] = (worse[:30] + 1) % 4
    torch.save({"clean_label": y.numpy(), "worse_label": worse.numpy()}, tmp_path / "labels.pt")
    with pytest.raises(DataConfigError) as refused:
        _datamodule(tmp_path, labels_file=str(tmp_path / "labels.pt")).setup()
    message = str(refused.value)
    assert "data.labels_key=worse_label (of the source's 120 labels, worse_label 30 differ; clean_label equals them, " \
           "so it would leave no errors to find)" in message
    assert "data.labels_key=clean_label" not in message
    torch.save({"gt": y.numpy(), "given": y.numpy()}, tmp_path / "same.pt")  # nothing to find in either
    with pytest.raises(DataConfigError, match=r"each of them equals the source's own labels, so there would be no errors"):
        _datamodule(tmp_path, labels_file=str(tmp_path / "same.pt"), labels_key="worst").setup()
    torch.save({"clean_label": y[:5].numpy(), "noisy": y[:5].numpy()}, tmp_path / "short.pt")  # by the names alone
    with pytest.raises(DataConfigError, match=r"e.g. data.labels_key=noisy \(none of them is one label per training"):
        _datamodule(tmp_path, labels_file=str(tmp_path / "short.pt")).setup()


def test_a_pickled_labels_file_is_one_line_without_torchs_paragraph(tmp_path):
    """A .pt labels file that is a pickle of other objects: the refusal carried torch's whole weights_only paragraph
    (several lines, advice to load it unsafely). Now one line: what it holds and how to save labels instead."""
    from pathlib import PurePosixPath

    _labelled_tensors(tmp_path)
    torch.save({"worse_label": PurePosixPath("x")}, tmp_path / "labels.pt")
    with pytest.raises(DataConfigError) as refused:
        _datamodule(tmp_path, labels_file=str(tmp_path / "labels.pt"), labels_key="worse_label").setup()
    message = str(refused.value)
    assert "\n" not in message and len(message) < 400
    assert "holds Python objects (a pathlib.PurePosixPath)" in message and "torch.save({'worse_label': labels}, path)" in message
    assert "weights_only" not in message and "safe_globals" not in message and "Weights only load failed" not in message
