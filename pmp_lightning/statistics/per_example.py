"""Per-example statistics of any ``nn.Module`` in one forward and one backward pass, exactly.

For every example n of a batch, at parameters θ and a direction v (the costate λ_{t+1}):

    dot_n  = ⟨v, ∇l_n(θ)⟩          grad_norm_n = ‖∇l_n(θ)‖
    loss_n, margin_n (logit of the label minus the largest other logit), correct_n, el2n_n = ‖softmax − onehot‖

One forward pass keeps what each part of the network needs (a layer's input, a module's arguments) and one
backward of Σ_n l_n gives δ_n = ∂l_n/∂(output) at each part (examples do not interact in eval mode, so the sum's
gradient is per example). The pass is laid out in three files:

- ``statistics/plan.py``: which *part* of the network covers each trainable parameter, and which way (the plan,
  made once per network from one probe);
- ``statistics/proof.py``: the plan's proof, on a few real examples in float64, against explicit per-example
  gradients; a part that fails moves on to the next way;
- ``statistics/ways.py``: the ways (a per-layer rule, a written-out forward, a broadcast parameter, per-example
  ``vmap(grad)`` on one module, one example at a time) and the instrumented pass that runs them.
"""
from __future__ import annotations

import torch
from torch import nn

from pmp_lightning.errors import UnsupportedModelError
from pmp_lightning.statistics.plan import StatsPlan, plan_for
from pmp_lightning.statistics.ways import forward_backward
from pmp_lightning.task import kind_of, training_loss

STAT_NAMES = ("dot", "grad_norm", "loss", "margin", "correct", "el2n")
STEP_STATS = ("dot", "grad_norm")  # need a backward (and a direction); the rest are the model's outputs


def default_chunk(device_type: str) -> int:
    """Examples per chunk of the pass when none is set: 64 on a CPU, 1024 on a GPU (each the fastest measured,
    docs/performance.md); the replay's ``replay.batch_size`` and the benchmark's ``--chunk`` default to it."""
    return 1024 if device_type == "cuda" else 64


def per_example_stats(net: nn.Module, x: torch.Tensor, y: torch.Tensor, v: dict[str, torch.Tensor] | None,
                      by_layer: bool = False, plan: StatsPlan | None = None) -> dict[str, torch.Tensor]:
    """Statistics of each example of the batch (see the module docstring); ``v`` is keyed like ``trainable(net)``.
    Without a direction (``v=None``) there is no ``dot``.

    ``by_layer`` adds ``layer_sq`` and ``layer_dot`` (batch × parts, in ``plan.parts`` order): each part's share of
    the squared gradient norm and of the dot product (``pmp_lightning.report.diagnose``). The network must be in eval
    mode; its plan is made (and proven) on the first call and kept for the network.
    """
    if net.training:
        raise UnsupportedModelError("the statistics pass differentiates the eval-mode network (dropout off, BatchNorm "
                                    "on its running statistics); call net.eval() first")
    plan = plan or plan_for(net, x, y)
    parts, logits, losses = forward_backward(net, plan.parts, x, y, v)
    with torch.no_grad():
        dots = [d for d, _ in parts]
        out = {"grad_norm": sum(q for _, q in parts).sqrt()}
        if v is not None:
            out["dot"] = sum(dots)
        if by_layer:
            out["layer_sq"] = torch.stack([q for _, q in parts], 1)
            if v is not None:
                out["layer_dot"] = torch.stack(dots, 1)
        return {**out, **_outputs(logits, y, losses.detach())}


@torch.no_grad()
def output_stats(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The statistics that need only the model's outputs (loss, margin, correct, el2n): one forward pass."""
    logits = net(x)
    return _outputs(logits, y, training_loss(logits, y, reduction="none"))


def _outputs(logits: torch.Tensor, y: torch.Tensor, losses: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per example: its loss, margin (its label's logit minus the largest other), whether it is predicted right, and
    EL2N (‖softmax − one-hot‖). A language model's document: each of these averaged over its targets (padding left
    out), so ``correct`` is its next-token accuracy."""
    return {"loss": losses, **kind_of(logits, y).per_example(_verdict, logits, y)}


def _verdict(logits: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model's verdict on each row of (rows, K) logits with its label: margin, correct and EL2N."""
    label_logit = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    probs = logits.softmax(1)
    onehot = torch.nn.functional.one_hot(y, logits.shape[1]).to(probs.dtype)
    return {
        "margin": label_logit - others.max(1).values,
        "correct": (logits.argmax(1) == y).to(logits.dtype),
        "el2n": (probs - onehot).norm(dim=1),
    }
