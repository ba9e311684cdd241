"""Train and replay once; score many times. Entries are checked on reload."""
import json
import logging
import subprocess
import sys

import pytest

from pmp_lightning.cache import MANIFEST, CacheError, StageCache
from pmp_lightning.pipeline import run
from tests.test_pipeline import ROOT, make_cfg


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_runs")
    return root, run(make_cfg(root / "first", cache=root / "cache"))


@pytest.mark.slow
def test_a_scoring_change_trains_and_replays_nothing(first, caplog):
    root, metrics = first
    assert metrics["cache"]["computed"] == ["train", "replay"]
    with caplog.at_level(logging.INFO, logger="pmp_lightning.cache"):
        again = run(make_cfg(root / "second", "scoring=cosine", cache=root / "cache"))
    assert again["cache"]["computed"] == [] and "train" not in again["timings"] and "replay" not in again["timings"]
    assert "train cache hit" in caplog.text and "replay cache hit" in caplog.text
    assert again["detection"] == {"cosine": metrics["detection"]["cosine"]}
    assert again["test_accuracy"] == metrics["test_accuracy"]
    assert (root / "second" / "snapshots").resolve() == (root / "first" / "snapshots").resolve()


@pytest.mark.slow
def test_a_curvature_change_replays_but_does_not_retrain(first):
    root, metrics = first
    other = run(make_cfg(root / "third", "replay.curvature=none", "scoring=raw", cache=root / "cache"))
    assert other["cache"]["computed"] == ["replay"] and other["cache"]["train"] == metrics["cache"]["train"]


@pytest.mark.slow
def test_a_partial_entry_is_recomputed_and_a_mismatched_one_refused(first, tmp_path):
    root, metrics = first
    train_dir = root / "cache" / "train"
    entry = next(p for p in train_dir.iterdir() if p.is_dir())
    manifest = json.loads((entry / MANIFEST).read_text())

    manifest["config"]["seed"] = 12345  # the entry claims another config than its key
    (entry / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="different config than its key"):
        run(make_cfg(tmp_path / "a", "scoring=raw", cache=root / "cache"))

    (entry / MANIFEST).unlink()  # as after a crash mid-training: no manifest, so not complete
    again = run(make_cfg(tmp_path / "b", "scoring=raw", cache=root / "cache"))
    assert again["cache"]["computed"] == ["train", "replay"]
    assert again["detection"]["raw"] == metrics["detection"]["raw"]  # same seed, same config: identical scores


@pytest.mark.slow
def test_an_entry_missing_a_snapshot_is_recomputed_not_hit(first, tmp_path, caplog):
    root, metrics = first
    entry = next(p for p in (root / "cache" / "train").iterdir() if p.is_dir() and (p / MANIFEST).is_file())
    (entry / "snapshots" / "theta_0002.pt").unlink()  # deleted by hand, or a cleaned-up disk
    with caplog.at_level(logging.INFO, logger="pmp_lightning.cache"):
        again = run(make_cfg(tmp_path / "c", "scoring=raw", cache=root / "cache"))
    assert "is complete but lacks snapshots/theta_0002.pt; recomputing it" in caplog.text
    assert again["cache"]["computed"] == ["train", "replay"]
    assert (entry / "snapshots" / "theta_0002.pt").is_file()
    assert again["detection"]["raw"] == metrics["detection"]["raw"]


@pytest.mark.parametrize("content", ["[]", "3", '"a string"'])
def test_a_manifest_of_the_wrong_shape_is_refused_with_the_fix(tmp_path, content):
    cache = StageCache(tmp_path, "train", {"seed": 0})
    cache.dir.mkdir(parents=True)
    (cache.dir / MANIFEST).write_text(content)
    with pytest.raises(CacheError, match=rf"holds a JSON \w+, not a cache manifest; delete {cache.dir} and rerun"):
        cache.load()


def test_a_job_waiting_for_the_lock_says_for_whom(tmp_path, caplog):
    """A second job that wants an entry another job is computing logs that it waits, and for which process."""
    script = (f"import time; from pmp_lightning.cache import StageCache\n"
              f"with StageCache({str(tmp_path)!r}, 'train', {{'seed': 0}}).locked():\n"
              f"    print('held', flush=True); time.sleep(3)\n")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline().strip() == "held"
    with caplog.at_level(logging.INFO, logger="pmp_lightning.cache"):
        with StageCache(tmp_path, "train", {"seed": 0}).locked():
            pass
    holder.wait(timeout=30)
    assert f"waiting for pid {holder.pid} on " in caplog.text and "which is computing" in caplog.text
    assert "released, going on" in caplog.text


