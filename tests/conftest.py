import torch

from pmp_lightning.data import Images


class RandomSource:
    """Gaussian 'images' with labels from a random linear teacher: tiny, offline, learnable."""

    def __init__(self, n: int = 60, shape=(1, 2, 2), num_classes: int = 10, seed: int = 0, dtype=torch.float32):
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, *shape, generator=gen, dtype=dtype)
        teacher = torch.randn(int(torch.tensor(shape).prod()), num_classes, generator=gen, dtype=dtype)
        self.y = (self.x.flatten(1) @ teacher).argmax(1)

    def load(self):
        return Images(self.x, self.y), None
