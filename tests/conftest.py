import pytorch_lightning as pl
import torch

from pmp_lightning.data import Images


class RandomSource:
    """Gaussian 'images' with labels from a random linear teacher: tiny, offline, learnable."""

    def __init__(self, n: int = 60, shape=(1, 2, 2), num_classes: int = 10, seed: int = 0, dtype=torch.float32, test_n: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n + test_n, *shape, generator=gen, dtype=dtype)
        teacher = torch.randn(int(torch.tensor(shape).prod()), num_classes, generator=gen, dtype=dtype)
        self.y = (self.x.flatten(1) @ teacher).argmax(1)
        self.n, self.test_n = n, test_n

    def load(self):
        train = Images(self.x[: self.n], self.y[: self.n])
        return train, (Images(self.x[self.n :], self.y[self.n :]) if self.test_n else None)


def fit_replay(replay, root=None):
    """Run a ReplayModule through its own Trainer, quietly, as the pipeline does."""
    pl.Trainer(max_epochs=replay.T, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, default_root_dir=root).fit(replay)
    return replay
