"""Per-layer rules: a layer's share of each example's ⟨V, ∇l_n⟩ and ‖∇l_n‖², from one forward and one backward.

A rule gets the layer (an exact type from ``RULES``), its input ``a`` and the gradient ``delta`` = ∂(Σ_n l_n)/∂(its
output), both with the batch first (examples do not interact in eval mode, so ``delta[n]`` = ∂l_n/∂output_n), and
``v``: one entry per trainable parameter of the layer (local name -> the direction's block, or None when there is
no direction). It returns the per-example dot (None without a direction) and squared norm, without ever holding a
per-example gradient larger than the layer's own parameters per example (the norm layers' are that small):

    Linear, any input rank (positions t):  G_n = Σ_t δ_t a_tᵀ
        dot = Σ_t (δ_t V)·a_t;  ‖G_n‖² = Σ_{t,s} (a_t·a_s)(δ_t·δ_s)  ("ghost": cost ∝ T²(in + out))
        or ‖materialised G_n‖² (cost ∝ T·in·out), whichever is cheaper: ghost when 2T² ≤ in·out (the "mixed ghost
        norm" rule of Bu et al. 2023, fastDP). Bias: Σ_t δ_t.
    Conv1d/2d/3d, any groups, stride, dilation, padding and padding mode: ∇_W l_n at kernel offset k is the small
        (out/G × in/G) block δ_n · shift_k(a_n)ᵀ per group; each block is reduced to its share of the dot and the
        squared norm at once, so neither the per-example gradient nor the unfolded patches (im2col) are stored; for
        layers with few channels (GROUPED_CHANNELS) one convolution backward with the batch as groups gives the
        per-example gradients at once, which is cheaper there. Over non-overlapping patches (stride = kernel: a patch embedding) the layer is a linear map of each patch,
        and the linear rule takes the patches (cut without duplication) as its positions.
    Embedding: G_n = Σ_t e_{i_t} δ_tᵀ, materialised per example where the table has fewer rows than positions (one
        batched product with the one-hot ids); otherwise dot = Σ_t V[i_t]·δ_t and ‖G_n‖² = Σ_{t,s: i_t = i_s} δ_t·δ_s
        (a masked Gram matrix; for long sequences, the δ summed per distinct id, then squared); positions holding
        padding_idx left out (torch gives them no gradient).
    LayerNorm, GroupNorm, BatchNorm (eval mode: its running statistics), InstanceNorm, RMSNorm: with x̂ the
        normalised input, g_γ = Σ_positions δ ⊙ x̂ and g_β = Σ_positions δ, per example (C or normalized_shape values).
    MultiheadAttention uses its weights functionally: during the pass its forward is written out (``DECOMPOSED``),
        every projection through the linear rule, bias_k/bias_v broadcast along the batch.

Exact types only (``type(layer) in RULES``, as Opacus does): a subclass may compute something else in its
``forward``. Everything else is the fallback's (``pmp_lightning/statistics/ways.py``).
"""
from __future__ import annotations

import itertools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

Direction = dict[str, torch.Tensor | None]
Rule = Callable[[nn.Module, torch.Tensor, torch.Tensor, Direction], tuple[torch.Tensor | None, torch.Tensor]]
RULES: dict[type[nn.Module], Rule] = {}


def rule(*types: type[nn.Module]) -> Callable[[Rule], Rule]:
    def add(fn: Rule) -> Rule:
        for t in types:
            RULES[t] = fn
        return fn

    return add


def rule_for(module: nn.Module) -> Rule | None:
    """The rule for this layer, or None: no rule for its exact type, or a setting the rule does not cover."""
    fn = RULES.get(type(module))
    if fn is None:
        return None
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq):
        return None  # renormalises its weight in the forward / scales by batch counts: the fallback's
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or module.running_mean is None):
        return None  # batch statistics: examples interact
    return fn


def accumulate(dot, sq, grad: torch.Tensor, direction: torch.Tensor | None):
    """Add a materialised per-example gradient ``grad`` (batch × the parameter's shape) to the running dot and norm."""
    flat = grad.reshape(len(grad), -1)
    if direction is not None:
        d = flat @ direction.reshape(-1)
        dot = d if dot is None else dot + d
    q = flat.pow(2).sum(1)
    return dot, (q if sq is None else sq + q)


# ----------------------------------------------------------------------------- linear
@rule(nn.Linear)
def linear(layer: nn.Linear, a: torch.Tensor, delta: torch.Tensor, v: Direction):
    return linear_map(a, delta, v)


