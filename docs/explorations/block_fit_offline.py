"""``block_fit`` and the rules ``best`` and ``best_fit`` on runs that ran before ``block_fit`` was a column: it is a
function of the replay's statistics (each run's ``replay/stats.npz``) and of which scored examples are canaries
(metrics.json's recorded canary inputs), so it is recomputed exactly on the run. Per row (mean over its seeds): the
AP of what ``best`` and ``best_fit`` choose (``best_fit`` also with each fold's canaries scored by its whole
decision function, centred: ``block_fit_centred``), the best PMP column with ``block_fit`` among them,
``block_fit``'s own AP and the best baseline's; then the rules' mean and largest regret against that column and
their rows at 0.95× the best baseline or more. Rows without canaries (nothing to fit) are left out. Read-only: it
chooses nothing.

    python docs/explorations/block_fit_offline.py <suite runs dir>
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from pmp_lightning.policy import RULES, average_precision, candidates, decide
from pmp_lightning.replay.store import ReplayStats
from pmp_lightning.report.suite import RATIO_TARGET, score_families
from pmp_lightning.scores.registry import FIT_FOLDS, _block_cosines, _block_weights, block_fit, canary_folds


def block_fit_centred(stats: ReplayStats, is_canary: np.ndarray) -> np.ndarray:
    """``block_fit`` with each fold's canaries and controls scored by that fold's whole decision function (its centre
    and intercept too), so that the folds' scores share one scale; the pool's scores rank as ``block_fit``'s."""
    features = _block_cosines(stats).sum(0)
    m = len(is_canary)
    scores = block_fit(stats, is_canary)
    folds = canary_folds(m)
    for k in range(FIT_FOLDS):
        held = folds == k
        weights, offset = _block_weights(features[-m:][~held], is_canary[~held])
        scores[len(features) - m + np.flatnonzero(held)] = features[-m:][held] @ weights - offset
    return scores


def run_row(run: Path) -> dict[str, float] | None:
    """Every column's AP on the run, ``block_fit`` added, and ``rule:best`` and ``rule:best_fit``, what they choose."""
    metrics = json.loads((run / "metrics.json").read_text())
    inputs = (metrics.get("canaries") or {}).get("inputs")
    if not inputs:
        return None
    truth = np.load(run / "ground_truth.npz")["is_mislabeled"].astype(bool)
    is_canary = np.array(inputs["is_canary"], dtype=bool)
    stats = ReplayStats.load(run / "replay" / "stats.npz")
    ap = {name: row["ap"] for name, row in metrics["detection"].items()}
    canary_scores = {k: np.array(v) for k, v in inputs["scores"].items() if k != "block_fit"}
    chosen = {}
    for version, fit in (("", block_fit), (" (centred)", block_fit_centred)):
        fitted = fit(stats, is_canary)
        ap["block_fit"] = float(average_precision(truth, -fitted[: len(truth)])[0])  # the same ranking in both
        scores = {**canary_scores, "block_fit": fitted[len(truth):]}
        for rule in ("best", "best_fit"):
            (chosen[rule + version],) = decide(RULES[rule], scores, is_canary,
                                               candidates(RULES[rule], scores, "block_cosine"))["combined"]
    return {**ap, **{f"rule:{rule}": ap[name] for rule, name in chosen.items() if rule != "best (centred)"}}


def main(runs: Path) -> None:
    rows = defaultdict(list)
    for path in sorted(runs.glob("*/seed*/metrics.json")):
        result = run_row(path.parent)
        if result is not None:
            rows[path.parent.parent.name].append(result)
    print("| row | seeds | best | best_fit | best_fit (centred) | best PMP column | block_fit | best baseline |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    regret, share = defaultdict(list), defaultdict(list)
    pmp, not_baselines = score_families()
    for name, results in rows.items():
        # as the suite's table: each column's mean over the seeds, then the best column of those means
        means = {k: float(np.mean([r[k] for r in results])) for k in set.intersection(*(set(r) for r in results))}
        column = max(v for k, v in means.items() if k in pmp)
        baseline = max(v for k, v in means.items() if k not in pmp and k not in not_baselines and ":" not in k)
        rules = {rule: means[f"rule:{rule}"] for rule in ("best", "best_fit", "best_fit (centred)")}
        print(f"| {name} | {len(results)} | " + " | ".join(f"{v:.3f}" for v in rules.values())
              + f" | {column:.3f} | {means['block_fit']:.3f} | {baseline:.3f} |")
        for rule, value in rules.items():
            regret[rule].append(column - value)
            share[rule].append(value / baseline >= RATIO_TARGET)
    print()
    for rule in regret:
        print(f"{rule}: mean regret {np.mean(regret[rule]):.4f}, median {np.median(regret[rule]):.4f}, max "
              f"{np.max(regret[rule]):.3f}; {sum(share[rule])} of {len(rows)} rows at ≥ {RATIO_TARGET}× the best "
              "baseline")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
