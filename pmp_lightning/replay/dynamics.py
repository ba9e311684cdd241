"""The optimizer that ran, as the replay models it: one small class per optimizer, behind a registry keyed by the
optimizer's type name (the ``name`` a snapshot manifest records, ``trajectory``).

Each class says, for the recursion of ``replay/module.py``:

- ``step_sizes``: η_t of each interval as the scores use it (c_{t,n} = η_t ⟨ψ_{t+1}, ∇l_n(θ_t)⟩);
- ``propagate``: λ_{t+1} carried back over interval t (before a_t ∇J(θ_t) is added);
- ``direction``: ψ_t, the vector the statistics pass dots the per-example gradients of step t − 1 with;
- ``describe``: the one line the log and metrics.json name it by.

Adding an optimizer is one class here (``@register("Name")``, an ``accepts`` that says which of that optimizer's
settings it models) and one yaml in ``conf/optimizer``. An optimizer no class accepts is replayed as plain gradient
descent, and the replay says so (``modelled_dynamics``). Adam's preconditioner is what ``ThetaSnapshot`` records
beside each snapshot (``trajectory.adam_preconditioner``); the others need only θ and the learning rates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
import torch

from pmp_lightning.replay.costate import Hvp, step

DYNAMICS: dict[str, list[type["Dynamics"]]] = {}  # optimizer type name -> the classes that may model it, in order


UNREACHED = 1e-3  # √v̂ ≤ UNREACHED · ε: a coordinate that no training gradient has reached (Adam.reach)


def register(*names: str) -> Callable[[type["Dynamics"]], type["Dynamics"]]:
    def add(cls: type["Dynamics"]) -> type["Dynamics"]:
        for name in names:
            DYNAMICS.setdefault(name, []).append(cls)
        return cls

    return add


@dataclass(frozen=True)
class Dynamics:
    """Plain gradient descent with coupled weight decay w (θ ← θ − η (∇L + wθ)): every propagator sees H̃ = ∇²L + wI,
    and ψ = λ. The base of the others, and what an optimizer no class models is replayed as."""

    weight_decay: float = 0.0
    preconditioned: ClassVar[bool] = False  # whether the replay reads a preconditioner kept with each snapshot
    heavy_ball: ClassVar[bool] = False  # whether the direction carries the momentum costate (a snapshot per step)
    needs_moments: ClassVar[bool] = False  # whether the replay reads Adam's m and v kept with each snapshot

    @classmethod
    def accepts(cls, optimizer: dict) -> bool:
        return True

    @classmethod
    def build(cls, optimizer: dict, one_step_per_snapshot: bool, curvature: str, recorded: set[str]) -> "Dynamics":
        """The dynamics for an optimizer ``accepts`` took; ``recorded``: what every snapshot after θ_0 keeps besides
        θ (e.g. ``preconditioner``, ``moments``)."""
        return cls(weight_decay=float(optimizer.get("weight_decay", 0.0)))

    def describe(self, optimizer: dict) -> str:
        return f"{optimizer.get('name', 'no optimizer')}: gradient descent with the recorded learning rates, {self._decay()}"

    def _decay(self, decoupled: bool = False) -> str:
        if not self.weight_decay:
            return "no weight decay"
        return f"{'decoupled ' if decoupled else ''}weight decay {self.weight_decay:g}"

    def step_sizes(self, lr_sums: np.ndarray) -> np.ndarray:
        return lr_sums

    def curvature(self, hvp: Hvp) -> Hvp:
        """H̃ = ∇²L + wI: weight decay in the gradient adds w to the curvature."""
        return hvp if not self.weight_decay else (lambda v: hvp(v) + self.weight_decay * v)

    def propagate(self, propagator, hvp: Hvp, lam: torch.Tensor, direction: torch.Tensor, eta: float, steps: int,
                  precond: torch.Tensor | None = None) -> torch.Tensor:
        return propagator(self.curvature(hvp), lam, eta, steps)

    def direction(self, lam: torch.Tensor, previous: torch.Tensor | None, eta: float, eta_before: float,
                  precond: torch.Tensor | None = None, later: torch.Tensor | None = None, moments=None,
                  carry: dict | None = None) -> torch.Tensor:
        """ψ_t from λ_t (``lam``), ψ_{t+1} (``previous``, None at θ_T), λ_{t+1} (``later``), η_t (``eta``) and
        η_{t−1} (``eta_before``); Adam's exact adjoint also reads the moments around snapshot t and keeps the costates
        of m and v in ``carry`` (the replay saves it with λ and ψ)."""
        return lam

    def reach(self, precond: torch.Tensor | None = None, moments=None) -> torch.Tensor | None:
        """Where the scores may read ψ_s (a flat bool mask; None: everywhere), from the state kept with snapshot s:
        its preconditioner (``precond``) or Adam's moments (``moments``, as ``direction`` takes them)."""
        return None


