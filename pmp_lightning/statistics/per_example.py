"""Per-example statistics of any ``nn.Module`` in one forward and one backward pass, exactly.

For every example n of a batch, at parameters θ and a direction v (the costate λ_{t+1}):

    dot_n  = ⟨v, ∇l_n(θ)⟩          grad_norm_n = ‖∇l_n(θ)‖
    loss_n, margin_n (logit of the label minus the largest other logit), correct_n, el2n_n = ‖softmax − onehot‖

One forward pass keeps what each part of the network needs (a layer's input, a module's arguments) and one
backward of Σ_n l_n gives δ_n = ∂l_n/∂(output) at each part (examples do not interact in eval mode, so the sum's
gradient is per example). Each trainable parameter is covered by exactly one *part* of a ``StatsPlan``:

- ``rule``: a layer with an exact per-layer formula (``pmp_lightning/statistics/layer_rules.py``: Linear of any input rank,
  Conv1d/2d/3d, Embedding, LayerNorm, GroupNorm, BatchNorm in eval mode, InstanceNorm, RMSNorm). A layer whose
  output carries no batch axis (a position embedding looked up for ``arange(T)``) has its output broadcast to the
  batch during the pass, so that the backward gives each example its own δ.
- ``decompose``: a layer that uses its weights functionally and has a written-out forward
  (``layer_rules.DECOMPOSED``: ``nn.MultiheadAttention``) runs that forward during the pass, every projection
  recorded for the Linear rule and every directly used parameter broadcast along the batch.
- ``expand``: a parameter used directly in a module's ``forward`` (a class token, a position embedding held as a
  bare ``nn.Parameter``) is replaced, for the pass, by a view of itself broadcast along a batch axis; the gradient
  of that view is the per-example gradient.
- ``fallback``: anything else that holds parameters (custom layers that use their weights functionally, parameters
  shared between modules or used outside the module that holds them): the innermost module enclosing every owner
  and use of them that runs once per forward, with batch axes the probe could read, is differentiated per example
  with ``torch.func.vmap(grad)`` on that module alone, given its recorded inputs and δ, in sub-batches that bound
  the per-example gradients held at once; ``loop`` does the same one example at a time where vmap cannot run.

``plan_for`` picks the cheapest part for every parameter from one probe of the network and then proves the plan:
on a few real examples, in float64, every part's dot and norm must equal those of explicit per-example gradients
(one ``autograd.grad`` per example). A part that does not match, or fails, moves to the next way; a network whose
examples interact even in eval mode (BatchNorm without running statistics) is refused, naming the layer.
"""
from __future__ import annotations

import copy
import functools
import weakref
from collections import Counter
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from pmp_lightning.errors import PMPError
from pmp_lightning.statistics.layer_rules import accumulate, decomposed_for, linear_map, rule_for
from pmp_lightning.training import IGNORE, training_loss

STAT_NAMES = ("dot", "grad_norm", "loss", "margin", "correct", "el2n")
STEP_STATS = ("dot", "grad_norm")  # need a backward (and a direction); the rest are the model's outputs
FALLBACK_FLOATS = 2**24  # per-example gradients a fallback holds at once (64 MiB in float32): sets its sub-batch
EXPAND_FLOATS = 2**24  # a bare parameter is broadcast along the batch only while batch × its size stays below this
PROBE_SIZES = (5, 7)  # two batch sizes (rarely a length a network has): an axis that follows them is the batch axis
VERIFY_RTOL = 1e-9  # float64, against explicit per-example gradients
# layers whose float32 CPU kernels (mkldnn's RNNs) read a parameter broadcast along the batch wrongly, though the float64
# proof passes: their parameters go to the fallback, never to a broadcast
FUSED_KERNELS = (nn.RNNBase,)


class UnsupportedModelError(PMPError, TypeError):
    """A network whose per-example gradients are not defined (its examples interact in eval mode)."""


@dataclass(frozen=True)
class Part:
    """The trainable parameters ``params`` (full names) of the module ``module`` and how their per-example gradients
    are reduced (``how``: rule, decompose, expand, fallback or loop). ``dims`` are batch axes, one per leaf (``tree_flatten``) of
    the module's arguments, keyword arguments (fallback only) and output, None where a leaf has no batch axis (the
    pass then broadcasts that output along the batch); a rule keeps its input's and its output's. ``view`` is the
    broadcast shape of an expanded parameter (``_broadcast``)."""

    module: str
    params: tuple[str, ...]
    how: str
    dims: tuple = ((0,), (0,))
    view: int = 0
    clone_inputs: bool = False

    @property
    def label(self) -> str:
        return self.module or "(the network itself)"


