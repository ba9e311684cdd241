"""The plan of the statistics pass: which part, and which way (``statistics/ways.py``), covers each trainable parameter.

``plan_for`` picks the cheapest part for every parameter from one probe of the network (one forward at two batch
sizes: how often each module runs, the batch axes of its inputs and outputs, where each parameter is used) and then
proves the plan (``statistics/proof.py``): a part that does not match explicit per-example gradients in float64, or
fails, moves to the next way. The blocks (``block_of``) group the parts' statistics for the per-block scores.
"""
from __future__ import annotations

import copy
import weakref
from collections import Counter
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from pmp_lightning.errors import UnsupportedModelError
from pmp_lightning.statistics.layer_rules import decomposed_for, rule_for
from pmp_lightning.statistics.proof import direction, failing, oracle
from pmp_lightning.statistics.ways import DECOMPOSE, EXPAND, FALLBACK, LOOP, RULE, Part
from pmp_lightning.task import training_loss
from pmp_lightning.training import trainable

EXPAND_FLOATS = 2**24  # a bare parameter is broadcast along the batch only while batch × its size stays below this
PROBE_SIZES = (5, 7)  # two batch sizes (rarely a length a network has): an axis that follows them is the batch axis
# layers whose float32 CPU kernels (mkldnn's RNNs) read a parameter broadcast along the batch wrongly, though the float64
# proof passes: their parameters go to the fallback, never to a broadcast
FUSED_KERNELS = (nn.RNNBase,)


@dataclass
class StatsPlan:
    parts: list[Part]
    kinds: dict[str, str] = field(default_factory=dict)  # module name -> type name

    def summary(self) -> str:
        """One line for the log: how many layers each way, and what goes to the fallback."""
        by_rule = Counter(self.kinds[p.module] for p in self.parts if p.way in (RULE, DECOMPOSE))
        line = ", ".join(f"{kind} ×{n}" for kind, n in by_rule.items()) or "none"
        slow = [p for p in self.parts if p.way.per_example]
        expanded = [p for p in self.parts if p.way is EXPAND]
        text = f"per-layer rules for {sum(by_rule.values())} layers ({line})"
        if expanded:
            text += f"; broadcast along the batch: {', '.join(p.params[0] for p in expanded)}"
        if slow:
            text += "; per-example vmap(grad) (the fallback) for " + ", ".join(
                f"{p.label} ({self.kinds[p.module]}{', one example at a time' if p.way is LOOP else ''}: "
                f"{', '.join(n[len(p.module) + 1:] if p.module else n for n in p.params)})" for p in slow)
        if any(p.way is LOOP for p in slow):
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


def stacked_blocks(net: nn.Module) -> list[str]:
    """The network's blocks (``block_of``) that each hold the parameters of several modules: a ResNet's stem and
    residual blocks, a ViT's encoder blocks; none in a network of single layers (the reported CNN, an MLP). Two or
    more make the network *stacked*, for which ``scoring.canaries=auto`` holds out canaries (policy.py)."""
    owners: dict[str, set[str]] = {}
    for name, module in net.named_modules():
        own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]  # the parameters training moves
        if own:
            owners.setdefault(block_of(f"{name}.{own[0]}" if name else own[0], net), set()).add(name)
    return [block for block, modules in owners.items() if len(modules) > 1]


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
        v = direction(model)
        explicit = oracle(model, xd, y, v)
        plan = StatsPlan(_initial_parts(model, probe), {name: type(m).__name__ for name, m in model.named_modules()})
        for _ in range(4 * len(plan.parts) + 8):
            wrong = failing(model, plan.parts, xd, y, v, explicit)
            if not wrong:
                return plan
            plan = StatsPlan(_merge([_next_way(p, probe, model) if i in wrong else p for i, p in enumerate(plan.parts)]),
                             plan.kinds)
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
            targets = logits.shape[:-1]  # one target per output: an example's, or a document's at each position (N, T)
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
            parts.append(Part(mod_name, tuple(inside), DECOMPOSE))
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
                parts.append(Part(mod_name, tuple(own), RULE, ((args[0],), (out[0],)), clone_inputs=mod_name in probe.mutated))
                continue
        if (rule_for(module) is None and clean and not isinstance(module, FUSED_KERNELS)
                and all(probe.params[n].numel() * max(PROBE_SIZES) <= EXPAND_FLOATS for n in own)):
            parts += [Part(mod_name, (n,), EXPAND, view=0 if probe.params[n].dim() and probe.params[n].shape[0] == 1 else 1)
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
            return Part(name, params, FALLBACK, dims, clone_inputs=name in probe.mutated)
        if not name:
            raise UnsupportedModelError("the network's own forward could not be read at two batch sizes")
        name = name.rsplit(".", 1)[0] if "." in name else ""


def _next_way(part: Part, probe: _Probe, model: nn.Module) -> Part:
    """Where a part that failed its proof goes next: a rule or a broadcast parameter to the fallback; a broadcast
    with the next shape first; vmap to one example at a time; one example at a time to the enclosing module."""
    if part.way is EXPAND and part.view < 3:
        return replace(part, view=part.view + 1)
    if not part.way.per_example:
        owner = part.module if part.way is DECOMPOSE else probe.owners[part.params[0]][0]
        return _fallback_part(probe, model, owner, part.params)
    if part.way is FALLBACK:
        return replace(part, way=LOOP)
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
        twin = next((i for i, q in enumerate(merged) if q.way is p.way and q.way.per_example and q.module == p.module), None)
        if twin is None:
            merged.append(p)
        else:
            merged[twin] = replace(merged[twin], params=merged[twin].params + p.params)
    return merged
