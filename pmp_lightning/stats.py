"""Per-example statistics in one forward and one backward pass, without per-example gradients.

For every example n of a batch, at parameters θ and a direction v (the costate λ_{t+1}):

    dot_n  = ⟨v, ∇l_n(θ)⟩          grad_norm_n = ‖∇l_n(θ)‖
    loss_n, margin_n (logit of the label minus the largest other logit), correct_n, el2n_n = ‖softmax − onehot‖

Forward hooks keep each layer's input a_n; one backward of Σ_n l_n gives δ_n = ∂l_n/∂z_n at each
layer's output (examples do not interact in eval mode, so the sum's gradient is per example). Then
per layer, with ∇_W l_n = δ_n a_nᵀ (Linear) or Σ_p δ_{n,p} u_{n,p}ᵀ (Conv2d, u = unfolded patches):

    Linear:  ⟨V, δ_n a_nᵀ⟩ = (δ_n V) · a_n       ‖δ_n a_nᵀ‖² = ‖δ_n‖² ‖a_n‖²       ("ghost norm")
    Conv2d:  both from the small (out × in·k·k) per-example gradient δ_n U_nᵀ: conv weights are small,
             and the large Linear layers never materialise one
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


def per_example_stats(net: nn.Module, x: torch.Tensor, y: torch.Tensor, v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Statistics of each example of the batch (see the module docstring); ``v`` is keyed like ``net.named_parameters()``."""
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

    dot = torch.zeros_like(losses)
    sq = torch.zeros_like(losses)
    for name, delta in zip(names, deltas):
        layer, a = layers[name], inputs[name]
        vw = v[f"{name}.weight" if name else "weight"]
        vb = v.get(f"{name}.bias" if name else "bias") if layer.bias is not None else None
        if isinstance(layer, nn.Linear):
            if a.dim() != 2:
                raise UnsupportedLayerError(f"Linear layer {name!r} gets a {a.dim()}-D input; flatten to 2-D first")
            dot += ((delta @ vw) * a).sum(1)
            d2 = delta.pow(2).sum(1)
            sq += d2 * a.pow(2).sum(1)
            bias_grad = delta
        else:
            patches = F.unfold(a, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
            per_example = torch.einsum("bop,bkp->bok", delta.flatten(2), patches)
            dot += (per_example * vw.flatten(1)).sum((1, 2))
            sq += per_example.pow(2).sum((1, 2))
            bias_grad = delta.sum((2, 3))
        if vb is not None:
            dot += bias_grad @ vb
            sq += bias_grad.pow(2).sum(1)

    with torch.no_grad():
        logits = logits.detach()
        label_logit = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.scatter(1, y[:, None], float("-inf"))
        probs = logits.softmax(1)
        onehot = F.one_hot(y, logits.shape[1]).to(probs.dtype)
        return {
            "dot": dot.detach(),
            "grad_norm": sq.detach().sqrt(),
            "loss": losses.detach(),
            "margin": label_logit - others.max(1).values,
            "correct": (logits.argmax(1) == y).to(logits.dtype),
            "el2n": (probs - onehot).norm(dim=1),
        }