@pytest.mark.slow
def test_a_data_file_rewritten_in_place_is_trained_and_scored_afresh(tmp_path):
    """The cache keys the data by content: the same path with shuffled labels is not a cache hit."""
    import csv

    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.images[:400].reshape(400, 1, 8, 8) / 16.0, digits.target[:400]
    path = tmp_path / "mut.npz"
    np.savez(path, x=x, y=y)
    args = ("data=tensors", f"data.source.path={path}", "model.in_features=64", "data.pool_size=null",
            "data.test_size=100", "data.downstream_size=50", "trainer.max_epochs=2", "scoring.scores=[loss]")
    first = run(make_cfg(tmp_path / "a", *args, cache=tmp_path / "cache"))
    assert first["cache"]["computed"] == ["train", "replay"]
    shuffled = np.random.default_rng(0).permutation(y)
    np.savez(path, x=x, y=shuffled)  # same path, same size, labels shuffled
    second = run(make_cfg(tmp_path / "b", *args, cache=tmp_path / "cache"))
    assert second["cache"]["computed"] == ["train", "replay"] and second["cache"]["train"] != first["cache"]["train"]
    rows = list(csv.DictReader((tmp_path / "b" / "scores.csv").open()))
    assert all(int(r["true_label"]) == shuffled[int(r["index"])] for r in rows)  # labels of the file as it is now
    third = run(make_cfg(tmp_path / "c", *args, cache=tmp_path / "cache"))  # unchanged since: a hit
    assert third["cache"]["computed"] == [] and third["detection"] == second["detection"]


MODEL_SOURCE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes=10, in_features=64):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1)){edit}
'''


def _import_fresh(directory, name: str):
    """The module ``name`` from ``directory`` as its file is now (a new process would read it so)."""
    import importlib
    import sys

    sys.modules.pop(name, None)
    importlib.invalidate_caches()
    sys.path.insert(0, str(directory))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(directory))


def test_the_code_key_covers_the_model_source_and_its_builder(tmp_path):
    """code_digest changes when the file defining the model's class, or the builder its _target_ names, changes;
    torch's own classes are stood for by torch's version, so a model of torch layers keys on its builder's file."""
    from pmp_lightning.cache import code_digest
    from pmp_lightning.models.classifiers import mlp

    (tmp_path / "net_v.py").write_text(MODEL_SOURCE.format(edit=""))
    first = code_digest(_import_fresh(tmp_path, "net_v").Net(), "net_v.Net")
    assert code_digest(_import_fresh(tmp_path, "net_v").Net(), "net_v.Net") == first  # same code, same key
    (tmp_path / "net_v.py").write_text(MODEL_SOURCE.format(edit=" * 2"))
    assert code_digest(_import_fresh(tmp_path, "net_v").Net(), "net_v.Net") != first  # forward edited
    builder = code_digest(mlp(in_features=4), "pmp_lightning.models.classifiers.mlp")  # nn.Sequential of torch layers
    assert builder != code_digest(mlp(in_features=4), None)  # the builder's file counts


@pytest.mark.slow
def test_editing_the_model_code_retrains(tmp_path, monkeypatch):
    """A model of one's own whose forward changed between two runs is trained afresh, not taken from the cache."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    np.savez(tmp_path / "digits.npz", x=digits.images[:300].reshape(300, 1, 8, 8) / 16.0, y=digits.target[:300])
    (tmp_path / "edited_net.py").write_text(MODEL_SOURCE.format(edit=""))
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ("data=tensors", f"data.source.path={tmp_path / 'digits.npz'}", "~model", "+model._target_=edited_net.Net",
            "data.pool_size=null", "data.test_size=60", "data.downstream_size=40", "trainer.max_epochs=1",
            "scoring.scores=[loss]")
    _import_fresh(tmp_path, "edited_net")
    first = run(make_cfg(tmp_path / "a", *args, cache=tmp_path / "cache"))
    assert run(make_cfg(tmp_path / "b", *args, cache=tmp_path / "cache"))["cache"]["computed"] == []
    (tmp_path / "edited_net.py").write_text(MODEL_SOURCE.format(edit=" * 2"))
    _import_fresh(tmp_path, "edited_net")
    third = run(make_cfg(tmp_path / "c", *args, cache=tmp_path / "cache"))
    assert third["cache"]["computed"] == ["train", "replay"] and third["cache"]["train"] != first["cache"]["train"]
