"""The ways a part of a network has its per-example gradients reduced, and the instrumented pass that runs them.

Each way is a small class: ``instrument`` sets up what the forward keeps for its part (a layer's input, a module's
arguments, a parameter broadcast along the batch), and ``reduce`` turns what was kept, with δ_n = ∂l_n/∂(output)
from one backward of Σ_n l_n, into each example's (dot with the direction, squared norm). The plan
(``statistics/plan.py``) gives each trainable parameter to one part and one way, cheapest first:

- ``RULE``: a layer with an exact per-layer formula (``statistics/layer_rules.py``: Linear of any input rank,
  Conv1d/2d/3d, Embedding, LayerNorm, GroupNorm, BatchNorm in eval mode, InstanceNorm, RMSNorm). A layer whose
  output carries no batch axis (a position embedding looked up for ``arange(T)``) has its output broadcast to the
  batch during the pass, so that the backward gives each example its own δ.
- ``DECOMPOSE``: a layer that uses its weights functionally and has a written-out forward
  (``layer_rules.DECOMPOSED``: ``nn.MultiheadAttention``) runs that forward during the pass, every projection
  recorded for the Linear rule and every directly used parameter broadcast along the batch.
- ``EXPAND``: a parameter used directly in a module's ``forward`` (a class token, a position embedding held as a
  bare ``nn.Parameter``) is replaced, for the pass, by a view of itself broadcast along a batch axis; the gradient
  of that view is the per-example gradient.
- ``FALLBACK``: anything else that holds parameters: the module is differentiated per example with
  ``torch.func.vmap(grad)`` on that module alone, given its recorded inputs and δ, in sub-batches that bound the
  per-example gradients held at once; ``LOOP`` does the same one example at a time where vmap cannot run.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from pmp_lightning.statistics.layer_rules import accumulate, decomposed_for, linear_map, rule_for
from pmp_lightning.task import training_loss
from pmp_lightning.training import trainable

FALLBACK_FLOATS = 2**24  # per-example gradients a fallback holds at once (64 MiB in float32): sets its sub-batch


class Way:
    """How one part's per-example gradients are reduced (see the module docstring)."""

    name = ""
    per_example = False  # differentiates the part example by example (vmap or a loop), not by a rule or a broadcast

    def instrument(self, i: int, part: "Part", module: nn.Module, run: "_Run") -> None:
        raise NotImplementedError

    def reduce(self, part: "Part", module: nn.Module, record: dict, v: dict, batch: int):
        """(dot or None, squared norm) per example, from what the pass kept for the part."""
        raise NotImplementedError

    def changes_forward(self, part: "Part") -> bool:
        """Whether the part changes the forward itself (broadcasts), which the proof blames first when the
        instrumented forward fails or changes the logits."""
        return False

    def __repr__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Part:
    """The trainable parameters ``params`` (full names) of the module ``module`` and the ``way`` their per-example
    gradients are reduced. ``dims`` are batch axes, one per leaf (``tree_flatten``) of the module's arguments, keyword
    arguments (fallback only) and output, None where a leaf has no batch axis (the pass then broadcasts that output
    along the batch); a rule keeps its input's and its output's. ``view`` is the broadcast shape of an expanded
    parameter (``broadcast``)."""

    module: str
    params: tuple[str, ...]
    way: Way
    dims: tuple = ((0,), (0,))
    view: int = 0
    clone_inputs: bool = False

    @property
    def label(self) -> str:
        return self.module or "(the network itself)"

    def local(self, v: dict) -> dict:
        """``v`` keyed by the part's module's own parameter names."""
        prefix = f"{self.module}." if self.module else ""
        return {n[len(prefix):]: d for n, d in v.items()}


@dataclass
class _Run:
    """One instrumented pass: what each part kept (by index), the parameters broadcast for it, and how to undo the
    instrumentation."""

    batch: int
    params: dict
    kept: dict = field(default_factory=dict)
    swapped: dict = field(default_factory=dict)
    undo: list = field(default_factory=list)

    def keep(self, part: "Part"):
        """What to keep of a module's inputs (a clone where the network changes them in place after they ran)."""
        return (lambda t: t.detach().clone()) if part.clone_inputs else (lambda t: t.detach())


