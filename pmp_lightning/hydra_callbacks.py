"""What Hydra calls around a run or a sweep (``conf/hydra/default.yaml``), kept light: Hydra loads this module before
the task function, so nothing heavy is imported until a callback needs it."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)


class WritableOutputs(Callback):
    """Hydra makes the run's (or the sweep's) directory before the task function starts, so an unwritable
    ``hydra.run.dir`` would end in Hydra's traceback, never reaching the run's own check: this names it first, in one
    line. It looks at the nearest directory that exists and creates nothing (the name holds the time, which Hydra
    reads again)."""

    def on_run_start(self, config, **kwargs) -> None:
        _require_writable_parent(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config, **kwargs) -> None:
        _require_writable_parent(config.hydra.sweep.dir, "hydra.sweep.dir")


def _require_writable_parent(directory: str, setting: str) -> None:
    path = Path(directory).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        why = "not a directory" if not existing.is_dir() else "not writable"
        logging.getLogger("run").error(f"OutputError: cannot write to {path} ({existing} is {why}); point {setting} at a "
                                       f"writable directory")
        sys.exit(1)


class CompareAtSweepEnd(Callback):
    """Write the comparison report into the sweep directory when a multirun ends (``report/compare.py``)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        from pmp_lightning.report.compare import compare

        try:
            compare(config.hydra.sweep.dir)
        except FileNotFoundError as err:  # every job failed: nothing to compare
            log.warning(str(err))
