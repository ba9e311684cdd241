import pytest
import pytorch_lightning as pl
import torch

from callbacks.theta_snapshot import ThetaSnapshot
from pmp_lightning.data.labelled import PoolDataModule
from pmp_lightning.data.sources import Images
from pmp_lightning.data.noise import LabelNoise
from pmp_lightning.models.classifiers import mlp
from pmp_lightning.training import Classifier


class RandomSource:
    """Gaussian 'images' with labels from a random linear teacher: tiny, offline, learnable."""

    def __init__(self, n: int = 60, shape=(1, 2, 2), num_classes: int = 10, seed: int = 0, dtype=torch.float32, test_n: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n + test_n, *shape, generator=gen, dtype=dtype)
        teacher = torch.randn(int(torch.tensor(shape).prod()), num_classes, generator=gen, dtype=dtype)
        self.y = (self.x.flatten(1) @ teacher).argmax(1)
        self.n, self.test_n = n, test_n
        self.num_classes = num_classes  # declared, as a real source's class list is: a class may have no example here

    def load(self):
        train = Images(self.x[: self.n], self.y[: self.n])
        return train, (Images(self.x[self.n :], self.y[self.n :]) if self.test_n else None)


def fit_replay(replay, root=None, accelerator="auto"):
    """Run a ReplayModule through its own Trainer, quietly, as the pipeline does."""
    pl.Trainer(max_epochs=replay.remaining, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, default_root_dir=root, accelerator=accelerator, devices=1).fit(replay)
    return replay


@pytest.fixture
def trained(tmp_path):
    """A tiny noisy pool, its datamodule and the snapshots of 2 epochs of SGD: ``(dm, tmp_path / "snaps")``."""
    pl.seed_everything(0)
    dm = PoolDataModule(RandomSource(n=40), LabelNoise("symmetric", 0.2), pool_size=24, downstream_size=8, test_size=8, batch_size=8)
    model = Classifier(mlp(in_features=4, hidden=5), optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    pl.Trainer(max_epochs=2, callbacks=[ThetaSnapshot(tmp_path / "snaps")], logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(model, datamodule=dm)
    return dm, tmp_path / "snaps"
