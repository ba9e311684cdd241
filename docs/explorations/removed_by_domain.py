"""What each score removes from a mixed-domain pool (``+experiment=domains_lm``): the share of every domain among the
lowest-scored fraction, beside the pool's own shares, mean over the runs given. It reads each run's scores.csv (the
pool's) and, with a wide slice, wide_scores.csv too; a document's domain is the first part of its name
(``pmp_lightning.data.domains.domain_of``). Read-only: it says why a selection's target loss is what it is, and
chooses nothing.

    python docs/explorations/removed_by_domain.py <run dir> [<run dir> ...] [--fractions 0.3 0.5]
"""
from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from pmp_lightning.data.domains import DOMAINS, domain_of

SKIP = {"index", "document", "corruption", "is_mislabeled", "label", "given_label", "predicted"}


def read(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Each document's domain and every score column of a scores csv."""
    rows = list(csv.DictReader(path.open()))
    domains = np.array([domain_of(r["document"]) for r in rows])
    names = [k for k in rows[0] if k not in SKIP]
    return domains, {n: np.array([float(r[n]) for r in rows]) for n in names}


def shares(domains: np.ndarray, picked: np.ndarray) -> dict[str, float]:
    return {d: float((domains[picked] == d).mean()) for d in DOMAINS}


def table(paths: list[Path], fractions: list[float]) -> list[str]:
    found: dict[str, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    pool: list[dict] = []
    for path in paths:
        domains, scores = read(path)
        pool.append(shares(domains, np.ones(len(domains), dtype=bool)))
        for name, s in scores.items():
            for f in fractions:
                drop = np.argsort(s, kind="stable")[:int(np.ceil(f * len(s)))]  # as the selection removes them
                picked = np.zeros(len(s), dtype=bool)
                picked[drop] = True
                found[name][f].append(shares(domains, picked))
    mean = lambda rows, d: np.mean([r[d] for r in rows])  # noqa: E731
    lines = [f"{len(paths)} run(s): the share of each domain among the removed documents", "",
             "| score | removed | " + " | ".join(DOMAINS) + " |", "| --- | ---: |" + " ---: |" * len(DOMAINS),
             "| (all of them) | – | " + " | ".join(f"{mean(pool, d):.2f}" for d in DOMAINS) + " |"]
    for name, by_fraction in found.items():
        for f, rows in by_fraction.items():
            lines.append(f"| {name} | {f:.0%} | " + " | ".join(f"{mean(rows, d):.2f}" for d in DOMAINS) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.3, 0.5])
    args = parser.parse_args()
    for file in ("scores.csv", "wide_scores.csv"):
        paths = [run / file for run in args.runs if (run / file).exists()]
        if paths:
            print(f"\n## {file}\n")
            print("\n".join(table(paths, args.fractions)))


if __name__ == "__main__":
    main()