@dataclass
class StatsPlan:
    parts: list[Part]
    kinds: dict[str, str] = field(default_factory=dict)  # module name -> type name

    def summary(self) -> str:
        """One line for the log: how many layers each way, and what goes to the fallback."""
        by_rule = Counter(self.kinds[p.module] for p in self.parts if p.how in ("rule", "decompose"))
        line = ", ".join(f"{kind} ×{n}" for kind, n in by_rule.items()) or "none"
        slow = [p for p in self.parts if p.how in ("fallback", "loop")]
        expanded = [p for p in self.parts if p.how == "expand"]
        text = f"per-layer rules for {sum(by_rule.values())} layers ({line})"
        if expanded:
            text += f"; broadcast along the batch: {', '.join(p.params[0] for p in expanded)}"
        if slow:
            text += "; per-example vmap(grad) (the fallback) for " + ", ".join(
                f"{p.label} ({self.kinds[p.module]}{', one example at a time' if p.how == 'loop' else ''}: "
                f"{', '.join(n[len(p.module) + 1:] if p.module else n for n in p.params)})" for p in slow)
        if any(p.how == "loop" for p in slow):
            text += ("; one example at a time is slow: expect the replay to score far fewer examples per second than "
                     "training reads")
        return text


_PLANS: "weakref.WeakKeyDictionary[nn.Module, StatsPlan]" = weakref.WeakKeyDictionary()
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
ROOT_BLOCK = "(root)"  # the network's own parameters (a class token, a position embedding held on the network)


def block_of(name: str, net: nn.Module, groups: list[str] | None = None) -> str:
    """The block a trainable parameter belongs to: the longest of ``groups`` (module-name prefixes) it lies under, or,
    without groups, the network's top-level child holding it, where a container (Sequential, ModuleList, ModuleDict)
    of composite modules is split into them (and a network that is itself a container into its children): a ResNet's
    stem, each residual block and its head; a ViT's patch embedding, each encoder block, its norm and head; the
    reported CNN's four layers. Parameters held by the network itself: ``(root)``."""
    if groups is not None:
        under = [g for g in groups if name == g or name.startswith(g + ".")]
        return max(under, key=len) if under else "(other)"
    path, module = [], net
    for piece in name.split(".")[:-1]:
        split = isinstance(module, CONTAINERS) and (module is net or any(next(c.children(), None) is not None
                                                                          for c in module.children()))
        if path and not split:
            return ".".join(path)
        path.append(piece)
        module = module.get_submodule(piece)
    return ".".join(path) or ROOT_BLOCK


def block_matrix(plan: "StatsPlan", net: nn.Module, groups: list[str] | None = None) -> tuple[list[str], torch.Tensor]:
    """The blocks (in the network's order) and a 0/1 matrix (parts × blocks) summing each part's statistics into its
    block. A part whose parameters lie in several blocks (a fallback over a whole container) joins them into one."""
    names = list(trainable(net))
    blocks = list(dict.fromkeys(block_of(n, net, groups) for n in names))
    merged = {b: b for b in blocks}

    def root(b):
        while merged[b] != b:
            b = merged[b]
        return b

    for part in plan.parts:
        owners = sorted({root(block_of(n, net, groups)) for n in part.params}, key=blocks.index)
        for b in owners[1:]:
            merged[b] = owners[0]
    kept = [b for b in blocks if root(b) == b]
    label = {b: "+".join(c for c in blocks if root(c) == b) for b in kept}
    matrix = torch.zeros(len(plan.parts), len(kept), dtype=torch.float64)
    for i, part in enumerate(plan.parts):
        matrix[i, kept.index(root(block_of(part.params[0], net, groups)))] = 1.0
    return [label[b] for b in kept], matrix


def default_chunk(device_type: str) -> int:
    """Examples per chunk of the pass when none is set: 64 on a CPU, 1024 on a GPU (each the fastest measured,
    docs/performance.md); the replay's ``replay.batch_size`` and the benchmark's ``--chunk`` default to it."""
    return 1024 if device_type == "cuda" else 64


