"""Progress for people: live bars on a terminal, one line per epoch or snapshot in a file (CI, SLURM, nohup).

``progress(enabled)`` picks, for each fit: when stdout and stderr are terminals, ``Bars`` (Lightning's TQDM bar,
for the replay labelled with the snapshot θ_t it is scoring, with log records printed above it); otherwise
``LineProgress``, which prints one line when an epoch (training) or a snapshot (replay) is done: elapsed time,
rate, and the training loss or the costate norm ‖λ_{t+1}‖ the snapshot was scored with. It is one of the callbacks
every fit gets from ``conf/callbacks``.
"""
from __future__ import annotations

import logging
import sys
import time
import warnings
from contextlib import contextmanager

from pytorch_lightning.callbacks import ProgressBar, TQDMProgressBar


class Bars(TQDMProgressBar):
    """Lightning's bars, the replay's labelled with the snapshot θ_t it is scoring; while they are drawn, log records and
    warnings are printed on their own lines above them (``_log_above_bars``), from the fit's set-up to its end."""

    def __init__(self):
        super().__init__()
        self._logging_above = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self._logging_above is None:
            self._logging_above = _log_above_bars()
            self._logging_above.__enter__()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._stop_logging_above()
        super().teardown(trainer, pl_module, stage)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._stop_logging_above()

    def _stop_logging_above(self) -> None:
        if self._logging_above is not None:
            self._logging_above.__exit__(None, None, None)
            self._logging_above = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if hasattr(pl_module, "snapshot_of_epoch"):  # the replay: an epoch scores one snapshot, newest first
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


def progress(enabled: bool = True):
    """The progress callback for one fit (``conf/callbacks``, built afresh for each fit): none when disabled
    (``trainer.enable_progress_bar=false``), bars on a terminal, lines otherwise."""
    if not enabled:
        return None
    return Bars() if on_a_terminal() else LineProgress()


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
