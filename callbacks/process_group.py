"""``ReleaseSpawnedProcessGroup``: let ``ddp_spawn`` workers exit cleanly.

A spawned worker leaves through ``os._exit``, which skips the atexit hook that would destroy its
process group (Lightning registers one for NCCL only); a gloo group left alive makes the worker
abort on exit (``terminate called without an active exception``, SIGABRT), and the launcher then
fails the whole run. Nothing talks across ranks after the teardown hooks, so the group goes there.
"""
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.strategies.launchers.multiprocessing import _MultiProcessingLauncher


class ReleaseSpawnedProcessGroup(Callback):
    def teardown(self, trainer, pl_module, stage: str) -> None:
        if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher) and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