def trainable(net: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters training moves (``requires_grad``), by name: what λ, ∇J and the statistics cover."""
    return {k: p for k, p in net.named_parameters() if p.requires_grad}


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
    parts, logits, losses = _forward_backward(net, plan, x, y, v)
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
    if logits.dim() == 3 and y.dim() == 2:
        kept = y != IGNORE
        tokens = _outputs(logits[kept], y[kept], losses.new_zeros(int(kept.sum())))
        counts = kept.sum(1).clamp_min(1).to(logits.dtype)
        per_doc = {k: logits.new_zeros(y.shape).masked_scatter(kept, v).sum(1) / counts for k, v in tokens.items() if k != "loss"}
        return {"loss": losses, **per_doc}
    label_logit = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    probs = logits.softmax(1)
    onehot = torch.nn.functional.one_hot(y, logits.shape[1]).to(probs.dtype)
    return {
        "loss": losses,
        "margin": label_logit - others.max(1).values,
        "correct": (logits.argmax(1) == y).to(logits.dtype),
        "el2n": (probs - onehot).norm(dim=1),
    }


# ----------------------------------------------------------------------------- the pass
def _forward_backward(net, plan: StatsPlan, x, y, v):
    """The instrumented forward and one backward, then every part's reduction: per part (dot or None, squared norm),
    the logits (detached) and the per-example losses."""
    kept, logits, losses = _instrumented_pass(net, plan, x, y)
    modules = dict(net.named_modules())
    results = [_reduce(part, modules[part.module], kept[i], {n: (None if v is None else v[n]) for n in part.params}, len(x))
               for i, part in enumerate(plan.parts)]
    return results, logits, losses


def _instrumented_pass(net, plan: StatsPlan, x, y):
    """Forward with every part's hook (or broadcast parameter) in place, then one backward of Σ_n l_n to the parts'
    outputs: what each part kept, with its δ, the logits (detached) and the per-example losses."""
    modules = dict(net.named_modules())
    params = trainable(net)
    batch = len(x)
    kept: dict[int, dict] = {}
    handles, written_out = [], []
    for i, part in enumerate(plan.parts):
        if part.how == "decompose":
            module = modules[part.module]
            kept[i] = {"edges": [], "shapes": [], "uses": []}
            module.forward = functools.partial(decomposed_for(module), module, _Recorder(module, kept[i], batch))
            written_out.append(module)
        elif part.how != "expand":
            handles.append(modules[part.module].register_forward_hook(_keeper(i, part, kept, batch), with_kwargs=True))
    swapped = {}
    for i, part in enumerate(plan.parts):
        if part.how == "expand":
            (name,) = part.params
            view = _broadcast(params[name], batch, part.view)
            swapped[name] = view
            kept[i] = {"edges": [get_gradient_edge(view)], "shapes": [view.shape]}
    try:
        logits = functional_call(net, swapped, (x,)) if swapped else net(x)
    finally:
        for h in handles:
            h.remove()
        for module in written_out:
            del module.forward  # the class's own forward again
    losses = training_loss(logits, y, reduction="none")
    order = [(i, k) for i in range(len(plan.parts)) for k in range(len(kept[i]["edges"]))]
    found = torch.autograd.grad(losses.sum(), [kept[i]["edges"][k] for i, k in order], allow_unused=True) if order else ()
    for (i, k), g in zip(order, found):
        kept[i].setdefault("deltas", []).append(
            g if g is not None else torch.zeros(kept[i]["shapes"][k], dtype=logits.dtype, device=logits.device))
    return kept, logits.detach(), losses


def _broadcast(t: torch.Tensor, batch: int, view: int) -> torch.Tensor:
    """``t`` broadcast along a new leading batch axis: ``view`` 0 expands a leading axis of length 1 in place (a
    (1, T, D) position embedding); ``view`` k ≥ 1 puts the batch first and k − 1 axes of length 1 after it (a (D,)
    bias added to (B, T, D) features needs (B, 1, D): k = 2)."""
    if view == 0:
        return t.expand(batch, *t.shape[1:])
    return t.reshape(1, *(1,) * (view - 1), *t.shape).expand(batch, *(1,) * (view - 1), *t.shape)


def _keeper(i: int, part: Part, kept: dict, batch: int):
    """A forward hook keeping what part ``i`` needs: the layer's input or the module's arguments, and the gradient
    edges of its outputs (taken before any in-place change of the output, so δ is the output's own)."""

    def take(t):
        return t.detach().clone() if part.clone_inputs else t.detach()

    def rule_hook(module, args, kwargs, out):  # a layer: one input, one output tensor (the common case, kept short)
        grown = out if part.dims[-1][0] is not None else _broadcast(out, batch, 0 if out.dim() and out.shape[0] == 1 else 1)
        a = take(args[0])
        if part.dims[0][0] is None:
            a = _broadcast(a, batch, 0 if a.dim() and a.shape[0] == 1 else 1)
        kept[i] = {"edges": [get_gradient_edge(grown)], "shapes": [grown.shape], "a": a}
        return None if grown is out else grown

    def hook(module, args, kwargs, out):
        leaves, spec = tree_flatten(out)
        out_dims = part.dims[-1]
        grown = [_broadcast(t, batch, 0 if t.dim() and t.shape[0] == 1 else 1)
                 if isinstance(t, torch.Tensor) and d is None and t.requires_grad else t for t, d in zip(leaves, out_dims)]
        record = {"edges": [], "shapes": [], "slots": [], "leaves": len(grown)}
        for k, t in enumerate(grown):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                record["edges"].append(get_gradient_edge(t))
                record["shapes"].append(t.shape)
                record["slots"].append(k)
        record["args"] = tree_flatten(tree_map(lambda t: take(t) if isinstance(t, torch.Tensor) else t, args))
        record["kwargs"] = tree_flatten(tree_map(lambda t: take(t) if isinstance(t, torch.Tensor) else t, kwargs))
        kept[i] = record
        changed = any(g is not t for g, t in zip(grown, leaves))
        return tree_unflatten(grown, spec) if changed else None

    return rule_hook if part.how == "rule" else hook


class _Recorder:
    """What a written-out forward (``layer_rules.DECOMPOSED``) uses its module's parameters through: each projection
    (``linear``: the linear map with the named rows of the parameters) and each parameter used directly
    (``broadcast``: broadcast along the batch) is recorded with the gradient edge of its output."""

    def __init__(self, module: nn.Module, record: dict, batch: int):
        self.module, self.record, self.batch = module, record, batch

    def _keep(self, out: torch.Tensor, use) -> torch.Tensor:
        self.record["edges"].append(get_gradient_edge(out))
        self.record["shapes"].append(out.shape)
        self.record["uses"].append(use)
        return out

    def linear(self, name, x, weight, bias):
        (w_name, w_rows), (b_name, b_rows) = weight, bias
        w = self.module.get_parameter(w_name)
        b = self.module.get_parameter(b_name) if b_name else None
        out = torch.nn.functional.linear(x, w if w_rows is None else w[w_rows],
                                         None if b is None else (b if b_rows is None else b[b_rows]))
        return self._keep(out, ("linear", x.detach(), weight, bias))

    def broadcast(self, name):
        p = self.module.get_parameter(name)
        return self._keep(p.unsqueeze(0).expand(self.batch, *p.shape), ("broadcast", name))


def _reduce(part: Part, module: nn.Module, record: dict, v: dict, batch: int):
    """(dot or None, squared norm) per example for one part, from what the pass kept."""
    if part.how == "decompose":
        prefix = f"{part.module}." if part.module else ""
        dot = sq = None
        for use, delta in zip(record["uses"], record["deltas"]):
            if use[0] == "broadcast":
                name = prefix + use[1]
                d, q = (None, None) if name not in v else accumulate(None, None, delta, v[name])
            else:
                _, a, (w_name, w_rows), (b_name, b_rows) = use
                local = {}
                for key, name, rows in (("weight", w_name, w_rows), ("bias", b_name, b_rows)):
                    if name and prefix + name in v:
                        direction = v[prefix + name]
                        local[key] = direction if direction is None or rows is None else direction[rows]
                d, q = linear_map(a, delta, local)
            dot = d if dot is None else (dot if d is None else dot + d)
            sq = q if sq is None else (sq if q is None else sq + q)
        return dot, sq
    if part.how == "expand":
        g = record["deltas"][0].reshape(batch, -1)
        (name,) = part.params
        dot = g @ v[name].reshape(-1) if v[name] is not None else None
        return dot, g.pow(2).sum(1)
    prefix = f"{part.module}." if part.module else ""
    local = {n[len(prefix):]: d for n, d in v.items()}
    if part.how == "rule":
        in_dim, out_dim = part.dims[0][0], part.dims[-1][0]
        a = record["a"] if in_dim in (None, 0) else record["a"].movedim(in_dim, 0)
        delta = record["deltas"][0] if out_dim in (None, 0) else record["deltas"][0].movedim(out_dim, 0)
        return rule_for(module)(module, a, delta, local)
    # no_grad: the per-example gradients must not join a graph through the module's other parameters; the math
    # attention kernel has batching rules (the fused CPU one has none and would run example by example)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        return _fallback(part, module, record, local, batch)


def _fallback(part: Part, module: nn.Module, record: dict, v: dict, batch: int):
    """Per-example gradients of the part's parameters through ``module`` alone: vmap(grad) over sub-batches
    (``loop``: one example at a time), each reduced at once to its dot and squared norm."""
    prefix = f"{part.module}." if part.module else ""
    names = [n[len(prefix):] for n in part.params]
    own = dict(module.named_parameters())
    theta = {n: own[n].detach() for n in names}
    arg_dims, kwarg_dims, out_dims = part.dims
    (arg_leaves, arg_spec), (kwarg_leaves, kwarg_spec) = record["args"], record["kwargs"]
    deltas: list = [None] * record["leaves"]
    for slot, d in zip(record["slots"], record["deltas"]):
        deltas[slot] = d

    def one(theta, args, kwargs, dlt):
        # each example as a batch of one, so the module sees the shapes it was written for
        args = tree_unflatten([_unsqueeze(t, d) for t, d in zip(args, arg_dims)], arg_spec)
        kwargs = tree_unflatten([_unsqueeze(t, d) for t, d in zip(kwargs, kwarg_dims)], kwarg_spec)
        outs, _ = tree_flatten(functional_call(module, theta, args, kwargs))
        total = 0.0
        for o, d, od in zip(outs, dlt, out_dims):
            if d is not None:  # a grown output carries the batch first; the module's own has it at od or nowhere
                total = total + (o * (d if od is None else d.unsqueeze(od))).sum()
        return total

    per_example = grad(one)
    size = sum(t.numel() for t in theta.values())
    step = 1 if part.how == "loop" else max(1, min(batch, FALLBACK_FLOATS // max(size, 1)))
    delta_dims = [None if d is None else (0 if od is None else od) for d, od in zip(deltas, out_dims)]
    dots, sqs = [], []
    for start in range(0, batch, step):
        stop = min(start + step, batch)
        args = [_rows(t, d, start, stop) for t, d in zip(arg_leaves, arg_dims)]
        kwargs = [_rows(t, d, start, stop) for t, d in zip(kwarg_leaves, kwarg_dims)]
        dlt = [_rows(t, d, start, stop) for t, d in zip(deltas, delta_dims)]
        if part.how == "loop":
            g = per_example(theta, [_first(t, d) for t, d in zip(args, arg_dims)],
                            [_first(t, d) for t, d in zip(kwargs, kwarg_dims)],
                            [_first(t, d) for t, d in zip(dlt, delta_dims)])
            g = {n: t.unsqueeze(0) for n, t in g.items()}
        else:
            g = vmap(per_example, in_dims=(None, list(arg_dims), list(kwarg_dims), delta_dims))(theta, args, kwargs, dlt)
        dot = sq = None
        for n in names:
            flat = g[n].reshape(g[n].shape[0], -1)
            if v[n] is not None:
                d = flat @ v[n].reshape(-1)
                dot = d if dot is None else dot + d
            q = flat.pow(2).sum(1)
            sq = q if sq is None else sq + q
        dots.append(dot)
        sqs.append(sq)
    return (torch.cat(dots) if dots[0] is not None else None), torch.cat(sqs)


def _unsqueeze(t, dim):
    return t.unsqueeze(dim) if isinstance(t, torch.Tensor) and dim is not None else t


def _rows(t, dim, start, stop):
    return t.narrow(dim, start, stop - start) if isinstance(t, torch.Tensor) and dim is not None else t


def _first(t, dim):
    return t.select(dim, 0) if isinstance(t, torch.Tensor) and dim is not None else t


# ----------------------------------------------------------------------------- planning
def plan_for(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StatsPlan:
    """The proven plan for ``net`` (made once per network object, from the examples ``x``, ``y``)."""
    if net not in _PLANS:
        _PLANS[net] = make_plan(net, x, y)
    return _PLANS[net]


def make_plan(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StatsPlan:
    """Probe ``net`` on a few of the examples, choose a part for every trainable parameter, and prove the plan in
    float64 against explicit per-example gradients, moving a part that fails to the next way. Raises
    ``UnsupportedModelError`` when the network's examples interact."""
    x, y = _probe_batch(x, y, max(PROBE_SIZES))
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        model = copy.deepcopy(net).eval().double()
        xd = x.double() if x.is_floating_point() else x
        probe = _Probe(model, xd)
        oracle = _per_example_gradients(model, xd, y)
        plan = StatsPlan(_initial_parts(model, probe), {name: type(m).__name__ for name, m in model.named_modules()})
        for _ in range(4 * len(plan.parts) + 8):
            failing = _check(model, plan, xd, y, oracle)
            if not failing:
                return plan
            plan = StatsPlan([_next_way(p, probe, model) if i in failing else p for i, p in enumerate(plan.parts)],
                             plan.kinds)
            plan.parts = _merge(plan.parts)
    raise UnsupportedModelError(f"no exact way to compute per-example gradients of {type(net).__name__} was found")


def _probe_batch(x, y, n):
    if len(x) >= n:
        return x[:n], y[:n]
    reps = -(-n // len(x))
    return torch.cat([x] * reps)[:n], torch.cat([y] * reps)[:n]


class _Probe:
    """What one forward at two batch sizes shows: how often each module runs, the batch axes of its inputs and
    outputs, in which modules each parameter is used, and whose inputs are changed in place after they ran."""

    def __init__(self, model: nn.Module, x: torch.Tensor):
        self.model = model
        self.params = trainable(model)
        self.owners: dict[str, list[str]] = {}
        for mod_name, module in model.named_modules(remove_duplicate=False):
            for local, p in module.named_parameters(recurse=False, remove_duplicate=False):
                for name, q in self.params.items():
                    if q is p:
                        self.owners.setdefault(name, []).append(mod_name)
        runs = [self._run(x[:n]) for n in PROBE_SIZES]
        self.calls = {m: min(len(r["calls"].get(m, [])) for r in runs) for m in dict(model.named_modules())}
        self.uses = runs[0]["uses"]
        self.mutated = runs[0]["mutated"]
        self.dims: dict[str, tuple | None] = {}
        for name in self.calls:
            if self.calls[name] == 1 and all(len(r["calls"][name]) == 1 for r in runs):
                self.dims[name] = _batch_axes(runs[0]["calls"][name][0], runs[1]["calls"][name][0], PROBE_SIZES)

    def _run(self, x):
        stack, calls, uses, inputs = [""], {}, {}, {}
        ids = {id(p): n for n, p in self.params.items()}
        handles = []
        for name, module in self.model.named_modules():
            def pre(module, args, kwargs, name=name):
                stack.append(name)

            def post(module, args, kwargs, out, name=name):
                stack.pop()
                calls.setdefault(name, []).append(tuple([_shape(t) for t in tree_flatten(part)[0]] for part in (args, kwargs, out)))
                inputs.setdefault(name, []).extend((t, t._version) for t in tree_flatten((args, kwargs))[0]
                                                   if isinstance(t, torch.Tensor))

            handles += [module.register_forward_pre_hook(pre, with_kwargs=True),
                        module.register_forward_hook(post, with_kwargs=True)]

        class Uses(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                for leaf in tree_flatten((args, kwargs))[0]:
                    if isinstance(leaf, torch.Tensor) and id(leaf) in ids:
                        uses.setdefault(ids[id(leaf)], set()).add(stack[-1])
                return func(*args, **kwargs)

        try:
            with Uses():
                logits = self.model(x)
            targets = logits.shape[:2] if logits.dim() == 3 and x.dim() == 2 else (len(x),)  # a language model's: (N, T)
            training_loss(logits, torch.zeros(targets, dtype=torch.long, device=x.device)).backward()
        finally:
            for h in handles:
                h.remove()
            self.model.zero_grad(set_to_none=True)
        mutated = {name for name, seen in inputs.items() if any(t._version != ver for t, ver in seen)}
        return {"calls": calls, "uses": uses, "mutated": mutated}


def _shape(t):
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def _batch_axes(small, large, sizes):
    """Per leaf of the (args, kwargs, output) of one call at the two probe batch sizes: the axis whose length follows
    the batch size, None where there is no batch axis, or "?" where the two probes do not tell."""
    def axis(a, b):
        if a is None or b is None:
            return None
        if len(a) != len(b):
            return "?"
        moved = [k for k, (p, q) in enumerate(zip(a, b)) if p != q]
        if not moved:
            return None
        if len(moved) == 1 and (a[moved[0]], b[moved[0]]) == sizes:
            return moved[0]
        return "?"

    if any(len(p) != len(q) for p, q in zip(small, large)):
        return None
    return tuple(tuple(axis(a, b) for a, b in zip(p, q)) for p, q in zip(small, large))


def _initial_parts(model: nn.Module, probe: _Probe) -> list[Part]:
    """The cheapest part for every trainable parameter, before the proof."""
    modules = dict(model.named_modules())
    parts: list[Part] = []
    written_out: list[str] = []
    for mod_name, module in modules.items():
        if any(mod_name.startswith(w + ".") for w in written_out):
            continue  # its parameters belong to the written-out forward of an enclosing layer
        inside = [n for n, _ in module.named_parameters(prefix=mod_name)]
        dims = probe.dims.get(mod_name)
        if (decomposed_for(module) is not None and dims is not None and dims[0] and dims[0][0] not in (None, "?")
                and inside and all(n in probe.params and _within(probe.uses.get(n, set()) | set(probe.owners[n]), mod_name)
                                   for n in inside)):
            parts.append(Part(mod_name, tuple(inside), "decompose"))
            written_out.append(mod_name)
            continue
        own = [f"{mod_name}.{n}" if mod_name else n for n, p in module.named_parameters(recurse=False)
               if (f"{mod_name}.{n}" if mod_name else n) in probe.params and probe.owners.get(f"{mod_name}.{n}" if mod_name else n, [None])[0] == mod_name]
        if not own:
            continue
        clean = all(probe.uses.get(n, set()) <= {mod_name} and len(probe.owners[n]) == 1 for n in own)
        dims = probe.dims.get(mod_name)
        if rule_for(module) is not None and clean and dims is not None:
            args, _kwargs, out = dims
            if args and len(out) == 1 and args[0] != "?" and args[0] == out[0]:
                parts.append(Part(mod_name, tuple(own), "rule", ((args[0],), (out[0],)), clone_inputs=mod_name in probe.mutated))
                continue
        if (rule_for(module) is None and clean and not isinstance(module, FUSED_KERNELS)
                and all(probe.params[n].numel() * max(PROBE_SIZES) <= EXPAND_FLOATS for n in own)):
            parts += [Part(mod_name, (n,), "expand", view=0 if probe.params[n].dim() and probe.params[n].shape[0] == 1 else 1)
                      for n in own]
            continue
        parts.append(_fallback_part(probe, model, _common_module(own, probe), tuple(own)))
    return _merge(parts)


def _within(places: set[str], module: str) -> bool:
    """Every place is ``module`` itself or inside it."""
    return all(p == module or p.startswith(module + ".") or not module for p in places)


def _common_module(names, probe: _Probe) -> str:
    """The innermost module enclosing every owner and every use of these parameters."""
    places = set()
    for n in names:
        places.update(probe.owners[n])
        places.update(probe.uses.get(n, set()))
    split = [p.split(".") if p else [] for p in places]
    common = []
    for level in zip(*split):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _fallback_part(probe: _Probe, model: nn.Module, start: str, params: tuple[str, ...]) -> Part:
    """A fallback at ``start`` or the nearest enclosing module that runs once with batch axes the probe could read."""
    name = start
    while True:
        dims = probe.dims.get(name)
        if dims is not None and "?" not in [d for leaves in dims for d in leaves]:
            return Part(name, params, "fallback", dims, clone_inputs=name in probe.mutated)
        if not name:
            raise UnsupportedModelError("the network's own forward could not be read at two batch sizes")
        name = name.rsplit(".", 1)[0] if "." in name else ""


def _next_way(part: Part, probe: _Probe, model: nn.Module) -> Part:
    """Where a part that failed its proof goes next: a rule or a broadcast parameter to the fallback; a broadcast
    with the next shape first; vmap to one example at a time; one example at a time to the enclosing module."""
    if part.how == "expand" and part.view < 3:
        return replace(part, view=part.view + 1)
    if part.how in ("rule", "expand", "decompose"):
        owner = part.module if part.how == "decompose" else probe.owners[part.params[0]][0]
        return _fallback_part(probe, model, owner, part.params)
    if part.how == "fallback":
        return replace(part, how="loop")
    if not part.module:
        raise UnsupportedModelError("the per-example gradients of the whole network do not match its own; the network "
                                    "is not deterministic in eval mode")
    parent = part.module.rsplit(".", 1)[0] if "." in part.module else ""
    return _fallback_part(probe, model, parent, part.params)


def _merge(parts: list[Part]) -> list[Part]:
    """Fallback parts at the same module become one (one vmap over the module for all its parameters); parts in
    module order, the order the statistics are summed in."""
    merged: list[Part] = []
    for p in parts:
        twin = next((i for i, q in enumerate(merged) if q.how == p.how and q.how in ("fallback", "loop") and q.module == p.module), None)
        if twin is None:
            merged.append(p)
        else:
            merged[twin] = replace(merged[twin], params=merged[twin].params + p.params)
    return merged


def _per_example_gradients(model: nn.Module, x, y) -> dict[str, torch.Tensor]:
    """The oracle: ∇l_n for every trainable parameter, one ``autograd.grad`` per example (batch × shape)."""
    params = trainable(model)
    rows = []
    for n in range(len(x)):
        loss = training_loss(model(x[n:n + 1]), y[n:n + 1], reduction="sum")
        rows.append(torch.autograd.grad(loss, list(params.values()), allow_unused=True))
    with torch.no_grad():
        batched = model(x)
        alone = torch.cat([model(x[n:n + 1]) for n in range(len(x))])
    if not torch.allclose(batched, alone, rtol=1e-9, atol=1e-12):
        raise UnsupportedModelError(_interaction_message(model))
    return {name: torch.stack([r[k] if r[k] is not None else torch.zeros_like(p) for r in rows])
            for k, (name, p) in enumerate(params.items())}


def _interaction_message(model: nn.Module) -> str:
    culprits = [f"{name!r} ({type(m).__name__})" for name, m in model.named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None]
    if culprits:
        return (f"layer {culprits[0]} normalises with the batch's own statistics even in eval mode (track_running_stats"
                f"=False), so an example's output depends on the others in its batch and per-example gradients are not "
                f"defined; build it with track_running_stats=True (the default), or use GroupNorm or LayerNorm")
    return ("the network's output for an example depends on the other examples of its batch even in eval mode, so "
            "per-example gradients are not defined; make its forward treat examples independently")


def _check(model, plan: StatsPlan, x, y, oracle) -> set[int]:
    """The indices of the parts whose dot or norm differs from the oracle's, or whose reduction fails. When the
    instrumented pass itself fails or changes the logits, the parts that change the forward (broadcasts) are tried
    one at a time, and those that fail alone are blamed (all of them when none does)."""
    gen = torch.Generator(device=x.device).manual_seed(0)
    v = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype, device=p.device) for n, p in trainable(model).items()}
    broadcasts = {i for i, p in enumerate(plan.parts)  # the parts that change the forward itself
                  if p.how in ("expand", "decompose") or p.how == "rule" and p.dims[0][0] is None}
    try:
        kept, logits, _ = _instrumented_pass(model, plan, x, y)
        with torch.no_grad():
            same = torch.allclose(logits, model(x), rtol=1e-12, atol=1e-12)
    except Exception:  # noqa: BLE001 - any failure of an instrumented part sends it on to the next way
        same = False
    if not same:
        suspects = broadcasts or set(range(len(plan.parts)))
        alone = {i for i in suspects if not _works_alone(model, plan, i, x, y, v, oracle)}
        return alone or suspects
    modules = dict(model.named_modules())
    failing = set()
    for i, part in enumerate(plan.parts):
        try:
            dot, sq = _reduce(part, modules[part.module], kept[i], {n: v[n] for n in part.params}, len(x))
        except Exception:  # noqa: BLE001
            failing.add(i)
            continue
        if not _matches(part, dot, sq, v, oracle):
            failing.add(i)
    return failing


def _works_alone(model, plan: StatsPlan, i: int, x, y, v, oracle) -> bool:
    try:
        ((dot, sq),), _, _ = _forward_backward(model, StatsPlan([plan.parts[i]], plan.kinds), x, y, v)
    except Exception:  # noqa: BLE001
        return False
    return _matches(plan.parts[i], dot, sq, v, oracle)


def _matches(part: Part, dot, sq, v, oracle) -> bool:
    g = torch.cat([oracle[n].reshape(len(oracle[n]), -1) for n in part.params], 1)
    want_dot = g @ torch.cat([v[n].reshape(-1) for n in part.params])
    want_sq = g.pow(2).sum(1)
    scale_dot = float(want_dot.abs().max()) or 1.0
    scale_sq = float(want_sq.max()) or 1.0
    return (dot is not None and sq is not None and dot.shape == want_dot.shape
            and float((dot - want_dot).abs().max()) <= VERIFY_RTOL * scale_dot
            and float((sq - want_sq).abs().max()) <= VERIFY_RTOL * scale_sq)
