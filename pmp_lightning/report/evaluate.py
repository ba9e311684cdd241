"""Detection metrics: how well a score finds the mislabeled examples (low score = suspect)."""
from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from pmp_lightning.scores.registry import AUTO_FAMILY, CLASS_VARIANTS

METRICS = ("auroc", "ap", "precision_at_k", "recall_at_10pct", "hits_in_lowest_1pct")
MIN_PER_CLASS = 10  # fewer mislabeled (or clean) examples than this make AUROC and AP noise


def small_sample_caveat(is_mislabeled: np.ndarray) -> str | None:
    """A warning when the pool has too few mislabeled or clean examples for the detection metrics to mean much."""
    positives = int(np.sum(is_mislabeled))
    negatives = len(is_mislabeled) - positives
    if min(positives, negatives) >= MIN_PER_CLASS:
        return None
    return (f"the pool has {positives} mislabeled and {negatives} clean examples; with fewer than {MIN_PER_CLASS} of "
            f"either, AUROC and AP swing between 0 and 1 by chance: raise data.pool_size or noise.rate")


def detection_metrics(score: np.ndarray, is_mislabeled: np.ndarray) -> dict[str, float]:
    """AUROC, average precision, precision@k (k = number mislabeled, so it is recall@k too), recall when the
    lowest 10% are flagged, and how many mislabeled examples sit among the lowest-scored ⌈1%⌉ (a count)."""
    mask = np.asarray(is_mislabeled, dtype=bool)
    k = int(mask.sum())
    if k == 0 or k == len(mask):
        raise ValueError("detection metrics need both clean and mislabeled examples in the pool (noise=none has none)")
    suspicion = -np.asarray(score, dtype=np.float64)
    order = np.argsort(score, kind="stable")  # most suspect first
    flagged = math.ceil(0.1 * len(mask))
    return {
        "auroc": float(roc_auc_score(mask, suspicion)),
        "ap": float(average_precision_score(mask, suspicion)),
        "precision_at_k": float(mask[order[:k]].mean()),
        "recall_at_10pct": float(mask[order[:flagged]].sum() / k),
        "hits_in_lowest_1pct": int(mask[order[: math.ceil(0.01 * len(mask))]].sum()),
    }


def auroc_by_kind(scores: dict[str, np.ndarray], kinds: list[str]) -> dict[str, dict[str, float]]:
    """For each kind of corruption, each score's AUROC of the documents corrupted that way against the clean ones
    (kind ''): which score finds which kind, free of how many there are of each."""
    kinds = np.asarray(kinds, dtype=str)
    clean = kinds == ""
    out = {}
    for kind in sorted(set(kinds.tolist()) - {""}):
        keep = clean | (kinds == kind)
        out[kind] = {name: float(roc_auc_score(kinds[keep] == kind, -s[keep])) for name, s in scores.items()}
    return out


# an alternative replaces the recommended variant only if it ranks the canaries better in this share of resamples
CANARY_CONFIDENCE = 0.95
CANARY_RESAMPLES = 1000


def canary_choice(scores: dict[str, np.ndarray], is_canary: np.ndarray, confidence: float = CANARY_CONFIDENCE,
                  resamples: int = CANARY_RESAMPLES) -> dict:
    """The variant that ranks the canaries (examples given a wrong label on purpose) lowest among them and the
    controls (as many with their own label), by average precision; only the run's downstream set decides, the pool's
    labels play no part. The first of ``scores`` (the recommended cosine) stays unless another beats its AP in at least
    ``confidence`` of the bootstrap resamples of canaries and controls (each resampled with replacement, the same
    resample for every variant): a difference that 2k examples cannot tell from chance does not move the choice. Of
    those that pass, the best AP on the whole set wins (the earlier on a tie)."""
    is_canary = np.asarray(is_canary, dtype=bool)
    ap = {name: float(average_precision_score(is_canary, -s)) for name, s in scores.items()}
    first, *others = scores
    rng = np.random.default_rng(0)
    canaries, controls = np.flatnonzero(is_canary), np.flatnonzero(~is_canary)
    wins = dict.fromkeys(others, 0)
    for _ in range(resamples if others else 0):
        idx = np.concatenate([rng.choice(canaries, len(canaries)), rng.choice(controls, len(controls))])
        base = average_precision_score(is_canary[idx], -scores[first][idx])
        for name in others:
            wins[name] += average_precision_score(is_canary[idx], -scores[name][idx]) > base
    beats = {name: wins[name] / resamples for name in others}
    return {"canaries": int(is_canary.sum()), "controls": int((~is_canary).sum()), "ap": ap,
            f"beats_{first}": beats, "chosen": _pick(others, first, ap, beats, confidence)}


def _pick(names, first: str, ap: dict[str, float], beats: dict[str, float], confidence: float) -> str:
    """Of ``names``, those that beat ``first`` in at least ``confidence`` of the resamples; the best AP of them wins
    (the earlier on a tie), else ``first``."""
    passed = [name for name in names if beats[name] >= confidence]
    return max(passed, key=lambda name: ap[name]) if passed else first


def auto_choice(candidates: dict[str, np.ndarray], is_canary: np.ndarray) -> dict:
    """The canaries' choice (``canary_choice``) over ``candidates``, the family ``AUTO_FAMILY`` and the class variants,
    in that order. Where it is a class variant, also ``hedged_with``: the whole-J variant the canaries choose among
    those alone, which the score ``auto`` ranks together with it (``registry.hedge``). Random wrong labels are the
    class variants' easiest case (a random image far from its label's class) and need not be the pool's errors: a
    wrong label the model learned as a systematic confusion sits close to its label's class, where only the costate
    of every class sees the harm it does to the class it came from (docs/design-notes.md, "The hedge")."""
    choice = canary_choice(candidates, is_canary)
    first, *others = candidates  # the whole-J variants come first: among them alone, the same resamples decide
    whole = [name for name in others if name in AUTO_FAMILY]
    if choice["chosen"] in CLASS_VARIANTS and first in AUTO_FAMILY:
        choice["hedged_with"] = _pick(whole, first, choice["ap"], choice[f"beats_{first}"], CANARY_CONFIDENCE)
    return choice


def contribution_auroc(contribution: np.ndarray, is_mislabeled: np.ndarray) -> list[float]:
    """Detection AUROC of each snapshot's contribution c_t alone (low = suspect): when the signal lives."""
    return [float(roc_auc_score(is_mislabeled, -c)) for c in contribution]


def format_table(detection: dict[str, dict[str, float]]) -> str:
    """The detection table as aligned text, best average precision first."""
    rows = sorted(detection.items(), key=lambda kv: -kv[1]["ap"])
    width = max(len("score"), *(len(name) for name in detection))
    cols = {m: max(9, len(m)) for m in METRICS}
    header = f"{'score':<{width}}  " + "  ".join(f"{m:>{w}}" for m, w in cols.items())

    def cell(v, w: int) -> str:
        return f"{v:>{w}d}" if isinstance(v, int) else f"{v:>{w}.3f}"

    lines = [header, "-" * len(header)]
    lines += [f"{name:<{width}}  " + "  ".join(cell(row[m], w) for m, w in cols.items()) for name, row in rows]
    return "\n".join(lines)