def linear_map(a: torch.Tensor, delta: torch.Tensor, v: Direction):
    """The per-example dot and squared norm of a linear map's ``weight`` and ``bias`` (whichever ``v`` names), from its
    input ``a`` (batch, ..., in) and output gradient ``delta`` (batch, ..., out)."""
    dot = sq = None
    if a.ndim == 2:  # one position per example: ‖δ aᵀ‖² = ‖δ‖²‖a‖²
        if "weight" in v:
            vw = v["weight"]
            dot = ((delta @ vw) * a).sum(1) if vw is not None else None
            sq = delta.pow(2).sum(1) * a.pow(2).sum(1)
        if "bias" in v:
            if v["bias"] is not None:
                dot = delta @ v["bias"] if dot is None else dot + delta @ v["bias"]
            sq = delta.pow(2).sum(1) if sq is None else sq + delta.pow(2).sum(1)
        return dot, sq
    b = a.shape[0]
    a, delta = a.reshape(b, -1, a.shape[-1]), delta.reshape(b, -1, delta.shape[-1])
    positions, d_in, d_out = a.shape[1], a.shape[2], delta.shape[2]
    if "weight" in v:
        vw = v["weight"]
        if 2 * positions * positions <= d_in * d_out:  # ghost norm
            dot = ((delta @ vw) * a).sum((1, 2)) if vw is not None else None
            sq = ((a @ a.mT) * (delta @ delta.mT)).sum((1, 2))
        else:  # the per-example gradient is smaller than the two Gram matrices: materialise it
            dot, sq = accumulate(None, None, delta.mT @ a, vw)
    if "bias" in v:
        dot, sq = accumulate(dot, sq, delta.sum(1), v["bias"])
    return dot, sq


# ----------------------------------------------------------------------------- convolutions
@rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv(layer: nn.modules.conv._ConvNd, a: torch.Tensor, delta: torch.Tensor, v: Direction):
    if _disjoint_patches(layer):  # a linear map of each patch: the linear rule on the patches
        return linear_map(_patches(layer, a), delta.flatten(2).transpose(1, 2),
                          {k: (d.reshape(d.shape[0], -1) if k == "weight" and d is not None else d) for k, d in v.items()})
    dot = sq = None
    if "weight" in v:
        dot, sq = _conv_weight(layer, a, delta, v["weight"])
    if "bias" in v:
        dot, sq = accumulate(dot, sq, delta.sum(tuple(range(2, delta.dim()))), v["bias"])
    return dot, sq


def _disjoint_patches(layer: nn.modules.conv._ConvNd) -> bool:
    """A convolution over non-overlapping patches (stride = kernel, no padding or dilation, one group): a patch
    embedding, as vision transformers have."""
    return (tuple(layer.stride) == tuple(layer.kernel_size) and not any(layer._reversed_padding_repeated_twice)
            and all(d == 1 for d in layer.dilation) and layer.groups == 1)


