"""Progress for people: live bars on a terminal, one line per epoch or snapshot in a file (CI, SLURM, nohup).

``progress_callbacks(enabled, replay)`` picks: when stdout and stderr are terminals, Lightning's
TQDM bar (for the replay labelled with the snapshot θ_t it is scoring); otherwise ``LineProgress``,
which prints one line when an epoch (training) or a snapshot (replay) is done: elapsed time, rate,
and the training loss or the costate norm ‖λ_{t+1}‖ the snapshot was scored with.
"""
from __future__ import annotations

import logging
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext

from pytorch_lightning.callbacks import ProgressBar, TQDMProgressBar


class ReplayProgressBar(TQDMProgressBar):
    """A bar per snapshot, labelled θ_t, newest first."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        t = pl_module.snapshot_of_epoch(trainer.current_epoch)
        self.train_progress_bar.set_description(f"replay θ_{t} ({trainer.current_epoch + 1}/{trainer.max_epochs})")


class LineProgress(ProgressBar):
    """One printed line per finished training epoch or replay snapshot; nothing per batch."""

    def __init__(self):
        super().__init__()
        self._enabled = True
        self._start = self._epoch_start = 0.0
        self._examples = 0
        self._pending = None  # a replay snapshot's line, said once the module has finished that snapshot

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._say_pending()
        self._epoch_start, self._examples = time.perf_counter(), 0

    def on_train_end(self, trainer, pl_module) -> None:
        self._say_pending()

    def _say_pending(self) -> None:
        """The replay's line for the snapshot just finished: only now, after the module's own epoch end has carried λ
        back and saved the snapshot's progress, is it done (a kill before that redoes it), and its time whole."""
        if self._pending is not None:
            self._say(*self._pending)
            self._pending = None

    def _say(self, what: str, extra: str) -> None:
        now = time.perf_counter()
        took = now - self._epoch_start
        rate = f"{self._examples / took:.0f} examples/s" if took > 0 else "-"
        print(f"{what}: {took:.1f} s, {rate}, {extra}; elapsed {now - self._start:.1f} s", flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._examples += len(batch[0])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._enabled or not trainer.is_global_zero:
            return
        if hasattr(pl_module, "snapshot_of_epoch"):  # the replay: an epoch scores one snapshot with λ_{t+1}
            t = pl_module.snapshot_of_epoch(trainer.current_epoch)
            # counted over the whole trajectory, so a resumed replay goes on counting where the interrupted one stopped;
            # callbacks run before the module's own epoch end, so λ is still λ_{t+1} (θ_T has none yet)
            extra = f"‖λ_{t + 1}‖ = {float(pl_module.lam.norm()):.3g}" if t < pl_module.T else "the trained model, for the baselines"
            self._pending = (f"replay θ_{t} ({pl_module.T - t + 1}/{pl_module.T + 1})", extra)
            return
        loss = trainer.callback_metrics.get("train/loss")
        self._say(f"train epoch ({trainer.current_epoch + 1}/{trainer.max_epochs})",
                  f"loss {float(loss):.4f}" if loss is not None else "")


def on_a_terminal() -> bool:
    return sys.stdout.isatty() and sys.stderr.isatty()


def progress_callbacks(enabled: bool, replay: bool = False) -> list:
    """The progress callback for a fit: none when disabled, bars on a terminal, lines otherwise."""
    if not enabled:
        return []
    if on_a_terminal():
        return [ReplayProgressBar()] if replay else [TQDMProgressBar()]
    return [LineProgress()]


@contextmanager
def _log_above_bars():
    from tqdm.contrib.logging import logging_redirect_tqdm

    captured = getattr(warnings.showwarning, "__module__", None) == "logging"  # run.py captures them for run.log
    logging.captureWarnings(True)  # warnings.warn goes through logging too, so it cannot land inside a bar
    try:
        with logging_redirect_tqdm():
            yield
    finally:
        logging.captureWarnings(captured)


def log_above_bars(enabled: bool):
    """While bars are drawn on a terminal, print log records and warnings on their own lines above the bar."""
    return _log_above_bars() if enabled and on_a_terminal() else nullcontext()