def broadcast(t: torch.Tensor, batch: int, view: int) -> torch.Tensor:
    """``t`` broadcast along a new leading batch axis: ``view`` 0 expands a leading axis of length 1 in place (a
    (1, T, D) position embedding); ``view`` k ≥ 1 puts the batch first and k − 1 axes of length 1 after it (a (D,)
    bias added to (B, T, D) features needs (B, 1, D): k = 2)."""
    if view == 0:
        return t.expand(batch, *t.shape[1:])
    return t.reshape(1, *(1,) * (view - 1), *t.shape).expand(batch, *(1,) * (view - 1), *t.shape)


def _grown(t: torch.Tensor, batch: int) -> torch.Tensor:
    """A tensor without a batch axis broadcast to the batch (along its leading axis of length 1, or a new one)."""
    return broadcast(t, batch, 0 if t.dim() and t.shape[0] == 1 else 1)


class Rule(Way):
    name = "rule"

    def instrument(self, i, part, module, run):
        keep = run.keep(part)

        def hook(module, args, kwargs, out):  # a layer: one input, one output tensor
            grown = out if part.dims[-1][0] is not None else _grown(out, run.batch)
            a = keep(args[0])
            if part.dims[0][0] is None:
                a = _grown(a, run.batch)
            run.kept[i] = {"edges": [get_gradient_edge(grown)], "shapes": [grown.shape], "a": a}
            return None if grown is out else grown

        run.undo.append(module.register_forward_hook(hook, with_kwargs=True).remove)

    def reduce(self, part, module, record, v, batch):
        in_dim, out_dim = part.dims[0][0], part.dims[-1][0]
        a = record["a"] if in_dim in (None, 0) else record["a"].movedim(in_dim, 0)
        delta = record["deltas"][0] if out_dim in (None, 0) else record["deltas"][0].movedim(out_dim, 0)
        return rule_for(module)(module, a, delta, part.local(v))

    def changes_forward(self, part):
        return part.dims[0][0] is None


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


class Decompose(Way):
    name = "decompose"

    def instrument(self, i, part, module, run):
        run.kept[i] = {"edges": [], "shapes": [], "uses": []}
        module.forward = functools.partial(decomposed_for(module), module, _Recorder(module, run.kept[i], run.batch))
        run.undo.append(lambda: delattr(module, "forward"))  # the class's own forward again

    def reduce(self, part, module, record, v, batch):
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

    def changes_forward(self, part):
        return True


class Expand(Way):
    name = "expand"

    def instrument(self, i, part, module, run):
        (name,) = part.params
        view = broadcast(run.params[name], run.batch, part.view)
        run.swapped[name] = view
        run.kept[i] = {"edges": [get_gradient_edge(view)], "shapes": [view.shape]}

    def reduce(self, part, module, record, v, batch):
        g = record["deltas"][0].reshape(batch, -1)
        (name,) = part.params
        dot = g @ v[name].reshape(-1) if v[name] is not None else None
        return dot, g.pow(2).sum(1)

    def changes_forward(self, part):
        return True