def _patches(layer: nn.modules.conv._ConvNd, a: torch.Tensor) -> torch.Tensor:
    """The input cut into the layer's disjoint patches, (batch, patches, in × kernel), in the weight's element order."""
    b, c = a.shape[:2]
    kernel = layer.kernel_size
    counts = [size // k for size, k in zip(a.shape[2:], kernel)]
    a = a[(slice(None), slice(None), *(slice(0, n * k) for n, k in zip(counts, kernel)))]  # the rows the conv reads
    shape = [b, c] + [x for n, k in zip(counts, kernel) for x in (n, k)]
    nd = len(kernel)
    order = [0] + [2 + 2 * i for i in range(nd)] + [1] + [3 + 2 * i for i in range(nd)]
    return a.reshape(shape).permute(order).reshape(b, -1, c * math.prod(kernel))


def _conv_weight(layer: nn.modules.conv._ConvNd, a: torch.Tensor, delta: torch.Tensor, vw: torch.Tensor | None):
    """Per-example ⟨V, ∇_W l_n⟩ (None without ``vw``) and ‖∇_W l_n‖² of a convolution's weight."""
    a = padded(layer, a)
    if grouped_is_cheaper(layer):  # the per-example gradients from one grouped convolution backward
        return accumulate(None, None, per_example_weight_gradients(layer, a, delta), vw)
    return conv_weight_offsets(layer, a, delta, vw)


def padded(layer: nn.modules.conv._ConvNd, a: torch.Tensor) -> torch.Tensor:
    """The layer's input with the padding its forward adds (any padding mode, 'same' included)."""
    pad = layer._reversed_padding_repeated_twice
    if layer.padding_mode != "zeros":
        return F.pad(a, pad, mode=layer.padding_mode)
    return F.pad(a, pad) if any(pad) else a


def conv_weight_offsets(layer: nn.modules.conv._ConvNd, a: torch.Tensor, delta: torch.Tensor, vw: torch.Tensor | None):
    """One kernel offset (and, with groups, one group) at a time, from the padded input ``a``."""
    b, out_ch = delta.shape[:2]
    spatial = delta.shape[2:]
    groups, in_ch = layer.groups, a.shape[1]
    positions = spatial.numel()
    d = delta.reshape(b, out_ch, positions)
    if groups > 1:
        d = d.reshape(b * groups, out_ch // groups, positions)
        vw = None if vw is None else vw.reshape(groups, out_ch // groups, *vw.shape[1:])
    dot = torch.zeros(b, dtype=a.dtype, device=a.device) if vw is not None else None
    sq = torch.zeros(b, dtype=a.dtype, device=a.device)
    reduce = (1, 2) if groups == 1 else (1, 2, 3)
    for offset in itertools.product(*(range(k) for k in layer.kernel_size)):
        window = a[(slice(None), slice(None), *(slice(k * dil, k * dil + st * (o - 1) + 1, st) for k, dil, st, o in
                                                zip(offset, layer.dilation, layer.stride, spatial)))]
        if groups == 1:
            block = torch.bmm(d, window.reshape(b, in_ch, positions).transpose(1, 2))  # (b, out, in)
        else:
            window = window.reshape(b * groups, in_ch // groups, positions)
            block = torch.bmm(d, window.transpose(1, 2)).reshape(b, groups, out_ch // groups, in_ch // groups)
        if vw is not None:
            dot += (block * vw[(..., *offset)]).sum(reduce)
        sq += block.pow(2).sum(reduce)
    return dot, sq


# One convolution backward over the batch as groups (the per-example weight gradients, b × the weight's size) beats
# the kernel-offset loop where a group's in × out channels are few (the loop's window copies and small products
# dominate there) and the kernel has more than one offset. Measured per conv layer of the shipped models, one thread,
# 64 examples (python -m pmp_lightning.statistics.bench --conv-layers; docs/performance.md), two runs: 0.33-0.96 of the loop's
# time at up to 40 × 40 channels, 1.9-2.1 for 1 × 1 kernels, 2.2-3.8 at 64 × 64 and 160 × 160; the layers in between
# (32 × 64 to 80 × 160) gave 0.62-1.76 and swung between the runs, so they keep the loop.
GROUPED_CHANNELS = 1600


def grouped_is_cheaper(layer: nn.modules.conv._ConvNd) -> bool:
    return (layer.in_channels // layer.groups) * (layer.out_channels // layer.groups) <= GROUPED_CHANNELS \
        and math.prod(layer.kernel_size) > 1


def per_example_weight_gradients(layer: nn.modules.conv._ConvNd, a: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """∇_W l_n for every example at once (b, *weight shape): the batch as groups of one convolution backward, with the
    input already padded (``_conv_weight``)."""
    b, nd = len(a), a.dim() - 2
    weight = layer.weight.detach().repeat(b, *(1,) * (nd + 1))
    g = torch.ops.aten.convolution_backward(
        delta.reshape(1, -1, *delta.shape[2:]), a.reshape(1, -1, *a.shape[2:]), weight, None, layer.stride, [0] * nd,
        layer.dilation, False, [0] * nd, b * layer.groups, [False, True, False])[1]
    return g.reshape(b, *layer.weight.shape)


# ----------------------------------------------------------------------------- embeddings
@rule(nn.Embedding)
def embedding(layer: nn.Embedding, ids: torch.Tensor, delta: torch.Tensor, v: Direction):
    if "weight" not in v:
        return None, torch.zeros(len(ids), dtype=delta.dtype, device=delta.device)
    b, dim = ids.shape[0], delta.shape[-1]
    ids, delta = ids.reshape(b, -1), delta.reshape(b, -1, dim)
    if layer.padding_idx is not None:  # padding positions get no gradient
        delta = delta * (ids != layer.padding_idx).unsqueeze(-1).to(delta.dtype)
    vw = v["weight"]
    positions = ids.shape[1]
    if ids.stride(0) == 0 and len(torch.unique(ids[0])) == positions:  # one lookup of distinct ids (positions 0..T-1)
        dot = (vw[ids[0]] * delta).sum((1, 2)) if vw is not None else None
        return dot, delta.pow(2).sum((1, 2))  # broadcast along the batch: no id repeats, so no cross terms
    if layer.num_embeddings <= min(positions, ONE_HOT_ROWS):  # few rows: each example's gradient, one product
        g = F.one_hot(ids, layer.num_embeddings).to(delta.dtype).mT @ delta  # (b, rows, dim)
        return accumulate(None, None, g, vw)
    dot = (vw[ids] * delta).sum((1, 2)) if vw is not None else None
    if positions <= GRAM_POSITIONS:  # Σ_{t,s: i_t = i_s} δ_t·δ_s from the Gram matrix: one batched product
        same = ids.unsqueeze(2) == ids.unsqueeze(1)
        sq = ((delta @ delta.mT) * same.to(delta.dtype)).sum((1, 2))
        return dot, sq
    # long sequences: sum the δ of each distinct (example, id) pair, then square (cost ∝ positions, not positions²)
    example = torch.arange(b, device=ids.device)[:, None].expand_as(ids).reshape(-1)
    key = example * layer.num_embeddings + ids.reshape(-1)
    distinct, where = torch.unique(key, return_inverse=True)
    rows = torch.zeros(len(distinct), dim, dtype=delta.dtype, device=delta.device).index_add_(0, where, delta.reshape(-1, dim))
    sq = torch.zeros(b, dtype=delta.dtype, device=delta.device).index_add_(
        0, torch.div(distinct, layer.num_embeddings, rounding_mode="floor"), rows.pow(2).sum(1))
    return dot, sq


GRAM_POSITIONS = 256  # up to this many positions per example the Gram form of the embedding norm is the faster one
ONE_HOT_ROWS = 1024  # a table with no more rows than positions (and this many at most) is materialised per example


# ----------------------------------------------------------------------------- normalisation layers
def _affine(xhat: torch.Tensor, delta: torch.Tensor, v: Direction, positions: tuple[int, ...]):
    """Per-example g_γ = Σ_positions δ ⊙ x̂ and g_β = Σ_positions δ, reduced against the direction."""
    dot = sq = None
    if "weight" in v:
        dot, sq = accumulate(dot, sq, (delta * xhat).sum(positions) if positions else delta * xhat, v["weight"])
    if "bias" in v:
        dot, sq = accumulate(dot, sq, delta.sum(positions) if positions else delta, v["bias"])
    return dot, sq


@rule(nn.LayerNorm)
def layer_norm(layer: nn.LayerNorm, a: torch.Tensor, delta: torch.Tensor, v: Direction):
    xhat = F.layer_norm(a, layer.normalized_shape, None, None, layer.eps)
    return _affine(xhat, delta, v, tuple(range(1, a.dim() - len(layer.normalized_shape))))


@rule(nn.GroupNorm)
def group_norm(layer: nn.GroupNorm, a: torch.Tensor, delta: torch.Tensor, v: Direction):
    xhat = F.group_norm(a, layer.num_groups, None, None, layer.eps)
    return _affine(xhat, delta, v, tuple(range(2, a.dim())))


@rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def batch_norm(layer: nn.modules.batchnorm._BatchNorm, a: torch.Tensor, delta: torch.Tensor, v: Direction):
    """Eval mode only (``rule_for``): x̂ from the running statistics, the same for every example."""
    xhat = F.batch_norm(a, layer.running_mean, layer.running_var, None, None, False, 0.0, layer.eps)
    return _affine(xhat, delta, v, tuple(range(2, a.dim())))


@rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def instance_norm(layer: nn.modules.instancenorm._InstanceNorm, a: torch.Tensor, delta: torch.Tensor, v: Direction):
    own_statistics = layer.training or not layer.track_running_stats
    xhat = F.instance_norm(a, layer.running_mean, layer.running_var, None, None, own_statistics, 0.0, layer.eps)
    return _affine(xhat, delta, v, tuple(range(2, a.dim())))


if hasattr(nn, "RMSNorm"):  # torch >= 2.4

    @rule(nn.RMSNorm)
    def rms_norm(layer: nn.Module, a: torch.Tensor, delta: torch.Tensor, v: Direction):
        xhat = F.rms_norm(a, layer.normalized_shape, None, layer.eps)
        return _affine(xhat, delta, v, tuple(range(1, a.dim() - len(layer.normalized_shape))))


# ----------------------------------------------------------------------------- layers that use their weights functionally
# For the statistics pass, such a layer's forward is computed by the same operations written out, each use of a
# parameter made through the pass's recorder: ``linear(name, x, (weight, rows), (bias, rows))`` for a projection (the
# pass records its input and output, and ``linear_map`` reduces it against the rows of the parameters it used), and
# ``broadcast(name)`` for a parameter used directly (broadcast along the batch, its gradient per example).
DECOMPOSED: dict[type[nn.Module], Callable[..., object]] = {}


class NotDecomposable(Exception):
    """A setting the written-out forward does not cover; the layer goes to the fallback."""


def decomposed_for(module: nn.Module):
    return DECOMPOSED.get(type(module))


def _decompose(t: type[nn.Module]):
    def add(fn):
        DECOMPOSED[t] = fn
        return fn

    return add


@_decompose(nn.MultiheadAttention)
def multihead_attention(m: nn.MultiheadAttention, record, query, key, value, key_padding_mask=None, need_weights=True,
                        attn_mask=None, average_attn_weights=True, is_causal=False):
    """``nn.MultiheadAttention.forward`` in eval mode (``F.multi_head_attention_forward``) written out on batch-first
    tensors: the in-projection (one packed projection for self-attention), bias_k/bias_v and add_zero_attn, scaled
    dot-product attention with the merged masks, the out-projection. Not covered (the fallback's): unbatched inputs,
    dropout in training mode."""
    if m.training and m.dropout or query.dim() != 3:
        raise NotDecomposable
    self_attention = query is key is value
    if not m.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    e, heads = m.embed_dim, m.num_heads
    bias = "in_proj_bias" if m.in_proj_bias is not None else None
    if m._qkv_same_embed_dim and self_attention:
        q, k, v = record.linear("in_proj", query, ("in_proj_weight", None), (bias, None)).chunk(3, -1)
    elif m._qkv_same_embed_dim:
        q, k, v = (record.linear(f"in_proj[{i}]", x, ("in_proj_weight", slice(i * e, (i + 1) * e)),
                                 (bias, slice(i * e, (i + 1) * e))) for i, x in enumerate((query, key, value)))
    else:
        q, k, v = (record.linear(w, x, (w, None), (bias, slice(i * e, (i + 1) * e)))
                   for i, (w, x) in enumerate(zip(("q_proj_weight", "k_proj_weight", "v_proj_weight"), (query, key, value))))
    b, length = q.shape[:2]
    extra = 0  # key positions appended: bias_k/bias_v, then a zero position
    if m.bias_k is not None:
        k = torch.cat([k, record.broadcast("bias_k").reshape(b, 1, e)], 1)
        v = torch.cat([v, record.broadcast("bias_v").reshape(b, 1, e)], 1)
        extra += 1
    if m.add_zero_attn:
        k, v = (torch.cat([t, t.new_zeros(b, 1, e)], 1) for t in (k, v))
        extra += 1
    source = k.shape[1]
    q, k, v = (t.reshape(b, t.shape[1], heads, e // heads).transpose(1, 2) for t in (q, k, v))
    mask = _merged_mask(key_padding_mask, attn_mask, b, heads, length, source - extra, extra, q.dtype)
    if need_weights:
        scores = (q * (1.0 / (e // heads)) ** 0.5) @ k.transpose(-2, -1)
        weights = (scores if mask is None else scores + mask).softmax(-1)
        out = weights @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None and not extra)
    out = record.linear("out_proj", out.transpose(1, 2).reshape(b, length, e), ("out_proj.weight", None),
                        ("out_proj.bias" if m.out_proj.bias is not None else None, None))
    if not m.batch_first:
        out = out.transpose(0, 1)
    if not need_weights:
        return out, None
    return out, (weights.mean(1) if average_attn_weights else weights)


def _merged_mask(key_padding_mask, attn_mask, b, heads, length, source, extra, dtype):
    """The additive mask F.multi_head_attention_forward builds: boolean True = not attended (−inf), floats added; the
    ``extra`` appended key positions (bias_k, the zero position) attended by all."""
    def additive(m):
        m = torch.zeros_like(m, dtype=dtype).masked_fill_(m, float("-inf")) if m.dtype == torch.bool else m.to(dtype)
        return F.pad(m, (0, extra)) if extra else m

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        mask = mask.reshape(b, heads, length, source + extra) if mask.dim() == 3 else mask
    if key_padding_mask is not None:
        pad = additive(key_padding_mask).reshape(b, 1, 1, source + extra)
        mask = pad if mask is None else mask + pad
    return mask
