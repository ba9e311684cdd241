"""Models of your own: any ``nn.Module``, built by Hydra from a ``_target_`` (PYTHONPATH=docs/examples). The
statistics pass picks an exact way for every parameter (a layer rule, a broadcast, or the fallback) and proves it
before training; a network whose examples interact in eval mode is the one thing refused."""
import torch
from torch import nn


class TinyConvNet(nn.Sequential):
    """conv 3×3 -> ReLU -> max-pool 2 -> linear, for small square images."""

    def __init__(self, num_classes: int = 10, channels: int = 1, width: int = 16, image_size: int = 8):
        super().__init__(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(width * (image_size // 2) ** 2, num_classes),
        )


class TinyTransformer(nn.Module):
    """A transformer of your own, written the usual way: rows of the image as tokens, a learned position embedding and
    a class token held as bare nn.Parameters, one pre-norm block of nn.MultiheadAttention and an MLP, a linear head.
    No layer of it has to come from a list: the statistics pass covers any nn.Module."""

    def __init__(self, num_classes: int = 10, image_size: int = 8, dim: int = 32, heads: int = 4):
        super().__init__()
        self.embed = nn.Linear(image_size, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, image_size + 1, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        h = self.embed(x.flatten(1, 2))  # (B, rows, dim): each image row is a token
        h = torch.cat([self.cls.expand(len(h), -1, -1), h], 1) + self.pos
        a = self.norm1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.mlp(self.norm2(h))
        return self.head(h[:, 0])
