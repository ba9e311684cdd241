"""A killed replay resumes after its last finished snapshot (training's resume is in test_snapshot.py)."""
import signal
import subprocess
import sys

import numpy as np
import pytest

from pmp_lightning.cache import MANIFEST
from pmp_lightning.errors import ReplayConfigError, SnapshotError
from pmp_lightning.models.classifiers import mlp
from pmp_lightning.pipeline import run
from pmp_lightning.replay.module import ReplayModule
from tests.conftest import fit_replay
from tests.test_pipeline import ROOT, SMALL, make_cfg

# run.py with the replay's training_step patched to SIGKILL its own process halfway through snapshot
# number DONE + 1 (counting from the newest), as preemption or the OOM killer would
KILLED_RUN = """
import os, runpy, signal, sys
from pmp_lightning.replay.module import ReplayModule

step = ReplayModule.training_step
def dying(self, batch, batch_idx):
    if self.done.sum() == {done} and batch_idx == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, batch, batch_idx)
ReplayModule.training_step = dying
sys.argv = ["run.py", *{args!r}]
runpy.run_path("run.py", run_name="__main__")
"""


@pytest.mark.slow
def test_a_killed_replay_resumes_and_ends_bit_identical(tmp_path):
    args = [*SMALL, "scoring.scores=[raw,cosine,loss]", f"paths.cache_dir={tmp_path / 'cache'}"]
    first = subprocess.run([sys.executable, "-c", KILLED_RUN.format(done=2, args=[*args, f"hydra.run.dir={tmp_path / 'a'}"])],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    entry = next((tmp_path / "cache" / "replay").glob("[!.]*"))
    assert not (entry / MANIFEST).exists() and not (entry / "stats.npz").exists()  # a partial entry, not taken for done
    with np.load(entry / "costate.npz") as z:
        assert z["done"].tolist() == [False, False, False, True, True]  # θ_4 (the trained model) and θ_3 were done
    assert sorted(p.name for p in (entry / "rows").iterdir()) == ["row_00003.npz", "row_00004.npz"]

    again = subprocess.run([sys.executable, "run.py", *args, f"hydra.run.dir={tmp_path / 'b'}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert "train cache hit" in log and "2 of 5 snapshots already done" in log and "replay: 3 snapshots" in log

    # an uninterrupted run from scratch (it retrains too): the same seed gives the same bits
    uninterrupted = run(make_cfg(tmp_path / "c", "scoring.scores=[raw,cosine,loss]", cache=tmp_path / "cache2"))
    assert uninterrupted["cache"]["computed"] == ["train", "replay"]
    with np.load(entry / "stats.npz") as resumed, np.load(tmp_path / "c" / "replay" / "stats.npz") as straight:
        assert resumed.files == straight.files
        for name in straight.files:
            assert np.array_equal(resumed[name], straight[name], equal_nan=resumed[name].dtype.kind == "f"), name
    assert (tmp_path / "b" / "scores.csv").read_bytes() == (tmp_path / "c" / "scores.csv").read_bytes()


def test_a_replay_progress_from_other_settings_or_damaged_is_refused(trained, tmp_path):
    dm, snaps = trained

    def replay(**kw):
        return ReplayModule(mlp(in_features=4, hidden=5), snaps, dm.pool, dm.downstream, dm.train_set, progress_dir=tmp_path / "p", **kw)

    fit_replay(replay())
    with pytest.raises(ReplayConfigError, match="other snapshots, pool or replay settings; delete"):
        replay(curvature="none")
    costate = tmp_path / "p" / "costate.npz"
    costate.write_bytes(costate.read_bytes()[:100])  # e.g. copied off a full disk
    with pytest.raises(SnapshotError, match="progress in .* cannot be read .*; delete it and rerun"):
        replay()
