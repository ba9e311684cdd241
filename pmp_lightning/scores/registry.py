"""Scores: small pure functions of the replay statistics, behind a registry.

Convention: a **high** score means the example helps (keep it); the **lowest** scores are the
suspects. Baselines whose natural direction is "large = suspicious" (loss, gradient norm, …) are
negated so that every score reads the same way.

Notation (arrays from ``ReplayStats``, n over the pool): c[t, n] = η_t ⟨λ_{t+1}, ∇l_n(θ_t)⟩ and
g[t, n] = ‖∇l_n(θ_t)‖ for t = 0…T-1, the snapshots the costate scores.

Each baseline follows its published definition. Those that read the model's verdict on an example (loss,
AUM, EL2N, forgetting) use the *trained* snapshots θ_1…θ_T, one after each training interval, the final
model included and the random initialisation θ_0 left out: AUM averages the margin over training epochs
(Pleiss et al. 2020), forgetting events count transitions between those checkpoints (Toneva et al. 2019),
loss and EL2N average over the same snapshots. With one epoch they read the trained model θ_1 = θ_T.
Those built on per-example gradients use the snapshots each step starts from, θ_0…θ_{T−1}, as the PMP
scores do: TracIn's self-influence sums η_t‖∇l_n(θ_t)‖² over the steps, the gradient taken where step t
starts (Pruthi et al. 2020), and GraNd is the gradient norm at and early after initialisation (Paul et al.
2021), here averaged over those snapshots.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from pmp_lightning.errors import UnknownScoreError

if TYPE_CHECKING:  # the registry stays importable without torch, so Hydra composes before the heavy stack loads
    from pmp_lightning.replay.store import ReplayStats

ScoreFn = Callable[["ReplayStats"], np.ndarray]
SCORES: dict[str, ScoreFn] = {}
PMP_VARIANTS: list[str] = []  # the raw score and its normalisations, in registry order
# a corpus run's language-model baselines (scores/text.py), computed beside the registry's from the trained model
CORPUS_BASELINES = ("dsir", "rho_loss", "influence")
SCORER_TARGET = "raw"  # what the data scorer learns (scores/scorer.py): the paper's γ
CLIP_QUANTILE = 0.5  # clipping threshold C_t: this quantile of the step's gradient norms


def register(name: str, pmp: bool = False) -> Callable[[ScoreFn], ScoreFn]:
    def add(fn: ScoreFn) -> ScoreFn:
        SCORES[name] = fn
        if pmp:
            PMP_VARIANTS.append(name)
        return fn

    return add


def compute_scores(names, stats: ReplayStats) -> dict[str, np.ndarray]:
    unknown = [n for n in names if n not in SCORES]
    if unknown:
        raise UnknownScoreError(f"unknown score name(s) {unknown}; valid names: {', '.join(SCORES)}")
    scores = {}
    for name in names:
        s = np.asarray(SCORES[name](stats), dtype=np.float64)
        if not np.isfinite(s).all():
            raise FloatingPointError(f"score {name!r} has {int((~np.isfinite(s)).sum())} non-finite values")
        scores[name] = s
    return scores


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b > 0)


# ----------------------------------------------------------------------------- PMP and its variants
@register("raw", pmp=True)
def raw(s: ReplayStats) -> np.ndarray:
    """The paper's score Σ_t c_{t,n}."""
    return s.contribution.sum(0)


@register("cosine", pmp=True)
def cosine(s: ReplayStats) -> np.ndarray:
    """Direction only: Σ_t cos(ψ_{t+1}, ∇l_n(θ_t)), with ψ = λ unless momentum is replayed exactly."""
    return _safe_div(s.dot, s.direction_norm[:, None] * s.grad_norm).sum(0)


@register("unit_grad", pmp=True)
def unit_grad(s: ReplayStats) -> np.ndarray:
    """Σ_t η_t ⟨λ_{t+1}, ∇l_n/‖∇l_n‖⟩: unit gradients, keeping the time weighting of λ."""
    return _safe_div(s.contribution, s.grad_norm).sum(0)


