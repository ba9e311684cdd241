"""A killed replay resumes after its last finished snapshot (training's resume is in test_snapshot.py)."""
import json
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

# run.py with the replay's training_step (or its epoch end, where λ is carried back and the progress saved) patched to
# SIGKILL its own process in snapshot number DONE + 1 (counting from the newest), as preemption or the OOM killer would
KILLED_RUN = """
import os, runpy, signal, sys
from pmp_lightning.replay.module import ReplayModule

step, end = ReplayModule.training_step, ReplayModule.on_train_epoch_end
def dying(self, batch, batch_idx):
    if self.done.sum() == {done} and batch_idx == 1 and "{where}" == "step":
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, batch, batch_idx)
def dying_at_the_end(self):
    if self.done.sum() == {done} and "{where}" == "epoch_end":
        os.kill(os.getpid(), signal.SIGKILL)
    return end(self)
ReplayModule.training_step, ReplayModule.on_train_epoch_end = dying, dying_at_the_end
sys.argv = ["run.py", *{args!r}]
runpy.run_path("run.py", run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("where", ["step", "epoch_end"])
def test_a_killed_replay_resumes_and_ends_bit_identical(tmp_path, where):
    """Killed halfway through a snapshot's batches, or after its statistics but before λ is carried back and saved: the
    snapshot is redone, its progress line was never printed (the count goes on where it stopped), the recorded replay
    cost holds the time before the kill too, and the results are bit-identical to an uninterrupted run's."""
    args = [*SMALL, "scoring.scores=[raw,cosine,loss]", f"paths.cache_dir={tmp_path / 'cache'}",
            "trainer.enable_progress_bar=true"]  # not on a terminal: a line per epoch and snapshot
    first = subprocess.run([sys.executable, "-c", KILLED_RUN.format(done=2, where=where,
                                                                    args=[*args, f"hydra.run.dir={tmp_path / 'a'}"])],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    killed_log = first.stdout + first.stderr
    assert "replay θ_4 (1/5)" in killed_log and "replay θ_3 (2/5)" in killed_log and "replay θ_2" not in killed_log
    entry = next((tmp_path / "cache" / "replay").glob("[!.]*"))
    assert not (entry / MANIFEST).exists() and not (entry / "stats.npz").exists()  # a partial entry, not taken for done
    with np.load(entry / "costate.npz") as z:
        assert z["done"].tolist() == [False, False, False, True, True]  # θ_4 (the trained model) and θ_3 were done
        before = float(z["seconds"].sum())
    assert sorted(p.name for p in (entry / "rows").iterdir()) == ["row_00003.npz", "row_00004.npz"]

    again = subprocess.run([sys.executable, "run.py", *args, f"hydra.run.dir={tmp_path / 'b'}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert "train cache hit" in log and "2 of 5 snapshots already done" in log and "replay: 3 snapshots" in log
    assert [f"replay θ_{t} ({5 - t}/5)" in log for t in (2, 1, 0)] == [True] * 3 and "replay θ_3" not in log
    resumed = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert before > 0 and resumed["cost_s"]["replay"] == pytest.approx(resumed["timings"]["replay"] + before, abs=2e-3)

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
