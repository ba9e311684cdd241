"""The two ends of the costate recursion: the downstream objective J and the propagator P_t.

    λ_T = ∇J(θ_T)
    λ_t = a_t ∇J(θ_t) + P_t(λ_{t+1})          (a_t = 1 for horizon=area, 0 for terminal)

**Objectives** are small pure functions of (logits, labels) returning one value per downstream
example; J is their mean over the downstream set. They define J only: the Hessian-vector products
inside P_t keep the training loss (cross-entropy), because that is what training descended.

    ce            l = CE(z, y)                       saturates: a fitted example has ∂l/∂z = p − e_y ≈ 0
    tempered_ce   l = T · CE(z / T, y)               ∂l/∂z = softmax(z/T) − e_y, large until z is T times larger
    logit_gap     l = mean_k z_k − z_y               the T → ∞ limit of tempered_ce (minus T log K): ∂l/∂z = 1/K − e_y,
                                                     the same for every example, fitted or not
    margin        l = max_{k≠y} z_k − z_y            the negated margin: ∂l/∂z = e_runner-up − e_y
    log_odds      l = −log(p_y / (1 − p_y))          TRAK's output function (negated)
    unit_ce       l = CE(z, y) / ‖p − e_y‖            (the norm held constant): ∂l/∂z = (p − e_y)/‖p − e_y‖, CE's own
                                                     direction, which names the class the model confuses y with, at
                                                     unit length, so a fitted example pulls as hard as a misfit one

Every one keeps ‖∂l/∂z‖ ≥ √(1 − 1/K) on fitted examples except ``ce`` (and ``tempered_ce`` with a
small T), which is why ``ce`` lets a handful of misfitted downstream examples carry ∇J late in
training (see ``participation``). ``tempered_ce`` and ``logit_gap`` buy that by flattening p towards
uniform, which discards which class the model confuses; ``unit_ce`` keeps it.

**Centring** (``objective.centred``). With w_m = ∂l_m/∂z_m, J's gradient is the mean of J_mᵀ w_m over the
downstream set. Its mean pull w̄ = mean_m w_m is a shift of every logit by the same vector: it moves class
priors, not decisions. Through the output bias, and through the last layer's uncentred (ReLU) features,
every pool example's gradient shares that direction, so ⟨λ, ∇l_n⟩ credits or blames an example for its
observed class alone; on a small downstream set w̄ is mostly its class-count imbalance. A centred J
removes it: at each snapshot θ_t,

    J_c(θ) = mean_m [l_m(θ) − w̄_tᵀ z_m(θ)],     w̄_t = mean_m ∂l_m/∂z_m at θ_t, held constant,

so ∇J_c = mean_m J_mᵀ (w_m − w̄_t) and the gradient of J_c with respect to the output bias is zero. The
exact identity holds for J_c like for any J (``tests/test_exactness.py``).

**Propagators** P_t(λ) for ``replay.curvature``:

    exact / coarse   λ − η_t ∇²L(θ_t) λ              (the paper's formula)
    none             λ
    expm             exp(−η_t H⁺) λ by Lanczos: the gradient-flow propagator over the interval,
                     with H's negative Ritz values set to 0; every factor ≤ 1, so ‖P_t(λ)‖ ≤ ‖λ‖
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from pmp_lightning.errors import ReplayConfigError
from pmp_lightning.task import kind_of, training_loss

ObjectiveFn = Callable[..., torch.Tensor]
OBJECTIVES: dict[str, ObjectiveFn] = {}


def register_objective(name: str) -> Callable[[ObjectiveFn], ObjectiveFn]:
    def add(fn: ObjectiveFn) -> ObjectiveFn:
        OBJECTIVES[name] = fn
        return fn

    return add


@register_objective("ce")
def ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (what the paper and LMOps use)."""
    return F.cross_entropy(z, y, reduction="none")