@register("clip", pmp=True)
def clip(s: ReplayStats) -> np.ndarray:
    """Σ_t c_{t,n} · min(1, C_t / g_{t,n}), C_t the per-step median gradient norm."""
    g = s.grad_norm
    c_t = np.quantile(g, CLIP_QUANTILE, axis=1, keepdims=True)
    return (s.contribution * np.minimum(1.0, _safe_div(np.broadcast_to(c_t, g.shape), g))).sum(0)


@register("zscore", pmp=True)
def zscore(s: ReplayStats) -> np.ndarray:
    """Σ_t of c_{t,·} standardised across examples at each step."""
    c = s.contribution
    return _safe_div(c - c.mean(1, keepdims=True), c.std(1, keepdims=True)).sum(0)


@register("rank", pmp=True)
def rank(s: ReplayStats) -> np.ndarray:
    """Σ_t of the per-step rank of c_{t,n} (0 = lowest)."""
    return s.contribution.argsort(1).argsort(1).sum(0).astype(np.float64)


@register("relative", pmp=True)
def relative(s: ReplayStats) -> np.ndarray:
    """Relative influence: s_n / sqrt(Σ_t η_t g²_{t,n})."""
    return _safe_div(raw(s), np.sqrt((s.eta[:, None] * s.grad_norm**2).sum(0)))