@register("SGD")
@dataclass(frozen=True)
class SGD(Dynamics):
    """PyTorch's SGD with heavy-ball momentum β (dampening 0, not Nesterov) and coupled weight decay w:
    v ← βv + ∇L + wθ, θ ← θ − η v. Momentum is modelled two ways:

    - ``heavy_ball`` (a snapshot per step, curvature exact or coarse): the exact adjoint of the pair (θ, v). With the
      momentum costate μ folded into the direction ψ_{t+1} = λ_{t+1} − μ_{t+1}/η_t that scores step t,
      c_{t,n} = η_t ⟨ψ_{t+1}, ∇l_n(θ_t)⟩, and the recursion runs as
      λ_t = a_t ∇J(θ_t) + λ_{t+1} − η_t H̃_t ψ_{t+1},   ψ_t = λ_t + β (η_t / η_{t−1}) ψ_{t+1},   ψ_T = λ_T.
    - otherwise (several steps per snapshot, or curvature expm / none): the buffer is taken at its steady state within
      each interval, so the interval acts as gradient descent with the effective step η_t / (1 − β) and ψ = λ.

    With β = 0 both are the plain recursion (ψ = λ)."""

    momentum: float = 0.0
    exact_momentum: bool = False

    @property
    def heavy_ball(self) -> bool:  # type: ignore[override]
        return self.exact_momentum

    @classmethod
    def accepts(cls, optimizer: dict) -> bool:
        return not optimizer.get("nesterov") and not optimizer.get("dampening", 0)

    @classmethod
    def build(cls, optimizer: dict, one_step_per_snapshot: bool, curvature: str, recorded: set[str]) -> "SGD":
        momentum = float(optimizer.get("momentum", 0.0))
        return cls(float(optimizer.get("weight_decay", 0.0)), momentum,
                   momentum > 0 and one_step_per_snapshot and curvature in ("exact", "coarse"))

    def describe(self, optimizer: dict) -> str:
        name = optimizer.get("name", "SGD")
        if self.heavy_ball:
            return f"{name}: heavy-ball momentum {self.momentum:g} replayed exactly, step by step, {self._decay()}"
        if self.momentum:
            return (f"{name}: momentum {self.momentum:g} at its steady state within each interval (step η/(1−β)), "
                    f"{self._decay()}")
        return super().describe(optimizer)

    def step_sizes(self, lr_sums: np.ndarray) -> np.ndarray:
        """The summed learning rate, over (1 − β) at the steady state."""
        return lr_sums if self.heavy_ball else lr_sums / (1.0 - self.momentum)

    def propagate(self, propagator, hvp, lam, direction, eta, steps, precond=None):
        if self.heavy_ball:
            return lam - eta * self.curvature(hvp)(direction)
        return super().propagate(propagator, hvp, lam, direction, eta, steps)

    def direction(self, lam, previous, eta, eta_before, precond=None, later=None, moments=None, carry=None):
        if not self.heavy_ball or previous is None:
            return lam
        return lam + (self.momentum * eta / eta_before) * previous


