"""Train and replay once; score many times. Entries are checked on reload."""
import json
import logging

import pytest

from pmp_lightning.cache import MANIFEST, CacheError
from pmp_lightning.pipeline import run
from tests.test_pipeline import make_cfg


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_runs")
    return root, run(make_cfg(root / "first", cache=root / "cache"))


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


def test_a_curvature_change_replays_but_does_not_retrain(first):
    root, metrics = first
    other = run(make_cfg(root / "third", "replay.curvature=none", "scoring=raw", cache=root / "cache"))
    assert other["cache"]["computed"] == ["replay"] and other["cache"]["train"] == metrics["cache"]["train"]


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