@register("early", pmp=True)
def early(s: ReplayStats) -> np.ndarray:
    """The raw score over the first half of the snapshots, before the network memorises the noise."""
    return s.contribution[: max(1, len(s.eta) // 2)].sum(0)


def _block_cosines(s: ReplayStats, blocks: slice = slice(None)) -> np.ndarray:
    """cos(ψ_{t+1}, ∇l_n(θ_t)) within each block b of ``blocks``: T × N × B."""
    return _safe_div(s.block_dot[:, :, blocks], s.block_direction_norm[:, None, blocks] * np.sqrt(s.block_sq[:, :, blocks]))


@register("block_cosine", pmp=True)
def block_cosine(s: ReplayStats) -> np.ndarray:
    """Σ_t of the mean over the network's blocks of the cosine within each block: every block has one vote, so a
    block whose raw gradients are large for reasons unrelated to the label (a ResNet's stem, a ViT's patch
    embedding) cannot speak for all."""
    return _block_cosines(s).mean(2).sum(0)


@register("late_cosine", pmp=True)
def late_cosine(s: ReplayStats) -> np.ndarray:
    """Σ_t of the cosine over the later half of the blocks (the last ⌈B/2⌉, the head among them; never the head
    alone, whose gradient sees only the last features)."""
    late = slice(len(s.blocks) // 2, None)
    dot = s.block_dot[:, :, late].sum(2)
    norm = np.sqrt(s.block_sq[:, :, late].sum(2))
    return _safe_div(dot, np.sqrt((s.block_direction_norm[:, late] ** 2).sum(1))[:, None] * norm).sum(0)


@register("late_fisher", pmp=True)
def late_fisher(s: ReplayStats) -> np.ndarray:
    """``late_cosine`` in the metric that divides each block by F_{t,b}, the scored examples' mean squared gradient
    norm in block b at θ_t (the trace of the block's empirical Fisher over its examples): Σ_t ⟨ψ, ∇l_n⟩_F /
    (‖ψ‖_F ‖∇l_n‖_F) over the later half of the blocks. A block-scalar stand-in for a Fisher or Adam preconditioner:
    a block whose gradients are large for every example, not for this one, gets no more say than the others."""
    late = slice(len(s.blocks) // 2, None)
    fisher = s.block_sq[:, :, late].mean(1, keepdims=True)  # T × 1 × B
    dot = _safe_div(s.block_dot[:, :, late], fisher).sum(2)
    norm = np.sqrt(_safe_div(s.block_sq[:, :, late], fisher).sum(2))
    direction = np.sqrt(_safe_div(s.block_direction_norm[:, None, late] ** 2, fisher).sum(2))
    return _safe_div(dot, direction * norm).sum(0)


# the variants the canaries choose among (scoring.canaries, the score ``auto``): where in the network the cosine is
# taken, and in which metric; the cosine first, so that it wins a tie. On a network of one block they coincide.
AUTO_FAMILY = ("cosine", "block_cosine", "late_cosine", "late_fisher")

# ``scoring.by_class``: each example scored against the costate of its own observed label's class, λ^{(y_n)}, the
# costate of J restricted to the downstream examples labelled y_n (one replay per class, ``pipeline.replay_stage``),
# after the class-based influence functions of Nguyen-Duc et al. (ACL 2023), who found influence between examples of
# different classes unreliable in deep networks. Each is a variant above, taken within the class's replay (in
# ``class_late_fisher`` the Fisher scale is the class's scored examples'); the canaries choose among them too.
CLASS_VARIANTS = {"class_cosine": "cosine", "class_late_cosine": "late_cosine", "class_late_fisher": "late_fisher"}


def pmp_names(names) -> list[str]:
    """Those of ``names`` that are PMP variants, whole-J, per class or fitted on the canaries, in ``names``' order: what
    ``auto`` chooses among (``policy``) and what decides whether a run has a choice to make (``config``)."""
    return [name for name in names if name in PMP_VARIANTS or name in CLASS_VARIANTS or name in FITTED_VARIANTS]


# ``block_fit``: with canaries (``scoring.canaries``), the blocks' cosines weighted by how well each tells the canaries
# from their controls, after Li et al. (2025), "Learning to Weight Parameters for Training Data Attribution", who fit
# per-group weights of the gradient inner product. Features: each block's cosine summed over the snapshots (the terms
# ``block_cosine`` averages with one vote each); weights: a logistic regression of canary against control on the
# standardised features, L2 penalty ``FIT_L2``, weights ≥ 0 (a block can only vote, never against its cosine). The
# pool is scored with the weights fitted on every canary and control; each canary and control with those of the
# ``FIT_FOLDS`` − 1 folds it is not in, so that its AP on the canaries is out of fold, comparable with the fixed
# variants'. A function of the statistics *and* the canaries, so the run computes it where it has canaries
# (``pipeline.score_stage``), not from the registry.
FITTED_VARIANTS = ("block_fit",)
FIT_L2 = 1.0
FIT_FOLDS = 5


def block_fit(s: ReplayStats, is_canary: np.ndarray) -> np.ndarray:
    """The score ``block_fit`` of every scored example: the pool first, then the ``len(is_canary)`` canaries and
    controls (``is_canary`` marks the canaries among them), these out of fold (seeded folds). Each is scored by the
    weights alone, the pool's by those fitted on every canary and control, each fold's by its own fit: the version the
    fourth suite validated. The folds' scores so carry offsets of their own (no fold's centre or intercept); scoring
    each fold by its full decision function instead was measured on three sets of runs and was not better
    (docs/design-notes.md, "Blocks weighted on the canaries"). Zero for every example where the canaries and
    controls are not both there to fit on."""
    features = _block_cosines(s).sum(0)  # N × B
    is_canary = np.asarray(is_canary, dtype=bool)
    m = len(is_canary)
    scores = np.zeros(len(features))
    if not (is_canary.any() and (~is_canary).any()):
        return scores
    pool, marked = features[:-m], features[-m:]
    scores[:-m] = pool @ _block_weights(marked, is_canary)[0]
    folds = canary_folds(m)
    for k in range(FIT_FOLDS):
        held = folds == k
        scores[len(pool) + np.flatnonzero(held)] = marked[held] @ _block_weights(marked[~held], is_canary[~held])[0]
    return scores


def canary_folds(m: int) -> np.ndarray:
    """The fold (0 … ``FIT_FOLDS`` − 1) of each of ``m`` canaries and controls, seeded, the same for any labels."""
    return np.random.default_rng(0).permutation(m) % FIT_FOLDS


def _block_weights(features: np.ndarray, is_canary: np.ndarray) -> tuple[np.ndarray, float]:
    """A logistic regression of canary (a *low* score) against control on the standardised ``features``, weights ≥ 0,
    an unpenalised intercept, L2 penalty ``FIT_L2``: the blocks' weights on the unstandardised features and the
    offset that makes ``features @ weights - offset`` its decision function. A class missing from ``features``
    gives weights 0."""
    from scipy.optimize import minimize

    centre, spread = features.mean(0), features.std(0)
    z = _safe_div(features - centre, spread)
    y = is_canary.astype(float)

    def loss(params):
        w, b = params[:-1], params[-1]
        logit = b - z @ w  # a low score is a canary
        p = 1 / (1 + np.exp(-logit))
        value = np.sum(np.logaddexp(0, logit) - y * logit) + FIT_L2 * w @ w / 2
        return value, np.append(-z.T @ (p - y) + FIT_L2 * w, np.sum(p - y))

    start = np.append(np.full(z.shape[1], 1.0 / z.shape[1]), 0.0)
    bounds = [(0, None)] * z.shape[1] + [(None, None)]
    w, b = np.split(minimize(loss, start, jac=True, method="L-BFGS-B", bounds=bounds).x, [-1])
    weights = _safe_div(w, spread)
    return weights, float(centre @ weights + b[0])


def class_scores(by_class: dict[int, ReplayStats], labels: np.ndarray) -> dict[str, np.ndarray]:
    """The class variants of every scored example (``labels``: the observed ones), from the replay of its class
    (``by_class[k]`` scored exactly the examples labelled k, in their order)."""
    scores = {name: np.full(len(labels), np.nan) for name in CLASS_VARIANTS}
    for k, stats in by_class.items():
        for name, within in CLASS_VARIANTS.items():
            scores[name][labels == k] = SCORES[within](stats)
    return scores


# ----------------------------------------------------------------------------- baselines
@register("loss")
def loss(s: ReplayStats) -> np.ndarray:
    """Mean training loss over the trained snapshots θ_1..θ_T (negated)."""
    return -s.trained("loss").mean(0)


@register("aum")
def aum(s: ReplayStats) -> np.ndarray:
    """Area under the margin (Pleiss et al. 2020): the margin of the observed label averaged over θ_1..θ_T."""
    return s.trained("margin").mean(0)


@register("grand")
def grand(s: ReplayStats) -> np.ndarray:
    """GraNd (Paul et al. 2021): mean gradient norm over θ_0..θ_{T-1} (negated)."""
    return -s.grad_norm.mean(0)


@register("el2n")
def el2n(s: ReplayStats) -> np.ndarray:
    """EL2N (Paul et al. 2021): mean ‖softmax − onehot‖ over θ_1..θ_T (negated)."""
    return -s.trained("el2n").mean(0)


@register("tracin_self")
def tracin_self(s: ReplayStats) -> np.ndarray:
    """TracIn self-influence (Pruthi et al. 2020): Σ_t η_t ‖∇l_n(θ_t)‖² over the steps θ_0..θ_{T-1} (negated)."""
    return -(s.eta[:, None] * s.grad_norm**2).sum(0)


@register("forgetting")
def forgetting(s: ReplayStats) -> np.ndarray:
    """Forgetting events (Toneva et al. 2019) between the trained snapshots θ_1..θ_T, never-learned examples counted
    as T (negated)."""
    correct = s.trained("correct") > 0.5
    events = (correct[:-1] & ~correct[1:]).sum(0)
    never = ~correct.any(0)
    return -np.where(never, len(correct), events).astype(np.float64)


@register("random")
def random(s: ReplayStats) -> np.ndarray:
    """Uniform random scores (seed 0): the chance level."""
    return np.random.default_rng(0).random(s.dot.shape[1])
