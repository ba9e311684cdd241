"""``ThetaSnapshot``: saves θ_t during training for the backward PMP replay, in the format of
``pmp_lightning/trajectory.py`` (snapshot files and their manifest)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from pmp_lightning.errors import SnapshotError
from pmp_lightning.io import save_torch
from pmp_lightning.trajectory import (adam_moments, adam_preconditioner, moments_file, preconditioner_file, snapshot_file,
                                      write_manifest, write_snapshot)


class ThetaSnapshot(Callback):
    """Write θ_0 before the first step, then every ``every_n_epochs`` epochs or ``every_n_steps`` steps,
    and θ_T at the end of training. Writes happen on global rank zero only, atomically."""

    def __init__(self, dirpath: str, every_n_epochs: int | None = 1, every_n_steps: int | None = None):
        if (every_n_epochs is None) == (every_n_steps is None):
            raise ValueError("ThetaSnapshot takes exactly one of every_n_epochs and every_n_steps")
        if (every_n_epochs or every_n_steps) < 1:
            raise ValueError("ThetaSnapshot's interval must be a positive number of epochs or steps")
        self.dirpath = Path(dirpath)
        self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
        self._snapshots: list[dict[str, Any]] = []
        self._lrs: list[float] = []

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._snapshots:  # a resumed run already has θ_0
            self._write(trainer, pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.sanity_checking:
            return
        lrs = {group["lr"] for group in optimizer.param_groups}
        if len(lrs) != 1:
            raise SnapshotError(f"parameter groups with different learning rates {sorted(lrs)} cannot be replayed")
        self._lrs.append(float(lrs.pop()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and self._lrs and trainer.global_step % self.every_n_steps == 0:
            self._write(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.every_n_epochs and self._lrs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._lrs:  # steps since the last snapshot: θ_T is the final model
            self._write(trainer, pl_module)
        if trainer.is_global_zero:
            self._save_manifest(trainer, pl_module, complete=True)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"snapshots": [dict(s) for s in self._snapshots], "lrs": list(self._lrs)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._snapshots = [dict(s) for s in state_dict["snapshots"]]
        self._lrs = list(state_dict["lrs"])

    # ------------------------------------------------------------------ writing
    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        t = len(self._snapshots)
        entry = {
            "t": t,
            "file": snapshot_file(t),
            "step": int(trainer.global_step),
            "epoch": int(trainer.current_epoch),
            "lr_sum": float(sum(self._lrs)),
            "lrs": list(self._lrs),
        }
        precond = adam_preconditioner(pl_module, trainer.optimizers[0]) if t and trainer.optimizers else None
        if precond is not None:
            entry["preconditioner"] = preconditioner_file(t)
        # Adam's moments too, for the adjoint of (θ, m, v): exact with a snapshot after every step, folded otherwise
        moments = adam_moments(pl_module, trainer.optimizers[0]) if trainer.optimizers else None
        if moments is not None:
            entry["moments"] = moments_file(t)
        if trainer.is_global_zero:
            write_snapshot(self.dirpath, t, {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()})
            if precond is not None:
                save_torch(self.dirpath / entry["preconditioner"], precond)
            if moments is not None:
                save_torch(self.dirpath / entry["moments"], moments)
        self._snapshots.append(entry)
        self._lrs = []
        if trainer.is_global_zero:
            self._save_manifest(trainer, pl_module, complete=False)

    def _save_manifest(self, trainer: pl.Trainer, pl_module: pl.LightningModule, complete: bool) -> None:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        write_manifest(
            self.dirpath,
            {
                "complete": complete,
                "model": type(getattr(pl_module, "net", pl_module)).__name__,
                "param_shapes": {k: list(v.shape) for k, v in pl_module.state_dict().items()},
                "dtype": str(next(pl_module.parameters()).dtype).replace("torch.", ""),
                "optimizer": _describe(optimizer),
                "batches_per_epoch": trainer.num_training_batches,
                "interval": {"every_n_epochs": self.every_n_epochs, "every_n_steps": self.every_n_steps},
                "snapshots": self._snapshots,
            },
        )


def _describe(optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    if optimizer is None:
        return {}
    group = optimizer.param_groups[0]
    keep = ("momentum", "weight_decay", "nesterov", "betas", "dampening", "eps", "amsgrad", "decoupled_weight_decay")
    return {"name": type(optimizer).__name__, **{k: group[k] for k in keep if k in group}}
