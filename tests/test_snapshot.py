"""ThetaSnapshot: files, manifest, atomic writes, resume (also mid-epoch)."""
import errno
import json

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

import pmp_lightning.io as pio
from callbacks.theta_snapshot import ThetaSnapshot
from pmp_lightning.trajectory import load_manifest, load_snapshot
from pmp_lightning.data.labelled import PoolDataModule
from pmp_lightning.data.noise import LabelNoise
from pmp_lightning.models.classifiers import mlp
from pmp_lightning.training import Classifier
from tests.conftest import RandomSource

LR = 0.1


def _fit(root, snapshot, max_epochs, ckpt_path=None, callbacks=()):
    pl.seed_everything(0)
    dm = PoolDataModule(RandomSource(n=40), LabelNoise("none", 0.0), pool_size=24, downstream_size=8, test_size=8, batch_size=8)
    model = Classifier(mlp(in_features=4, hidden=5), optimizer=lambda params: torch.optim.SGD(params, lr=LR))
    trainer = pl.Trainer(
        max_epochs=max_epochs, callbacks=[snapshot, *callbacks], logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


def test_every_epoch_files_and_manifest(tmp_path):
    model = _fit(tmp_path, ThetaSnapshot(tmp_path / "snaps", every_n_epochs=1), max_epochs=3)
    m = load_manifest(tmp_path / "snaps")
    assert m["complete"] and m["batches_per_epoch"] == 3
    assert [s["step"] for s in m["snapshots"]] == [0, 3, 6, 9]
    assert [s["epoch"] for s in m["snapshots"]][1:] == [0, 1, 2]
    assert m["snapshots"][0]["lr_sum"] == 0 and all(s["lr_sum"] == pytest.approx(3 * LR) for s in m["snapshots"][1:])
    assert all(s["lrs"] == [LR] * 3 for s in m["snapshots"][1:])
    assert m["optimizer"] == {"name": "SGD", "momentum": 0.0, "weight_decay": 0.0, "nesterov": False, "dampening": 0.0}
    assert m["param_shapes"]["net.1.weight"] == [5, 4]
    assert sorted(p.name for p in (tmp_path / "snaps").iterdir()) == ["manifest.json"] + [f"theta_{t:04d}.pt" for t in range(4)]
    final = load_snapshot(tmp_path / "snaps", m["snapshots"][-1])
    for k, v in model.state_dict().items():
        torch.testing.assert_close(final[k], v)
    assert not torch.equal(load_snapshot(tmp_path / "snaps", m["snapshots"][0])["net.1.weight"], final["net.1.weight"])


def test_every_n_steps_and_the_final_partial_interval(tmp_path):
    _fit(tmp_path, ThetaSnapshot(tmp_path / "snaps", every_n_epochs=None, every_n_steps=2), max_epochs=3)
    m = load_manifest(tmp_path / "snaps")
    assert [s["step"] for s in m["snapshots"]] == [0, 2, 4, 6, 8, 9]
    assert [len(s["lrs"]) for s in m["snapshots"]] == [0, 2, 2, 2, 2, 1]


def test_a_failed_write_leaves_no_file_that_looks_complete(tmp_path, monkeypatch):
    def disk_full(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"half a tensor")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pio.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        pio.save_torch(tmp_path / "theta_0000.pt", {"w": torch.zeros(2)})
    assert list(tmp_path.iterdir()) == []


def test_the_manifest_marks_a_partial_trajectory(tmp_path):
    snap = ThetaSnapshot(tmp_path / "snaps", every_n_epochs=1)

    class Crash(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                raise KeyboardInterrupt  # Lightning's graceful shutdown path, as after Ctrl-C

    pl.seed_everything(0)
    dm = PoolDataModule(RandomSource(n=40), LabelNoise("none", 0.0), pool_size=24, downstream_size=8, test_size=8, batch_size=8)
    model = Classifier(mlp(in_features=4, hidden=5), optimizer=lambda params: torch.optim.SGD(params, lr=LR))
    trainer = pl.Trainer(max_epochs=4, callbacks=[snap, Crash()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(SystemExit):
        trainer.fit(model, datamodule=dm)
    manifest = json.loads((tmp_path / "snaps" / "manifest.json").read_text())
    assert manifest["complete"] is False and len(manifest["snapshots"]) == 3
    with pytest.raises(Exception, match="partial trajectory"):
        load_manifest(tmp_path / "snaps")


def test_resume_continues_without_duplicates_or_gaps(tmp_path):
    full = tmp_path / "full"
    _fit(full, ThetaSnapshot(full / "snaps", every_n_epochs=1), max_epochs=4)

    part = tmp_path / "part"
    ckpt = ModelCheckpoint(dirpath=part / "ckpt", save_last=True)
    _fit(part, ThetaSnapshot(part / "snaps", every_n_epochs=1), max_epochs=2, callbacks=[ckpt])
    _fit(part, ThetaSnapshot(part / "snaps", every_n_epochs=1), max_epochs=4, ckpt_path=str(part / "ckpt" / "last.ckpt"),
         callbacks=[ModelCheckpoint(dirpath=part / "ckpt", save_last=True)])

    a, b = load_manifest(full / "snaps"), load_manifest(part / "snaps")
    assert [s["step"] for s in b["snapshots"]] == [0, 3, 6, 9, 12]
    assert [(s["file"], s["step"], s["lrs"]) for s in a["snapshots"]] == [(s["file"], s["step"], s["lrs"]) for s in b["snapshots"]]
    # θ_0..θ_2 were written before the interruption and are left as they were; later ones differ from the
    # uninterrupted run only through the DataLoader's shuffle order, which a Lightning checkpoint does not restore
    for sa, sb in zip(a["snapshots"][:3], b["snapshots"][:3]):
        for k, v in load_snapshot(full / "snaps", sa).items():
            torch.testing.assert_close(load_snapshot(part / "snaps", sb)[k], v)


class _KillAt(pl.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt  # Lightning's shutdown path on a signal (SIGINT, SIGTERM under SLURM)


def test_training_killed_mid_epoch_resumes_from_its_checkpoint_without_gaps_or_duplicates(tmp_path):
    _fit(tmp_path / "straight", ThetaSnapshot(tmp_path / "straight" / "snaps", every_n_epochs=1), max_epochs=4)
    part = tmp_path / "part"
    every_step = ModelCheckpoint(dirpath=part / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0)
    with pytest.raises(SystemExit):
        _fit(part, ThetaSnapshot(part / "snaps", every_n_epochs=1), max_epochs=4, callbacks=[every_step, _KillAt(step=7)])  # 3 steps per epoch: mid epoch 2
    assert json.loads((part / "snaps" / "manifest.json").read_text())["complete"] is False

    _fit(part, ThetaSnapshot(part / "snaps", every_n_epochs=1), max_epochs=4, ckpt_path=str(part / "ckpt" / "last.ckpt"),
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