@register("SGD")
@dataclass(frozen=True)
class NesterovSGD(SGD):
    """PyTorch's SGD with Nesterov momentum (dampening 0): v ← βv + g, θ ← θ − η (g + βv), g = ∇L + wθ.

    A snapshot per step (curvature exact or coarse): the adjoint of (θ, v). With λ, μ the costates of θ and v,
    ∂θ_{t+1}/∂θ_t = I − η(1+β)H̃, ∂θ_{t+1}/∂v_t = −ηβ²I, ∂v_{t+1}/∂θ_t = H̃, ∂v_{t+1}/∂v_t = βI, and an example's
    weight enters θ_{t+1} as −η(1+β)∇l_n and v_{t+1} as ∇l_n. So with ψ_{t+1} = (1+β)λ_{t+1} − μ_{t+1}/η_t,
    c_{t,n} = η_t ⟨ψ_{t+1}, ∇l_n(θ_t)⟩ as for the heavy ball, the recursion is the heavy ball's
    λ_t = a_t ∇J(θ_t) + λ_{t+1} − η_t H̃_t ψ_{t+1}, and μ_t = βη_t (λ_{t+1} − ψ_{t+1}) gives
    ψ_t = (1+β) λ_t − β (η_t / η_{t−1}) (λ_{t+1} − ψ_{t+1}),   ψ_T = (1+β) λ_T.
    Otherwise the buffer's steady state v = g/(1−β) makes the step η g/(1−β), as for the heavy ball."""

    @classmethod
    def accepts(cls, optimizer: dict) -> bool:
        return bool(optimizer.get("nesterov")) and not optimizer.get("dampening", 0)

    def describe(self, optimizer: dict) -> str:
        name = optimizer.get("name", "SGD")
        if self.heavy_ball:
            return f"{name}: Nesterov momentum {self.momentum:g} replayed exactly, step by step, {self._decay()}"
        return (f"{name}: Nesterov momentum {self.momentum:g} at its steady state within each interval (step η/(1−β)), "
                f"{self._decay()}")

    def direction(self, lam, previous, eta, eta_before, precond=None, later=None, moments=None, carry=None):
        if not self.heavy_ball:
            return lam
        if previous is None:
            return (1.0 + self.momentum) * lam
        return (1.0 + self.momentum) * lam - (self.momentum * eta / eta_before) * (later - previous)


@register("Adam", "AdamW")
@dataclass(frozen=True)
class Adam(Dynamics):
    """Adam and AdamW: the update is −η P m̂ with P = diag(1/(√v̂ + ε)). P is held fixed over each interval (the one
    the optimizer's state shows at the interval's end; its dependence on θ is dropped, an approximation) and the first
    moment m̂ at its steady state (≈ the gradient, with no 1/(1 − β₁) factor: Adam's m is an average, not a sum). So
    the interval acts as preconditioned gradient descent: the control of example n is P ∇l_n,
    c_{t,n} = η_t ⟨P_t λ_{t+1}, ∇l_n(θ_t)⟩ (ψ = P λ), and the propagator is built from H P, symmetrised as
    P^{−1/2} f(P^{1/2} H̃ P^{1/2} + w_d I) P^{1/2}; ``step`` is λ − η (H̃ P λ + w_d λ). Adam's weight decay is in the
    gradient (H̃ = H + wI); AdamW's is decoupled, θ ← (1 − ηw) θ each step, so it joins as w_d = w outside P."""

    decoupled: bool = False
    eps: float = 1e-8
    preconditioned: ClassVar[bool] = True

    @classmethod
    def build(cls, optimizer: dict, one_step_per_snapshot: bool, curvature: str, recorded: set[str]) -> "Adam":
        decay, decoupled = float(optimizer.get("weight_decay", 0.0)), (optimizer["name"] == "AdamW"
                                                                        or bool(optimizer.get("decoupled_weight_decay")))
        if "moments" in recorded:
            beta1, beta2 = optimizer["betas"]
            exact = one_step_per_snapshot and curvature in ("exact", "coarse")
            return (ExactAdam if exact else FoldedAdam)(decay, decoupled, float(optimizer["eps"]), float(beta1),
                                                        float(beta2))
        return cls(decay, decoupled, float(optimizer.get("eps", 1e-8)))

    def describe(self, optimizer: dict) -> str:
        return (f"{optimizer.get('name', 'Adam')}: preconditioner 1/(√v̂+ε) held over each interval between snapshots, "
                f"first moment at its steady state, {self._decay(self.decoupled)}")

    def curvature(self, hvp: Hvp) -> Hvp:
        return hvp if self.decoupled else super().curvature(hvp)

    def propagate(self, propagator, hvp, lam, direction, eta, steps, precond=None):
        """Through the interval's preconditioner ``precond`` (flat, like λ)."""
        curvature, decoupled = self.curvature(hvp), self.weight_decay if self.decoupled else 0.0
        if propagator is step:  # directly: no square root, exact where P is 0 (a parameter that never moved)
            return lam - eta * (curvature(precond * lam) + decoupled * lam)
        floor = precond[precond > 0].min() if (precond > 0).any() else precond.new_tensor(1.0)
        root = precond.clamp_min(floor).sqrt()  # a parameter that never moved: the smallest step any other made
        return propagator(lambda v: root * curvature(root * v) + decoupled * v, root * lam, eta, steps) / root

    def direction(self, lam, previous, eta, eta_before, precond=None, later=None, moments=None, carry=None):
        """P_{t−1} λ_t."""
        return precond * lam

    def reach(self, precond=None, moments=None):
        """Where √v̂ is more than ε/1000: a coordinate below it is one that no training gradient has reached (v̂ = 0
        up to rounding; a byte or token that no training document holds), where P = 1/ε. Adam's derivative there is
        1/ε-sized while its step to any finite gradient is bounded (about η), and no pool example of the training set
        has a gradient there: left in, those entries hold most of ‖ψ‖ and every cosine collapses
        (docs/design-notes.md, "Where no gradient reached")."""
        return precond * self.eps < 1.0 / (1.0 + UNREACHED)


