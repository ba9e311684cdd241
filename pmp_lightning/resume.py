"""What a training needs to resume bit-identical after a kill: ``LastEpochCheckpoint``, an atomically written
``last.ckpt`` after every finished epoch, and ``RandomState``, the random number generators' states inside it, so that
the resumed training draws what the uninterrupted one would have drawn (each epoch's shuffle order, dropout masks)."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint


class LastEpochCheckpoint(ModelCheckpoint):
    """``dirpath/last.ckpt`` after every finished epoch, written to a temporary file and renamed, so a process killed
    while writing leaves the previous epoch's checkpoint whole (Lightning writes in place). A ModelCheckpoint, so that
    Lightning runs it after every other callback's epoch end (the snapshot of that epoch is in it)."""

    def __init__(self, dirpath: str | Path):
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=False)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        path = Path(self.dirpath) / "last.ckpt"
        partial = path.with_name("last.ckpt.partial")
        trainer.save_checkpoint(partial, weights_only=False)  # the whole state (said, Lightning logs a line per epoch)
        if trainer.is_global_zero:
            os.replace(partial, path)


class RandomState(Callback):
    """Keeps Python's, NumPy's and torch's generator states (CPU and CUDA) as of the checkpoint; a fit resumed from
    that checkpoint restores them before it draws anything. Lightning's own checkpoint does not hold them."""

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()  # as plain values: checkpoints load weights_only
        state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
                 "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the generators at once: Lightning restores callbacks before the fit loop makes the first epoch's
        data iterator, whose shuffle order draws from them (on_train_start would come after it)."""
        random.setstate(state_dict["python"])
        kind, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
