"""The networks the project ships, built from ``conf/model/*.yaml``: the reported CNN and small ones for quick
experiments, and networks people train (a ResNet, a vision transformer, a text-style classifier). Any other
``nn.Module`` works the same way through a ``_target_``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
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


# ----------------------------------------------------------------------------- networks people train
class BasicBlock(nn.Module):
    """A ResNet basic block (He et al. 2016): two 3×3 convolutions without bias, each followed by BatchNorm, and a
    skip connection (a 1×1 convolution and BatchNorm when the shape changes), with in-place ReLUs as torchvision has."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """A small ResNet for small images: a 3×3 stem, three stages of basic blocks (widths w, 2w, 4w; the last two halve
    the resolution), global average pooling and a linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16, blocks: tuple[int, ...] = (1, 1, 1)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        stages, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            stages += [BasicBlock(cin if j == 0 else cout, cout, 2 if i and j == 0 else 1) for j in range(n)]
            cin = cout
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


class EncoderBlock(nn.Module):
    """A pre-norm transformer block: LayerNorm, multi-head self-attention (``nn.MultiheadAttention``), LayerNorm, a GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small vision transformer (Dosovitskiy et al. 2021), written as timm writes it: a class token and position
    embeddings held as bare ``nn.Parameter``s, pre-norm encoder blocks and a linear head. ``stem='patch'``: a patch
    convolution (``patch`` × ``patch`` patches); ``stem='conv'``: three stride-2 3 × 3 convolutions (16, 32, ``dim``
    channels, ReLU between), the convolutional stem of Xiao et al. (2021, "Early convolutions help transformers see
    better"), which trains better on small data. ``pool='cls'`` reads the class token, ``pool='mean'`` the mean of the
    image tokens."""

    def __init__(self, num_classes: int = 10, image_size: int = 28, patch: int = 7, in_channels: int = 1, dim: int = 64,
                 depth: int = 4, heads: int = 4, mlp_dim: int = 128, stem: str = "patch", pool: str = "cls"):
        super().__init__()
        if stem not in ("patch", "conv") or pool not in ("cls", "mean"):
            raise ValueError(f"ViT(stem={stem!r}, pool={pool!r}): stem is 'patch' or 'conv', pool is 'cls' or 'mean'")
        if stem == "conv":
            self.patch_embed = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1),
                                             nn.ReLU(), nn.Conv2d(32, dim, 3, 2, 1))
            side = -(-image_size // 8)  # each stride-2 convolution halves the side, rounding up
        else:
            self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
            side = image_size // patch
        self.pool = pool
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, side ** 2 + 1, dim))
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, mlp_dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        h = self.norm(self.blocks(x))
        return self.head(h[:, 0] if self.pool == "cls" else h[:, 1:].mean(1))


class TextClassifier(nn.Module):
    """A text-style classifier: token and position embeddings (``nn.Embedding``), ``depth`` pre-norm transformer
    encoder blocks (``EncoderBlock``; none by default: a bag of tokens), LayerNorm, mean pooling over the positions and
    a GELU MLP.

    Integer inputs are token ids (N, T). Floating inputs are images (N, C, H, W), read as a sequence of tokens: each
    ``patch`` × ``patch`` patch's mean brightness (in [0, 1]) quantised to ``vocab_size`` levels, row by row. So the
    default experiment's MNIST images run through it as 49 tokens, and a file of token ids (``data=tensors``) as is.
    """

    def __init__(self, num_classes: int = 10, vocab_size: int = 16, max_len: int = 64, dim: int = 64, hidden: int = 128,
                 patch: int = 4, padding_idx: int | None = None, depth: int = 0, heads: int = 4):
        super().__init__()
        self.patch, self.vocab_size = patch, vocab_size
        self.tokens = nn.Embedding(vocab_size, dim, padding_idx=padding_idx)
        self.positions = nn.Embedding(max_len, dim)
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_classes))

    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            return x
        brightness = F.avg_pool2d(x.mean(1, keepdim=True), self.patch).flatten(1)
        return (brightness.clamp(0, 1) * (self.vocab_size - 1)).round().long()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.tokenize(x)
        h = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        return self.mlp(self.norm(self.blocks(h)).mean(1))
