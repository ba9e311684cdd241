"""Per-example statistics in one forward and one backward pass, without per-example gradients.

For every example n of a batch, at parameters θ and a direction v (the costate λ_{t+1}):

    dot_n  = ⟨v, ∇l_n(θ)⟩          grad_norm_n = ‖∇l_n(θ)‖
    loss_n, margin_n (logit of the label minus the largest other logit), correct_n, el2n_n = ‖softmax − onehot‖

Forward hooks keep each layer's input a_n; one backward of Σ_n l_n gives δ_n = ∂l_n/∂z_n at each
layer's output (examples do not interact in eval mode, so the sum's gradient is per example). Then
per layer, with ∇_W l_n = δ_n a_nᵀ (Linear) or Σ_p δ_{n,p} u_{n,p}ᵀ (Conv2d, u = unfolded patches):

    Linear:  ⟨V, δ_n a_nᵀ⟩ = (δ_n V) · a_n       ‖δ_n a_nᵀ‖² = ‖δ_n‖² ‖a_n‖²       ("ghost norm")
    Conv2d:  ∇_W l_n[:, :, i, j] = δ_n · shift_{ij}(a_n)ᵀ, one small (out × in) block per kernel offset
             (i, j); each block is reduced to its share of the dot and the squared norm at once, so
             neither the per-example gradient nor the unfolded patch matrix is ever stored
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pmp_lightning.errors import PMPError

STAT_NAMES = ("dot", "grad_norm", "loss", "margin", "correct", "el2n")


class UnsupportedLayerError(PMPError, TypeError):
    """A layer the statistics pass has no exact per-example formula for."""


def layers_with_params(net: nn.Module) -> dict[str, nn.Module]:
    """Linear / Conv2d layers by name; any other layer that owns parameters is refused."""
    layers = {}
    for name, module in net.named_modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"):
            layers[name] = module
        else:
            raise UnsupportedLayerError(
                f"layer {name!r} ({type(module).__name__}) has parameters but the statistics pass supports "
                f"only nn.Linear and nn.Conv2d (groups=1, zero padding); build the model from those"
            )
    return layers


def per_example_stats(net: nn.Module, x: torch.Tensor, y: torch.Tensor, v: dict[str, torch.Tensor] | None,
                      by_layer: bool = False) -> dict[str, torch.Tensor]:
    """Statistics of each example of the batch (see the module docstring); ``v`` is keyed like ``net.named_parameters()``.
    Without a direction (``v=None``: the trained model θ_T, which has no λ_{T+1}) there is no ``dot``.

    ``by_layer`` adds ``layer_dot`` and ``layer_sq`` (batch × layers, in ``layers_with_params`` order): each
    layer's share of the dot product and of the squared gradient norm (``pmp_lightning.diagnose``).
    """
    layers = layers_with_params(net)
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, out):
            inputs[name], outputs[name] = args[0].detach(), out

        return hook

    handles = [m.register_forward_hook(keep(name)) for name, m in layers.items()]
    try:
        logits = net(x)
    finally:
        for h in handles:
            h.remove()
    losses = F.cross_entropy(logits, y, reduction="none")
    names = list(layers)
    deltas = torch.autograd.grad(losses.sum(), [outputs[n] for n in names])

    layer_dot, layer_sq = [], []  # per layer: its share of ⟨v, ∇l_n⟩ and of ‖∇l_n‖²
    for name, delta in zip(names, deltas):
        layer, a = layers[name], inputs[name]
        vw = v[f"{name}.weight" if name else "weight"] if v is not None else None
        vb = v.get(f"{name}.bias" if name else "bias") if v is not None and layer.bias is not None else None
        if isinstance(layer, nn.Linear):
            if a.dim() != 2:
                raise UnsupportedLayerError(f"Linear layer {name!r} gets a {a.dim()}-D input; flatten to 2-D first")
            d = ((delta @ vw) * a).sum(1) if vw is not None else None
            q = delta.pow(2).sum(1) * a.pow(2).sum(1)
            bias_grad = delta
        else:
            d, q = _conv_weight_stats(layer, a, delta, vw)
            bias_grad = delta.sum((2, 3))
        if layer.bias is not None:
            if vb is not None:
                d = d + bias_grad @ vb
            q = q + bias_grad.pow(2).sum(1)
        layer_dot.append(d)
        layer_sq.append(q)
    sq = sum(layer_sq)
    dot = sum(layer_dot) if v is not None else None

    with torch.no_grad():
        logits = logits.detach()
        label_logit = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.scatter(1, y[:, None], float("-inf"))
        probs = logits.softmax(1)
        onehot = F.one_hot(y, logits.shape[1]).to(probs.dtype)
        by_layer_out = {"layer_sq": torch.stack(layer_sq, 1).detach()} if by_layer else {}
        if by_layer and v is not None:
            by_layer_out["layer_dot"] = torch.stack(layer_dot, 1).detach()
        return {
            **by_layer_out,
            **({"dot": dot.detach()} if v is not None else {}),
            "grad_norm": sq.detach().sqrt(),
            "loss": losses.detach(),
            "margin": label_logit - others.max(1).values,
            "correct": (logits.argmax(1) == y).to(logits.dtype),
            "el2n": (probs - onehot).norm(dim=1),
        }


def _conv_weight_stats(layer: nn.Conv2d, a: torch.Tensor, delta: torch.Tensor, vw: torch.Tensor | None):
    """Per-example ⟨V, ∇_W l_n⟩ (None without ``vw``) and ‖∇_W l_n‖² of a Conv2d weight, one kernel offset at a time."""
    b, out_ch, oh, ow = delta.shape
    ph, pw = layer.padding if isinstance(layer.padding, tuple) else (layer.padding,) * 2
    (sh, sw), (dh, dw) = layer.stride, layer.dilation
    a = F.pad(a, (pw, pw, ph, ph)) if ph or pw else a
    d = delta.reshape(b, out_ch, oh * ow)
    dot = torch.zeros(b, dtype=a.dtype, device=a.device) if vw is not None else None
    sq = torch.zeros(b, dtype=a.dtype, device=a.device)
    kh, kw = layer.kernel_size
    for i in range(kh):
        for j in range(kw):
            window = a[:, :, i * dh : i * dh + sh * (oh - 1) + 1 : sh, j * dw : j * dw + sw * (ow - 1) + 1 : sw]
            block = torch.bmm(d, window.reshape(b, a.shape[1], oh * ow).transpose(1, 2))  # (b, out, in)
            if vw is not None:
                dot += (block * vw[:, :, i, j]).sum((1, 2))
            sq += block.pow(2).sum((1, 2))
    return dot, sq
