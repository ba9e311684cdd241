"""Killed runs resume: the replay after its last finished snapshot, training from its Lightning checkpoint."""
import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from callbacks.theta_snapshot import ThetaSnapshot, load_manifest, load_snapshot
from pmp_lightning.cache import MANIFEST
from pmp_lightning.data import LabelNoise, PoolDataModule
from pmp_lightning.models import Classifier, mlp
from pmp_lightning.pipeline import run
from tests.conftest import RandomSource
from tests.test_pipeline import ROOT, SMALL, make_cfg

# run.py with the replay's training_step patched to SIGKILL its own process halfway through snapshot
# number DONE + 1 (counting from the newest), as preemption or the OOM killer would
KILLED_RUN = """
import os, runpy, signal, sys
from pmp_lightning.replay import ReplayModule

step = ReplayModule.training_step
def dying(self, batch, batch_idx):
    if self.done.sum() == {done} and batch_idx == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, batch, batch_idx)
ReplayModule.training_step = dying
sys.argv = ["run.py", *{args!r}]
runpy.run_path("run.py", run_name="__main__")
"""


def test_a_killed_replay_resumes_and_ends_bit_identical(tmp_path):
    args = [*SMALL, "scoring.scores=[raw,cosine,loss]", f"paths.cache_dir={tmp_path / 'cache'}"]
    first = subprocess.run([sys.executable, "-c", KILLED_RUN.format(done=2, args=[*args, f"hydra.run.dir={tmp_path / 'a'}"])],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    entry = next((tmp_path / "cache" / "replay").glob("[!.]*"))
    assert not (entry / MANIFEST).exists() and not (entry / "stats.npz").exists()  # a partial entry, not taken for done
    with np.load(entry / "costate.npz") as z:
        assert z["done"].tolist() == [False, False, True, True]
    assert sorted(p.name for p in (entry / "rows").iterdir()) == ["row_00002.npz", "row_00003.npz"]

    again = subprocess.run([sys.executable, "run.py", *args, f"hydra.run.dir={tmp_path / 'b'}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert "train cache hit" in log and "2 of 4 snapshots already done" in log and "replay: 2 snapshots" in log

    # an uninterrupted run from scratch (it retrains too): the same seed gives the same bits
    uninterrupted = run(make_cfg(tmp_path / "c", "scoring.scores=[raw,cosine,loss]", cache=tmp_path / "cache2"))
    assert uninterrupted["cache"]["computed"] == ["train", "replay"]
    with np.load(entry / "stats.npz") as resumed, np.load(tmp_path / "c" / "replay" / "stats.npz") as straight:
        assert resumed.files == straight.files
        for name in straight.files:
            assert np.array_equal(resumed[name], straight[name], equal_nan=True), name
    assert (tmp_path / "b" / "scores.csv").read_bytes() == (tmp_path / "c" / "scores.csv").read_bytes()


def test_a_replay_progress_from_other_settings_or_damaged_is_refused(tmp_path):
    from pmp_lightning.errors import ReplayConfigError, SnapshotError
    from pmp_lightning.replay import ReplayModule

    dm, snaps = _train(tmp_path, max_epochs=2)
    ReplayModule(mlp(in_features=4, hidden=5), snaps, dm.pool, dm.downstream, dm.train_set, progress_dir=tmp_path / "p")
    replay = ReplayModule(mlp(in_features=4, hidden=5), snaps, dm.pool, dm.downstream, dm.train_set, progress_dir=tmp_path / "p")
    pl.Trainer(max_epochs=replay.T, logger=False, enable_checkpointing=False, enable_progress_bar=False).fit(replay)
    with pytest.raises(ReplayConfigError, match="other snapshots, pool or replay settings; delete"):
        ReplayModule(mlp(in_features=4, hidden=5), snaps, dm.pool, dm.downstream, dm.train_set, curvature="none",
                     progress_dir=tmp_path / "p")
    costate = tmp_path / "p" / "costate.npz"
    costate.write_bytes(costate.read_bytes()[:100])  # e.g. copied off a full disk
    with pytest.raises(SnapshotError, match="progress in .* cannot be read .*; delete it and rerun"):
        ReplayModule(mlp(in_features=4, hidden=5), snaps, dm.pool, dm.downstream, dm.train_set, progress_dir=tmp_path / "p")


def _datamodule():
    return PoolDataModule(RandomSource(n=40), LabelNoise("none", 0.0), pool_size=24, downstream_size=8, test_size=8, batch_size=8)


def _train(root, max_epochs, callbacks=(), ckpt_path=None):
    pl.seed_everything(0)
    dm = _datamodule()
    model = Classifier(mlp(in_features=4, hidden=5), optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    snapshot = ThetaSnapshot(root / "snaps", every_n_epochs=1)
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=[snapshot, *callbacks], logger=False,
                         enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    dm.setup()
    return dm, root / "snaps"


class _KillAt(pl.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt  # Lightning's shutdown path on a signal (SIGINT, SIGTERM under SLURM)


def test_training_killed_mid_epoch_resumes_from_its_checkpoint_without_gaps_or_duplicates(tmp_path):
    _train(tmp_path / "straight", max_epochs=4)
    part = tmp_path / "part"
    every_step = ModelCheckpoint(dirpath=part / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0)
    with pytest.raises(SystemExit):
        _train(part, max_epochs=4, callbacks=[every_step, _KillAt(step=7)])  # 3 steps per epoch: mid epoch 2
    assert json.loads((part / "snaps" / "manifest.json").read_text())["complete"] is False

    _train(part, max_epochs=4, ckpt_path=str(part / "ckpt" / "last.ckpt"),
           callbacks=[ModelCheckpoint(dirpath=part / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0)])
    a, b = load_manifest(tmp_path / "straight" / "snaps"), load_manifest(part / "snaps")
    assert [(s["t"], s["step"], len(s["lrs"])) for s in b["snapshots"]] == [(0, 0, 0), (1, 3, 3), (2, 6, 3), (3, 9, 3), (4, 12, 3)]
    assert [s["step"] for s in a["snapshots"]] == [s["step"] for s in b["snapshots"]]
    assert sorted(p.name for p in (part / "snaps").iterdir()) == ["manifest.json"] + [f"theta_{t:04d}.pt" for t in range(5)]
    # θ_0..θ_2 were written before the kill and stay as they were. Later ones follow another (equally valid)
    # trajectory: Lightning finishes the interrupted epoch with batches drawn afresh, as its warning says,
    # because a plain DataLoader cannot resume mid-epoch.
    for sa, sb in zip(a["snapshots"][:3], b["snapshots"][:3]):
        for k, v in load_snapshot(tmp_path / "straight" / "snaps", sa).items():
            torch.testing.assert_close(load_snapshot(part / "snaps", sb)[k], v, rtol=0, atol=0)