@dataclass(frozen=True)
class ExactAdam(Adam):
    """Adam and AdamW with a snapshot after every step: the exact adjoint of the whole state (θ, m, v), bias
    correction, ε and weight decay included (docs/design-notes.md, "PMP through Adam, exactly"). With λ', a', b' the
    costates of θ_{t+1}, m_{t+1}, v_{t+1} and step k's u = c1 m'/D, D = √(c2 v') + ε:
    ū = −η λ', m̄ = a' + ū c1/D, v̄ = b' + ū ∂u/∂v', ḡ = (1−β1) m̄ + 2(1−β2) g ⊙ v̄; then a = β1 m̄, b = β2 v̄,
    λ_t = a_t ∇J(θ_t) + (1 − η w_d) λ' + (H + w_c I) ḡ, and the direction that scores step t is ψ_{t+1} = −ḡ_t/η_t.
    g_t is read off the moments kept with the snapshots, (m_{t+1} − β1 m_t)/(1 − β1). A row that has not yet received
    a gradient (v' = 0, m' = 0) has ∂u/∂v' = 0: its response is bounded, unlike the frozen P's 1/ε."""

    beta1: float = 0.9
    beta2: float = 0.999
    preconditioned: ClassVar[bool] = False
    needs_moments: ClassVar[bool] = True

    @property
    def heavy_ball(self) -> bool:  # type: ignore[override]
        return True  # the direction carries the costates of m and v; the rates must be positive

    def describe(self, optimizer: dict) -> str:
        return (f"{optimizer.get('name', 'Adam')}: the exact adjoint of (θ, m, v), step by step (β1 {self.beta1:g}, "
                f"β2 {self.beta2:g}, ε {self.eps:g}), {self._decay(self.decoupled)}")

    def propagate(self, propagator, hvp, lam, direction, eta, steps, precond=None):
        """(1 − η w_d) λ' + (H + w_c I) ḡ with ḡ = −η ψ."""
        shrink = 1.0 - eta * (self.weight_decay if self.decoupled else 0.0)
        return shrink * lam - eta * self.curvature(hvp)(direction)

    def direction(self, lam, previous, eta, eta_before, precond=None, later=None, moments=None, carry=None):
        """ψ_t = −Σ_j ḡ_j/η_{t−1} over interval t − 1's S steps (one with a snapshot per step) from λ_t and the
        costates of m_t, v_t (``carry``, zero at θ_T), which it moves back to m_{t−1}, v_{t−1}; ``moments``:
        (m_{t−1}, m_t, v_t, k, S), k the step count at snapshot t. Over several steps the state is held at the
        interval's end (``FoldedAdam``)."""
        m_before, m, v, k, steps = moments
        a, b = carry.get("a", torch.zeros_like(lam)), carry.get("b", torch.zeros_like(lam))
        g = (m - self.beta1 ** steps * m_before) / (1.0 - self.beta1 ** steps)
        u_bar, g_bar = -(eta_before / steps) * lam, torch.zeros_like(lam)
        for j in range(steps):  # step k − j, backward from the interval's end
            c1, c2 = 1.0 / (1.0 - self.beta1 ** (k - j)), 1.0 / (1.0 - self.beta2 ** (k - j))
            root = (c2 * v).sqrt()
            denom = root + self.eps
            m_bar = a + u_bar * c1 / denom
            du_dv = torch.where(v > 0, -c1 * c2 * m / (2 * denom**2 * root.clamp_min(torch.finfo(v.dtype).tiny)),
                                torch.zeros_like(v))
            v_bar = b + u_bar * du_dv
            g_bar += (1.0 - self.beta1) * m_bar + 2.0 * (1.0 - self.beta2) * g * v_bar
            a, b = self.beta1 * m_bar, self.beta2 * v_bar
        carry["a"], carry["b"] = a, b
        return -g_bar / eta_before

    def reach(self, precond=None, moments=None):
        """Where √v̂_s is more than ε/1000 (``Adam.reach``), from the v kept with snapshot s."""
        _, _, v, k, _ = moments
        return (v / (1.0 - self.beta2 ** k)).sqrt() > UNREACHED * self.eps


