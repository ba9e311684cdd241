"""A small causal transformer language model (GPT-2's layout): token and position embeddings, pre-norm blocks of causal
self-attention and a GELU MLP, a final LayerNorm and an output head over the vocabulary, tied to the token embedding
or not. Input token ids (N, T), output next-token logits (N, T, V).

The default is sized for 2 CPU cores (about 0.1M parameters with the byte vocabulary); GPT-2 small's shape is
``GPT(vocab_size=50257, max_len=1024, dim=768, depth=12, heads=12)`` (124M parameters, tied). Built from the layers the
statistics pass has exact per-example rules for (Embedding, LayerNorm, Linear, ``nn.MultiheadAttention`` with a causal
mask), so a document's gradient, summed over its tokens, is never materialised.
"""
from __future__ import annotations

import torch
from torch import nn

from pmp_lightning.data.corpus import VOCAB_SIZE


class CausalBlock(nn.Module):
    """LayerNorm, causal multi-head self-attention, LayerNorm, a GELU MLP of width ``4 × dim``; both with residuals."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)  # True: a later position, unseen
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int = VOCAB_SIZE, max_len: int = 128, dim: int = 64, depth: int = 2, heads: int = 4,
                 tied: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"model.dim={dim} must be a multiple of model.heads={heads}")
        self.max_len = max_len
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Embedding(max_len, dim)
        self.blocks = nn.Sequential(*(CausalBlock(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        nn.init.normal_(self.tokens.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)
        if tied:
            self.head.weight = self.tokens.weight

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """The last hidden states (N, T, dim), after the final norm: what the head reads, and the data scorer too."""
        if ids.shape[1] > self.max_len:
            raise ValueError(f"a sequence of {ids.shape[1]} tokens is longer than model.max_len={self.max_len}; "
                             f"raise model.max_len to at least data.length")
        h = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        return self.norm(self.blocks(h))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(ids))