class Fallback(Way):
    """Per-example gradients of the part's parameters through its module alone: vmap(grad) over sub-batches of at
    most ``FALLBACK_FLOATS`` gradient entries, each reduced at once to its dot and squared norm."""

    name = "fallback"
    per_example = True

    def instrument(self, i, part, module, run):
        keep = run.keep(part)

        def hook(module, args, kwargs, out):
            leaves, spec = tree_flatten(out)
            grown = [_grown(t, run.batch) if isinstance(t, torch.Tensor) and d is None and t.requires_grad else t
                     for t, d in zip(leaves, part.dims[-1])]
            record = {"edges": [], "shapes": [], "slots": [], "leaves": len(grown)}
            for k, t in enumerate(grown):
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    record["edges"].append(get_gradient_edge(t))
                    record["shapes"].append(t.shape)
                    record["slots"].append(k)
            record["args"] = tree_flatten(tree_map(lambda t: keep(t) if isinstance(t, torch.Tensor) else t, args))
            record["kwargs"] = tree_flatten(tree_map(lambda t: keep(t) if isinstance(t, torch.Tensor) else t, kwargs))
            run.kept[i] = record
            changed = any(g is not t for g, t in zip(grown, leaves))
            return tree_unflatten(grown, spec) if changed else None

        run.undo.append(module.register_forward_hook(hook, with_kwargs=True).remove)

    def reduce(self, part, module, record, v, batch):
        # no_grad: the per-example gradients must not join a graph through the module's other parameters; the math
        # attention kernel has batching rules (the fused CPU one has none and would run example by example)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            return self._reduce(part, module, record, part.local(v), batch)

    def step(self, batch: int, size: int) -> int:
        return max(1, min(batch, FALLBACK_FLOATS // max(size, 1)))

    def gradients(self, per_example, theta, args, kwargs, dlt, dims):
        return vmap(per_example, in_dims=(None, *dims))(theta, args, kwargs, dlt)

    def _reduce(self, part, module, record, v, batch):
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

        step = self.step(batch, sum(t.numel() for t in theta.values()))
        delta_dims = [None if d is None else (0 if od is None else od) for d, od in zip(deltas, out_dims)]
        dims = (list(arg_dims), list(kwarg_dims), delta_dims)
        dots, sqs = [], []
        for start in range(0, batch, step):
            stop = min(start + step, batch)
            rows = [[_rows(t, d, start, stop) for t, d in zip(leaves, ds)]
                    for leaves, ds in zip((arg_leaves, kwarg_leaves, deltas), dims)]
            g = self.gradients(grad(one), theta, *rows, dims)
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


class Loop(Fallback):
    """The fallback one example at a time, for modules that vmap cannot run."""

    name = "loop"

    def step(self, batch, size):
        return 1

    def gradients(self, per_example, theta, args, kwargs, dlt, dims):
        first = [[_first(t, d) for t, d in zip(leaves, ds)] for leaves, ds in zip((args, kwargs, dlt), dims)]
        return {n: t.unsqueeze(0) for n, t in per_example(theta, *first).items()}


RULE, DECOMPOSE, EXPAND, FALLBACK, LOOP = Rule(), Decompose(), Expand(), Fallback(), Loop()


def _unsqueeze(t, dim):
    return t.unsqueeze(dim) if isinstance(t, torch.Tensor) and dim is not None else t


def _rows(t, dim, start, stop):
    return t.narrow(dim, start, stop - start) if isinstance(t, torch.Tensor) and dim is not None else t


def _first(t, dim):
    return t.select(dim, 0) if isinstance(t, torch.Tensor) and dim is not None else t


def instrumented_pass(net: nn.Module, parts: list[Part], x, y):
    """Forward with every part instrumented, then one backward of Σ_n l_n to the parts' outputs: what each part kept,
    with its δ, the logits (detached) and the per-example losses."""
    modules = dict(net.named_modules())
    run = _Run(len(x), trainable(net))
    try:
        for i, part in enumerate(parts):
            part.way.instrument(i, part, modules[part.module], run)
        logits = functional_call(net, run.swapped, (x,)) if run.swapped else net(x)
    finally:
        for undo in run.undo:
            undo()
    losses = training_loss(logits, y, reduction="none")
    kept = run.kept
    order = [(i, k) for i in range(len(parts)) for k in range(len(kept[i]["edges"]))]
    found = torch.autograd.grad(losses.sum(), [kept[i]["edges"][k] for i, k in order], allow_unused=True) if order else ()
    for (i, k), g in zip(order, found):
        kept[i].setdefault("deltas", []).append(
            g if g is not None else torch.zeros(kept[i]["shapes"][k], dtype=logits.dtype, device=logits.device))
    return kept, logits.detach(), losses


def forward_backward(net: nn.Module, parts: list[Part], x, y, v):
    """The instrumented pass, then every part's reduction: per part (dot or None, squared norm), the logits
    (detached) and the per-example losses."""
    kept, logits, losses = instrumented_pass(net, parts, x, y)
    modules = dict(net.named_modules())
    results = [part.way.reduce(part, modules[part.module], kept[i],
                               {n: (None if v is None else v[n]) for n in part.params}, len(x))
               for i, part in enumerate(parts)]
    return results, logits, losses
