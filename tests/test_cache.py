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


HELPED_MODEL = '''
import json  # the standard library: never walked
import torch
from torch import nn

from {prefix}_helpers import activation
from {prefix}_vendored import identity  # a site-packages module: never walked


class Net(nn.Module):
    def __init__(self, num_classes=10, in_features=64):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return identity(activation(self.fc(x.flatten(1))))
'''

HELPERS = '''
import torch


def activation(z):
    from {prefix}_deep import squash  # an import inside a function counts too

    return squash(z){edit}
'''

DEEP = '''
from .inner import scale  # a package's relative import


def squash(z):
    return torch.relu(z) * scale()


import torch
'''


def _helped_model(tmp_path, monkeypatch, prefix: str):
    """mymods → helpers → deep package (`from .inner import`) → inner, with a vendored module in a site-packages folder."""
    (tmp_path / f"{prefix}_mymods.py").write_text(HELPED_MODEL.format(prefix=prefix))
    (tmp_path / f"{prefix}_helpers.py").write_text(HELPERS.format(prefix=prefix, edit=""))
    (tmp_path / f"{prefix}_deep").mkdir()
    (tmp_path / f"{prefix}_deep" / "__init__.py").write_text(DEEP)
    (tmp_path / f"{prefix}_deep" / "inner.py").write_text("def scale():\n    return 1.0\n")
    site = tmp_path / "lib" / "site-packages"
    site.mkdir(parents=True)
    (site / f"{prefix}_vendored.py").write_text("def identity(z):\n    return z\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [n for n in sys.modules if n.startswith(prefix)]:
        monkeypatch.delitem(sys.modules, name)


def test_the_code_key_covers_the_helpers_the_model_imports(tmp_path, monkeypatch):
    """A model whose forward calls a function from another file of one's own: editing that file (a second-level
    helper), or a third- or fourth-level one (reached through an import inside a function, then a package's relative
    import), changes the code key; the standard library and site-packages are not walked, so a change there does not
    (torch's version stands for torch). Guard: the old key read the model's own file only."""
    from pmp_lightning.cache import code_digest, model_modules

    prefix = "ck37"
    _helped_model(tmp_path, monkeypatch, prefix)

    def digest():
        for name in [n for n in sys.modules if n.startswith(prefix)]:
            del sys.modules[name]  # as a new process would: the files as they are now
        return code_digest(_import_fresh(tmp_path, f"{prefix}_mymods").Net(), f"{prefix}_mymods.Net")

    first = digest()
    assert digest() == first  # the same code, the same key
    walked = model_modules([f"{prefix}_mymods"])
    assert sorted(walked) == [f"{prefix}_deep", f"{prefix}_deep.inner", f"{prefix}_helpers", f"{prefix}_mymods"]
    assert "json" not in walked and f"{prefix}_vendored" not in walked and not any(n.startswith("torch") for n in walked)

    (tmp_path / f"{prefix}_helpers.py").write_text(HELPERS.format(prefix=prefix, edit=" * 5"))  # the helper's body
    second = digest()
    assert second != first
    (tmp_path / f"{prefix}_deep" / "__init__.py").write_text(DEEP.replace("torch.relu(z)", "torch.sigmoid(z)"))
    third = digest()
    assert third != second
    (tmp_path / f"{prefix}_deep" / "inner.py").write_text("def scale():\n    return 2.0\n")
    fourth = digest()
    assert fourth != third
    vendored = tmp_path / "lib" / "site-packages" / f"{prefix}_vendored.py"
    vendored.write_text("def identity(z):\n    return z * 3\n")  # installed code: outside the key
    assert digest() == fourth


def test_the_code_walk_survives_cycles_and_unparseable_files(tmp_path, monkeypatch):
    """Two modules importing each other are each read once; a helper that does not parse is still in the key (its
    bytes), and an import of a name that is nowhere is passed over."""
    from pmp_lightning.cache import model_modules

    (tmp_path / "cy37_a.py").write_text("import cy37_b\nimport no_such_module_anywhere\nfrom cy37_b import f, g\n")
    (tmp_path / "cy37_b.py").write_text("import cy37_a\nimport cy37_bad\ndef f(): pass\n")
    (tmp_path / "cy37_bad.py").write_text("def broken(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    walked = model_modules(["cy37_a"])
    assert sorted(walked) == ["cy37_a", "cy37_b", "cy37_bad"]
    assert walked["cy37_bad"] == str(tmp_path / "cy37_bad.py")


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


@pytest.mark.slow
def test_editing_a_helper_the_model_imports_retrains(tmp_path, monkeypatch):
    """End to end: a model whose forward calls a helper in another file trains afresh when that helper's body changes
    (the old key hit the cache: "train cache hit … replay cache hit", the same scores), and hits the cache when only
    a module in a site-packages folder changed."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    np.savez(tmp_path / "digits.npz", x=digits.images[:200].reshape(200, 1, 8, 8) / 16.0, y=digits.target[:200])
    prefix = "e2e37"
    _helped_model(tmp_path, monkeypatch, prefix)
    args = ("data=tensors", f"data.source.path={tmp_path / 'digits.npz'}", "~model", f"+model._target_={prefix}_mymods.Net",
            "data.pool_size=null", "data.test_size=40", "data.downstream_size=40", "trainer.max_epochs=1",
            "scoring.scores=[loss]", "scoring.canaries=0")

    def fresh_run(name: str) -> dict:
        for module in [n for n in sys.modules if n.startswith(prefix)]:
            del sys.modules[module]  # as a new process would import them
        return run(make_cfg(tmp_path / name, *args, cache=tmp_path / "cache"))

    first = fresh_run("a")
    assert fresh_run("b")["cache"]["computed"] == []
    (tmp_path / f"{prefix}_helpers.py").write_text(HELPERS.format(prefix=prefix, edit=" * 5"))
    edited = fresh_run("c")
    assert edited["cache"]["computed"] == ["train", "replay"] and edited["cache"]["train"] != first["cache"]["train"]
    (tmp_path / "lib" / "site-packages" / f"{prefix}_vendored.py").write_text("def identity(z):\n    return z\n\n# edited\n")
    assert fresh_run("d")["cache"]["computed"] == []
