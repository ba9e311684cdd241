"""A model of your own: any ``nn.Module`` whose parameters sit in ``nn.Linear`` and ``nn.Conv2d`` layers
(activations, pooling, dropout and flattening are free). The replay computes its per-example statistics
exactly for those two layer types and refuses a model with any other parameterised layer."""
from torch import nn


class TinyConvNet(nn.Sequential):
    """conv 3×3 -> ReLU -> max-pool 2 -> linear, for small square images."""

    def __init__(self, num_classes: int = 10, channels: int = 1, width: int = 16, image_size: int = 8):
        super().__init__(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(width * (image_size // 2) ** 2, num_classes),
        )
