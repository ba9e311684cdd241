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

**Propagators** P_t(λ) for ``replay.curvature``:

    exact / coarse   λ − η_t ∇²L(θ_t) λ              (the paper's formula)
    none             λ
    expm             exp(−η_t H⁺) λ by Lanczos: the gradient-flow propagator over the interval,
                     with H's negative Ritz values set to 0; every factor ≤ 1, so ‖P_t(λ)‖ ≤ ‖λ‖
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch
import torch.nn.functional as F

from pmp_lightning.errors import ReplayConfigError

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


def objective(name: str, **params) -> ObjectiveFn:
    """The registered objective ``name`` with its parameters bound (what ``conf/objective/*.yaml`` builds)."""
    if name not in OBJECTIVES:
        raise ReplayConfigError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)} (objective=<name>)")
    fn = OBJECTIVES[name]
    wanted = [p for p in inspect.signature(fn).parameters][2:]
    if sorted(params) != sorted(wanted):
        raise ReplayConfigError(f"objective={name} takes the setting(s) {wanted or 'none'}, got {sorted(params) or 'none'}")
    if "temperature" in params and not (isinstance(params["temperature"], (int, float)) and params["temperature"] > 0):
        raise ReplayConfigError(f"objective.temperature={params['temperature']!r}; give a positive number, e.g. 8")
    bound = functools.partial(fn, **params)
    bound.__name__ = name
    return bound


def describe(fn: ObjectiveFn) -> str:
    """``tempered_ce(temperature=8.0)``: how logs, fingerprints and metrics name an objective."""
    keywords = getattr(fn, "keywords", {})
    args = ", ".join(f"{k}={float(v)!r}" for k, v in sorted(keywords.items()))
    return f"{getattr(fn, '__name__', repr(fn))}({args})" if args else getattr(fn, "__name__", repr(fn))


def logit_weights(fn: ObjectiveFn, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """‖∂l_m/∂z_m‖ per downstream example: how much example m pulls on ∇J through its logits."""
    z = logits.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(fn(z, labels).sum(), z)
    return g.norm(dim=1)


def participation(sum_w: float, sum_w2: float, count: int) -> float:
    """(Σw)² / (M Σw²) ∈ [1/M, 1]: the fraction of the M downstream examples that carry ∇J.

    1 when every example pulls equally (``logit_gap``); about k/M when k examples carry it all.
    """
    return 0.0 if sum_w2 <= 0 else sum_w**2 / (count * sum_w2)


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
    k = len(alphas)
    T = torch.diag(torch.stack(alphas).double())
    if k > 1:
        off = torch.stack(betas[: k - 1]).double()
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    ritz, vecs = torch.linalg.eigh(T)
    coeff = vecs @ (torch.exp(-eta * ritz.clamp(min=0)) * vecs[0])
    coeff = coeff.to(v.dtype)
    return beta0 * sum(c * q for c, q in zip(coeff, basis))


PROPAGATORS: dict[str, Callable[[Hvp, torch.Tensor, float, int], torch.Tensor]] = {
    "exact": step, "coarse": step, "none": identity, "expm": lanczos_expm,
}