@register_objective("tempered_ce")
def tempered_ce(z: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """T · CE(z / T, y): the factor T keeps ∇J finite as T grows (it tends to ∇ of logit_gap)."""
    return temperature * F.cross_entropy(z / temperature, y, reduction="none")


@register_objective("logit_gap")
def logit_gap(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean_k z_k − z_y: linear in the logits, so no example ever stops counting."""
    return z.mean(1) - z.gather(1, y[:, None]).squeeze(1)


@register_objective("margin")
def margin(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{k≠y} z_k − z_y, the negated margin of the true label."""
    others = z.scatter(1, y[:, None], float("-inf"))
    return others.max(1).values - z.gather(1, y[:, None]).squeeze(1)


@register_objective("log_odds")
def log_odds(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """−log(p_y / (1 − p_y)) = logsumexp_{k≠y} z_k − z_y (TRAK's model output, negated)."""
    others = z.scatter(1, y[:, None], float("-inf"))
    return others.logsumexp(1) - z.gather(1, y[:, None]).squeeze(1)


@register_objective("unit_ce")
def unit_ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CE(z, y) / ‖p − e_y‖ with the norm held constant: CE's direction in logit space at unit length per example."""
    p = z.detach().softmax(1)
    others = p.scatter(1, y[:, None], 0.0)
    # ‖p − e_y‖² = (1 − p_y)² + Σ_{k≠y} p_k², with 1 − p_y summed from the other classes (exact when p_y rounds to 1)
    norm = (others.sum(1).pow(2) + others.pow(2).sum(1)).sqrt().clamp_min(torch.finfo(z.dtype).tiny)
    return F.cross_entropy(z, y, reduction="none") / norm


class Objective:
    """J: the registered per-example objective ``name`` with its settings, averaged over the downstream set,
    with its mean logit pull removed when ``centred``. Called on (logits, labels), it gives l_m per example.

    (A plain class, not a dataclass: Hydra would turn a dataclass passed to ``instantiate`` into a config.)
    """

    def __init__(self, name: str, params: dict[str, float] | None = None, centred: bool = False):
        self.name, self.params, self.centred = name, dict(sorted((params or {}).items())), centred

    def __call__(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # a language model's documents: the objective per target, averaged in each (task.LanguageModel.per_example)
        return kind_of(z, y).per_example(functools.partial(OBJECTIVES[self.name], **self.params), z, y)

    def __repr__(self) -> str:
        return f"Objective({describe(self)})"


def objective(name: str, centred: bool = False, **params) -> Objective:
    """The registered objective ``name`` with its settings (what ``conf/objective/*.yaml`` builds)."""
    if name not in OBJECTIVES:
        raise ReplayConfigError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)} (objective=<name>)")
    wanted = [p for p in inspect.signature(OBJECTIVES[name]).parameters][2:]
    if sorted(params) != sorted(wanted):
        raise ReplayConfigError(f"objective={name} takes the setting(s) {wanted or 'none'}, got {sorted(params) or 'none'}")
    if "temperature" in params and not (isinstance(params["temperature"], (int, float)) and params["temperature"] > 0):
        raise ReplayConfigError(f"objective.temperature={params['temperature']!r}; give a positive number, e.g. 8")
    if not isinstance(centred, bool):
        raise ReplayConfigError(f"objective.centred={centred!r}; give true or false")
    return Objective(name, {k: float(v) for k, v in params.items()}, centred)


def describe(fn: ObjectiveFn) -> str:
    """``tempered_ce(temperature=8.0), centred``: how logs, fingerprints and metrics name an objective."""
    if not isinstance(fn, Objective):
        return getattr(fn, "__name__", repr(fn))
    args = ", ".join(f"{k}={v!r}" for k, v in fn.params.items())
    return (f"{fn.name}({args})" if args else fn.name) + (", centred" if fn.centred else "")


def is_centred(fn: ObjectiveFn) -> bool:
    return bool(getattr(fn, "centred", False))


def logit_pulls(fn: ObjectiveFn, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """w_m = ∂l_m/∂z_m per downstream example (B, K; a language model's document (B, T, V), a pull at each position):
    how example m pulls on ∇J through its logits."""
    z = logits.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(fn(z, labels).sum(), z)
    return g


def pull_sum(pulls: torch.Tensor) -> torch.Tensor:
    """Σ_m of the examples' logit pulls as one vector over the classes: a document's pulls summed over its positions
    too, so that w̄ = pull_sum / M shifts every logit of every position alike."""
    return pulls.flatten(0, -2).sum(0)


def centred_values(fn: ObjectiveFn, z: torch.Tensor, y: torch.Tensor, mean_pull: torch.Tensor | None) -> torch.Tensor:
    """l_m − w̄ᵀ z_m per example (w̄ held constant), or l_m itself when ``mean_pull`` is None. A language model's
    document: l_m − (1/T_m) Σ_t w̄ᵀ z_{m,t} over its targets, so a shift of every logit at every position by the same
    vector leaves the centred J unchanged, as a shift of every logit does for a classifier."""
    values = fn(z, y)
    if mean_pull is None:
        return values
    return values - kind_of(z, y).average(z @ mean_pull, z, y)


def logit_weights(fn: ObjectiveFn, logits: torch.Tensor, labels: torch.Tensor,
                  mean_pull: torch.Tensor | None = None) -> torch.Tensor:
    """‖∂l_m/∂z_m‖ per downstream example (‖w_m − w̄‖ for a centred J): how much example m pulls on ∇J."""
    pulls = logit_pulls(fn, logits, labels)
    if mean_pull is not None:
        pulls = pulls - kind_of(logits, labels).weights(logits, labels)[..., None] * mean_pull
    return pulls.flatten(1).norm(dim=1)


def participation(sum_w: float, sum_w2: float, count: int) -> float:
    """(Σw)² / (M Σw²) ∈ [1/M, 1]: the fraction of the M downstream examples that carry ∇J.

    1 when every example pulls equally (``logit_gap``); about k/M when k examples carry it all.
    """
    return 0.0 if sum_w2 <= 0 else sum_w**2 / (count * sum_w2)


# ----------------------------------------------------------------------------- at one snapshot
Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
Params = dict[str, torch.Tensor]


def _same(t):
    return t


def downstream_gradient(net: nn.Module, params: Params, fn: ObjectiveFn, batches: Batches, count: int, need_grad: bool = True,
                        reduce: Callable[[torch.Tensor], torch.Tensor] = _same, with_pull: bool = False
                        ) -> tuple[Params | None, torch.Tensor | None, float]:
    """∇J at ``params`` (by name; None unless ``need_grad``), the mean logit pull w̄ (None unless J is centred or
    ``with_pull``), and the share of the downstream set carrying ∇J (``participation``), over the ``count`` downstream
    examples that ``batches()`` yields. A centred J first takes w̄ in one forward; then one forward and backward per
    batch. ``reduce`` sums over the processes of a distributed replay. The replay and ``diagnose`` both use it."""
    mean_pull = None
    if is_centred(fn) or with_pull:
        with torch.no_grad():
            mean_pull = reduce(sum(pull_sum(logit_pulls(fn, net(x), y)) for x, y in batches())) / count
    centre = mean_pull if is_centred(fn) else None

    def summed(p, x, y):
        z = functional_call(net, p, (x,))
        return centred_values(fn, z, y, centre).sum(), z.detach()

    grads = {k: torch.zeros_like(p) for k, p in params.items()} if need_grad else None
    sums = None
    for x, y in batches():
        if need_grad:
            g, logits = grad(summed, has_aux=True)(params, x, y)
            for k in grads:
                grads[k] += g[k]
        else:
            with torch.no_grad():
                logits = net(x)
        w = logit_weights(fn, logits, y, centre).double()
        part = torch.stack([w.sum(), w.pow(2).sum()])
        sums = part if sums is None else sums + part
    if sums is None:  # no example here (a rank's share of a small class's downstream examples): it adds nothing
        sums = torch.zeros(2, dtype=torch.float64, device=next(iter(params.values())).device)
    sums = reduce(sums)
    share = participation(float(sums[0]), float(sums[1]), count)
    return grads, mean_pull, share


def _along(net: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor) -> Callable[[Params], Params]:
    """v ↦ ∇²(Σ_n l_n)(θ) · v on the batch (x, y): forward-over-reverse."""
    def summed_loss(p):
        return training_loss(functional_call(net, p, (x,)), y, reduction="sum")

    return lambda v: jvp(grad(summed_loss), (params,), (v,))[1]


def hessian_vector_product(net: nn.Module, params: Params, v: Params, batches: Batches) -> Params:
    """Σ over the examples ``batches()`` yields of ∇²l_n(θ) · v, the training loss's curvature along ``v``
    (forward-over-reverse; attention through the math kernel, the one with forward-mode derivatives)."""
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    with sdpa_kernel(SDPBackend.MATH):
        for x, y in batches():
            hv = _along(net, params, x, y)(v)
            for k in total:
                total[k] += hv[k]
    return total


def hessian_vector_products(net: nn.Module, params: Params, vs: Params, batches: Batches, vectorised: bool = True) -> Params:
    """``hessian_vector_product`` for K directions at once: ``vs`` holds each parameter's K directions stacked on a
    leading axis (K × its shape), and so does the result. ``vectorised``: the K tangents of one forward-over-reverse
    pass (``torch.func.vmap`` over the ``jvp``: the primal forward and backward run once per batch, only the tangents
    carry the K axis); otherwise one ``jvp`` per direction, the primal recomputed each time (for layers vmap cannot
    batch)."""
    total = {k: torch.zeros_like(v) for k, v in vs.items()}
    count = next(iter(vs.values())).shape[0]
    with sdpa_kernel(SDPBackend.MATH):
        for x, y in batches():
            along = _along(net, params, x, y)
            if vectorised:
                hv = vmap(along)(vs)
            else:
                each = [along({k: v[r] for k, v in vs.items()}) for r in range(count)]
                hv = {k: torch.stack([h[k] for h in each]) for k in total}
            for k in total:
                total[k] += hv[k]
    return total


# ----------------------------------------------------------------------------- propagators
Hvp = Callable[[torch.Tensor], torch.Tensor]


def step(hvp: Hvp, lam: torch.Tensor, eta: float, steps: int) -> torch.Tensor:
    """λ − η H λ: one gradient-descent step's adjoint (exact for a snapshot per step)."""
    return lam - eta * hvp(lam)


def identity(hvp: Hvp, lam: torch.Tensor, eta: float, steps: int) -> torch.Tensor:
    """λ: the Hessian term dropped."""
    return lam


def lanczos_expm(hvp: Hvp, v: torch.Tensor, eta: float, steps: int) -> torch.Tensor:
    """exp(−η H⁺) v from ``steps`` Lanczos iterations with full reorthogonalisation.

    H⁺ is H with negative Ritz values set to 0, so every factor exp(−η θ_i) lies in (0, 1]: the result's
    norm never exceeds ‖v‖.
    """
    beta0 = v.norm()
    if beta0 == 0:
        return v.clone()
    basis = [v / beta0]
    alphas, betas = [], []
    for j in range(steps):
        w = hvp(basis[j])
        alphas.append(torch.dot(w, basis[j]))
        for q in basis:  # full reorthogonalisation (twice is enough)
            w = w - torch.dot(w, q) * q
        for q in basis:
            w = w - torch.dot(w, q) * q
        b = w.norm()
        scale = max(abs(float(a)) for a in alphas)
        if j == steps - 1 or float(b) <= 1e-10 * scale:  # the Krylov space is invariant: T is exact
            break
        betas.append(b)
        basis.append(w / b)
    coeff = _krylov_expm(torch.stack(alphas), torch.stack(betas) if betas else alphas[0].new_zeros(0), eta)
    return beta0 * sum(c * q for c, q in zip(coeff.to(v.device, v.dtype), basis))


def _krylov_expm(alphas: torch.Tensor, betas: torch.Tensor, eta: float) -> torch.Tensor:
    """exp(−η T⁺) e_1 for the Lanczos tridiagonal matrix T (diagonal ``alphas``, off-diagonal the first
    len(alphas) − 1 of ``betas``), negative Ritz values set to 0: the coefficients of the result in the Krylov basis."""
    k = len(alphas)
    T = torch.diag(alphas.double().cpu())
    if k > 1:
        off = betas[: k - 1].double().cpu()
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    ritz, vecs = torch.linalg.eigh(T)
    return vecs @ (torch.exp(-eta * ritz.clamp(min=0)) * vecs[0])


def lanczos_expm_stack(hvp: Hvp, v: torch.Tensor, eta: float, steps: int) -> torch.Tensor:
    """``lanczos_expm`` of each row of ``v`` (K × P: K costates), the K Krylov iterations run in lockstep so that each
    Hessian-vector product is one call on the rows still iterating (``hvp`` maps R × P to R × P). Row by row it is the
    same algorithm: its own basis, its own early stop when its Krylov space is invariant, its own exp(−η H⁺) of its
    tridiagonal matrix; the reorthogonalisation against a row's basis is done twice, as there, but as two batched
    block projections (classical Gram–Schmidt twice) rather than vector by vector, which differs only in rounding.
    A 1-D ``v`` is ``lanczos_expm`` itself."""
    if v.dim() == 1:
        return lanczos_expm(hvp, v, eta, steps)
    K = len(v)
    beta0 = v.norm(dim=1)
    out = v.clone()
    active = [r for r, b in enumerate(beta0.tolist()) if b != 0]  # a zero row stays zero, as lanczos_expm returns it
    if not active or steps < 1:
        return out
    basis = v.new_zeros((K, steps, v.shape[1]))  # row r's basis vectors q_0..q_j at basis[r, :j+1]
    basis[:, 0] = v / torch.where(beta0 > 0, beta0, torch.ones_like(beta0))[:, None]
    alphas: dict[int, list[float]] = {r: [] for r in active}
    betas: dict[int, list[float]] = {r: [] for r in active}
    for j in range(steps):
        q = basis[:, j]
        if len(active) == K:
            w = hvp(q)
        else:  # only the rows still iterating cost a product; the others' w stays 0
            rows = torch.tensor(active, device=v.device)
            w = torch.zeros_like(q).index_copy_(0, rows, hvp(q.index_select(0, rows)))
        a = (w * q).sum(1)
        block = basis[:, : j + 1]  # K × (j+1) × P
        for _ in range(2):  # full reorthogonalisation (twice is enough)
            w = w - torch.bmm(torch.bmm(block, w.unsqueeze(2)).transpose(1, 2), block).squeeze(1)
        b = w.norm(dim=1)
        a_list, b_list, going = a.tolist(), b.tolist(), []
        for r in active:
            alphas[r].append(a_list[r])
            scale = max(abs(x) for x in alphas[r])
            if j == steps - 1 or b_list[r] <= 1e-10 * scale:  # row r's Krylov space is invariant: its T is exact
                continue
            betas[r].append(b_list[r])
            going.append(r)
        if len(going) == K:
            basis[:, j + 1] = w / b[:, None]
        elif going:
            rows = torch.tensor(going, device=v.device)
            basis[rows, j + 1] = w.index_select(0, rows) / b.index_select(0, rows)[:, None]
        active = going
        if not active:
            break
    for r in alphas:
        coeff = _krylov_expm(torch.tensor(alphas[r], dtype=torch.float64), torch.tensor(betas[r], dtype=torch.float64),
                             eta).to(v.device, v.dtype)
        out[r] = beta0[r] * (coeff @ basis[r, :len(alphas[r])])
    return out


PROPAGATORS: dict[str, Callable[[Hvp, torch.Tensor, float, int], torch.Tensor]] = {
    "exact": step, "coarse": step, "none": identity, "expm": lanczos_expm,
}
# the same for a stack of K costates (K × P, ``replay.module.ClassReplayModule``): λ − η H λ and λ are row-wise as
# they stand (``step`` itself, which ``dynamics.Adam`` recognises); exp(−η H⁺) λ runs K Lanczos iterations in lockstep
STACKED_PROPAGATORS: dict[str, Callable[[Hvp, torch.Tensor, float, int], torch.Tensor]] = {
    "exact": step, "coarse": step, "none": identity, "expm": lanczos_expm_stack,
}
