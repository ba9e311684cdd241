"""Networks (plain ``nn.Sequential`` of Linear / Conv2d layers) and the training LightningModule."""
from __future__ import annotations

from typing import Callable

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn


def reported_cnn(num_classes: int = 10) -> nn.Sequential:
    """The CNN from the problem report: conv 32 -> conv 64 -> max-pool -> dropout -> fc 128 -> dropout -> fc."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(),
        nn.Conv2d(32, 64, 3), nn.ReLU(),
        nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten(),
        nn.Linear(9216, 128), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(128, num_classes),
    )


def small_cnn(num_classes: int = 10) -> nn.Sequential:
    """A ~20k-parameter CNN for quick experiments."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, stride=2), nn.ReLU(),   # 12x12
        nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),  # 5x5
        nn.Flatten(), nn.Linear(800, num_classes),
    )


def mlp(num_classes: int = 10, in_features: int = 784, hidden: int = 128) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def logistic_regression(num_classes: int = 10, in_features: int = 784) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))


@torch.no_grad()
def predict_proba(net: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> np.ndarray:
    """Softmax probabilities of ``net`` (switched to eval mode) for the inputs ``x``, as float64 (N, K)."""
    net.eval()
    device = next(net.parameters()).device
    return torch.cat([net(chunk.to(device)).double().softmax(1).cpu() for chunk in x.split(batch_size)]).numpy()


class Classifier(pl.LightningModule):
    """Trains ``net`` with cross-entropy; the optimizer and learning-rate schedule are Hydra partials."""

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_schedule: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
    ):
        super().__init__()
        self.net, self.optimizer_factory, self.lr_schedule = net, optimizer, lr_schedule

    @classmethod
    def from_config(cls, cfg) -> "Classifier":
        """The classifier a run's Hydra config describes: ``model``, ``optimizer``, ``lr_schedule``."""
        return cls(
            net=instantiate(cfg.model),
            optimizer=instantiate(cfg.optimizer),
            lr_schedule=instantiate(cfg.lr_schedule) if cfg.get("lr_schedule") else None,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def test_step(self, batch, batch_idx):
        x, y, _ = batch
        acc = (self.net(x).argmax(1) == y).float().mean()
        self.log("test/accuracy", acc, on_step=False, on_epoch=True, batch_size=len(y), sync_dist=True)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.lr_schedule is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_schedule(optimizer), "interval": "epoch"}}
