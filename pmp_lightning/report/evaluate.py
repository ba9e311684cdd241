"""Detection metrics: how well a score finds the mislabeled examples (low score = suspect)."""
from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


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
