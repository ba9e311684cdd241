"""A progress bar for the backward replay: one bar per snapshot, labelled θ_t, newest first."""
from pytorch_lightning.callbacks import TQDMProgressBar


class ReplayProgressBar(TQDMProgressBar):
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        t = pl_module.snapshot_of_epoch(trainer.current_epoch)
        self.train_progress_bar.set_description(f"replay θ_{t} ({trainer.current_epoch + 1}/{trainer.max_epochs})")
