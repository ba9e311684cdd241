"""The proof of a plan: on a few real examples, in float64, every part's dot (along a random direction) and squared
norm must equal those of explicit per-example gradients (the oracle: one ``autograd.grad`` per example, reduced at once
to each parameter's dot and squared norm, so that it holds one example's gradient at a time: 1.3 GB, not seven times
that, for a network of 163M parameters). ``failing`` names the parts that do not match, which the plan
(``statistics/plan.py``) moves on to their next way; a network whose examples interact even in eval mode is refused
here, naming the layer."""
from __future__ import annotations

import torch
from torch import nn

from pmp_lightning.errors import UnsupportedModelError
from pmp_lightning.statistics.ways import Part, forward_backward, instrumented_pass
from pmp_lightning.task import training_loss
from pmp_lightning.training import trainable

VERIFY_RTOL = 1e-9  # float64, against explicit per-example gradients


def direction(model: nn.Module) -> dict[str, torch.Tensor]:
    """The proof's direction v: a fixed random vector over the trainable parameters."""
    params = trainable(model)
    gen = torch.Generator(device=next(iter(params.values())).device if params else "cpu").manual_seed(0)
    return {n: torch.randn(p.shape, generator=gen, dtype=p.dtype, device=p.device) for n, p in params.items()}


def oracle(model: nn.Module, x, y, v: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per trainable parameter, ⟨v, ∇l_n⟩ and ‖∇l_n‖² of each example n restricted to it, from one ``autograd.grad``
    per example; refuses a network whose output for an example depends on the rest of its batch."""
    params = trainable(model)
    rows = []
    for n in range(len(x)):
        loss = training_loss(model(x[n:n + 1]), y[n:n + 1], reduction="sum")
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        rows.append([(0.0, 0.0) if g is None else ((g * v[name]).sum(), g.pow(2).sum())
                     for g, name in zip(grads, params)])
    with torch.no_grad():
        batched = model(x)
        alone = torch.cat([model(x[n:n + 1]) for n in range(len(x))])
    if not torch.allclose(batched, alone, rtol=1e-9, atol=1e-12):
        raise UnsupportedModelError(_interaction_message(model))
    as_tensor = lambda values: torch.tensor([float(t) for t in values], dtype=torch.float64)  # noqa: E731
    return {name: (as_tensor(r[k][0] for r in rows), as_tensor(r[k][1] for r in rows)) for k, name in enumerate(params)}


def _interaction_message(model: nn.Module) -> str:
    culprits = [f"{name!r} ({type(m).__name__})" for name, m in model.named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None]
    if culprits:
        return (f"layer {culprits[0]} normalises with the batch's own statistics even in eval mode (track_running_stats"
                f"=False), so an example's output depends on the others in its batch and per-example gradients are not "
                f"defined; build it with track_running_stats=True (the default), or use GroupNorm or LayerNorm")
    return ("the network's output for an example depends on the other examples of its batch even in eval mode, so "
            "per-example gradients are not defined; make its forward treat examples independently")


def failing(model: nn.Module, parts: list[Part], x, y, v, oracle) -> set[int]:
    """The indices of the parts whose dot along ``v`` or norm differs from the ``oracle``'s, or whose reduction fails.
    When the instrumented pass itself fails or changes the logits, the parts that change the forward (broadcasts) are
    tried one at a time, and those that fail alone are blamed (all of them when none does)."""
    try:
        kept, logits, _ = instrumented_pass(model, parts, x, y)
        with torch.no_grad():
            same = torch.allclose(logits, model(x), rtol=1e-12, atol=1e-12)
    except Exception:  # noqa: BLE001 - any failure of an instrumented part sends it on to the next way
        same = False
    if not same:
        suspects = {i for i, p in enumerate(parts) if p.way.changes_forward(p)} or set(range(len(parts)))
        alone = {i for i in suspects if not _works_alone(model, parts[i], x, y, v, oracle)}
        return alone or suspects
    modules = dict(model.named_modules())
    wrong = set()
    for i, part in enumerate(parts):
        try:
            dot, sq = part.way.reduce(part, modules[part.module], kept[i], {n: v[n] for n in part.params}, len(x))
        except Exception:  # noqa: BLE001
            wrong.add(i)
            continue
        if not _matches(part, dot, sq, oracle):
            wrong.add(i)
    return wrong


def _works_alone(model, part: Part, x, y, v, oracle) -> bool:
    try:
        ((dot, sq),), _, _ = forward_backward(model, [part], x, y, v)
    except Exception:  # noqa: BLE001
        return False
    return _matches(part, dot, sq, oracle)


def _matches(part: Part, dot, sq, oracle) -> bool:
    want_dot = sum(oracle[n][0] for n in part.params).to(dot.device if dot is not None else "cpu")
    want_sq = sum(oracle[n][1] for n in part.params).to(want_dot.device)
    scale_dot = float(want_dot.abs().max()) or 1.0
    scale_sq = float(want_sq.max()) or 1.0
    return (dot is not None and sq is not None and dot.shape == want_dot.shape
            and float((dot - want_dot).abs().max()) <= VERIFY_RTOL * scale_dot
            and float((sq - want_sq).abs().max()) <= VERIFY_RTOL * scale_sq)