@dataclass(frozen=True)
class FoldedAdam(ExactAdam):
    """Adam and AdamW with several steps between snapshots (a snapshot per epoch), m and v kept with each: the exact
    adjoint of (θ, m, v) (``ExactAdam``) run through each interval's S steps with the state held at the interval's end
    (docs/design-notes.md, "The per-epoch replay from the exact recursion"). Each step j of the interval (backward
    from its end) has λ_{t+1} for its λ', step size η/S, the bias corrections of its own step count, m_{t+1} and
    v_{t+1} for its m' and v', and the interval's mean gradient g = (m_{t+1} − β1^S m_t)/(1 − β1^S) for its batch
    gradient; ψ_{t+1} = −Σ_j ḡ_j/η, and the costates of m and v leave the interval as ExactAdam's do. λ is carried
    back as the frozen-P replay carries it (``Adam.propagate``). With S = 1 the direction is ExactAdam's (tested).

    What the frozen P leaves out and this keeps: an example's gradient enters v, and Adam's step is invariant to the
    scale of its gradient. Where the gradient is steady (m̂² ≈ v̂) the v-term cancels most of P λ; where it is noise
    (m̂² ≪ v̂) P λ stands."""

    preconditioned: ClassVar[bool] = True  # λ is carried back through P (Adam.propagate), and P marks the reach
    propagate = Adam.propagate
    reach = Adam.reach

    def describe(self, optimizer: dict) -> str:
        return (f"{optimizer.get('name', 'Adam')}: the exact adjoint of (θ, m, v) folded over each interval between "
                f"snapshots, the state held at its end (β1 {self.beta1:g}, β2 {self.beta2:g}, ε {self.eps:g}), "
                f"{self._decay(self.decoupled)}")


def modelled_dynamics(manifest: dict, curvature: str) -> tuple[Dynamics | None, str]:
    """The dynamics the replay models for the trajectory a snapshot ``manifest`` describes (None: an optimizer no class
    models, replayed as plain gradient descent), and the line that names them (the log's and metrics.json's)."""
    snaps, optimizer = manifest["snapshots"], manifest["optimizer"]
    one_step = all(len(s["lrs"]) == 1 for s in snaps[1:])
    model = next((cls for cls in DYNAMICS.get(optimizer.get("name"), []) if cls.accepts(optimizer)), None)
    if model is None:
        settings = ", ".join(f"{k} {v}" for k, v in optimizer.items() if k != "name")
        return None, (f"{optimizer.get('name')} ({settings}) is not modelled: replayed as plain gradient descent with "
                      f"the recorded learning rates")
    recorded = set.intersection(*(set(s) for s in snaps[1:])) if len(snaps) > 1 else set()
    dynamics = model.build(optimizer, one_step, curvature, recorded)
    return dynamics, dynamics.describe(optimizer)
