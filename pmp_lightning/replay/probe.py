"""The replay's maths tried on the model before any training (``check_replay_maths``): ∇J through torch.func, the
Hessian-vector products of the curvature modes, and the statistics pass in the network's own precision, on the few
pool examples the model check probed (``models.check.Probe``), so that a model the replay cannot differentiate is
refused in one line naming the fix, never after training."""
from __future__ import annotations

import torch

from pmp_lightning.errors import ReplayConfigError, UnsupportedModelError
from pmp_lightning.replay.costate import downstream_gradient, hessian_vector_product, objective
from pmp_lightning.statistics.per_example import per_example_stats
from pmp_lightning.training import trainable


def check_replay_maths(probe, curvature: str, target: str) -> None:
    """What the plan's float64 proof does not try, on the probe examples, with the replay's own functions: ∇J through
    ``torch.func.grad`` (``downstream_gradient``, which every ``replay.curvature`` uses, and which a custom
    ``torch.autograd.Function`` without ``setup_context`` fails), Hessian-vector products for the curvature modes
    (forward-mode derivatives, which some layers, e.g. torch's fused LSTM on the CPU, do not have), and the statistics
    pass in the network's own precision, which must give finite values."""
    net, x, y, plan = probe
    with torch.random.fork_rng(devices=[]):  # the trained model's initialisation must not depend on this probe
        _check(net, plan, x, y, curvature, target)


def _check(net: torch.nn.Module, plan, x: torch.Tensor, y: torch.Tensor, curvature: str, target: str) -> None:
    params = {k: p.detach() for k, p in trainable(net).items()}
    direction = {k: torch.ones_like(p) for k, p in params.items()}
    try:
        downstream_gradient(net, params, objective("ce"), lambda: [(x[:2], y[:2])], 2)
    except Exception as err:  # functorch's refusals surface as several types deep inside torch
        raise UnsupportedModelError(f"model ({target}): the replay takes ∇J through torch.func.grad (under every "
                                    f"replay.curvature), which fails for it: {_first_line(err)}. "
                                    f"{_func_advice(err)}") from err
    if curvature != "none":
        try:
            hessian_vector_product(net, params, direction, lambda: [(x[:2], y[:2])])
        except Exception as err:  # a missing forward-mode derivative surfaces as one of several types deep inside torch
            raise ReplayConfigError(f"model ({target}): replay.curvature={curvature} needs Hessian-vector products "
                                    f"(forward-mode derivatives), which fail for it: {str(err).splitlines()[0]}. Use "
                                    f"replay.curvature=none (the Hessian term left out), or a layer with forward-mode "
                                    f"derivatives") from err
    stats = per_example_stats(net, x, y, direction, plan=plan, by_layer=True)
    bad = [part.label for k, part in enumerate(plan.parts)
           if not (torch.isfinite(stats["layer_dot"][:, k]).all() and torch.isfinite(stats["layer_sq"][:, k]).all())]
    if bad:
        dtype = str(next(iter(params.values())).dtype).replace("torch.", "")
        raise UnsupportedModelError(f"model ({target}): the per-example statistics of {', '.join(bad)} are not finite in "
                                    f"{dtype} for some examples (they are in float64, where the plan was proven); train "
                                    f"in float64 (trainer.precision=64-true) or replace that layer")


def _first_line(err: Exception, limit: int = 240) -> str:
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _func_advice(err: Exception) -> str:
    """The fix for a network that torch.func cannot differentiate: a custom autograd.Function's, or any other's."""
    if "autograd.Function" in str(err) or "setup_context" in str(err):
        return ("Give each custom torch.autograd.Function a setup_context staticmethod (forward without ctx) and "
                "generate_vmap_rule = True (or a vmap staticmethod; see torch's 'Extending torch.func with "
                "autograd.Function'), or replace it with standard layers")
    return ("Make its forward work under torch.func (no .item(), .numpy() or in-place changes of tensors it was given), "
            "or replace that part with standard layers")
