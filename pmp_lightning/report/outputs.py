"""What a run writes into its directory (besides the links to its cache entries): ``scores.csv``, ``suspects.csv``
and ``suspects.png``, ``metrics.json`` (its contents: ``assemble_metrics``), and the report it prints. Every file is written atomically."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from pmp_lightning.cache import Stages
from pmp_lightning.io import save_json, save_text
from pmp_lightning.replay.costate import describe
from pmp_lightning.replay.store import ReplayStats, growth_steps
from pmp_lightning.report.evaluate import format_table
from pmp_lightning.scores.select import REPORT_KEYS


def write_outputs(out: Path, datamodule, scores: dict[str, np.ndarray], metrics: dict, predicted: np.ndarray | None) -> None:
    """The run's files, then its report on stdout. ``predicted``: the trained model's label of each pool example
    (None for a language model)."""
    rank_by = metrics["suspects"]["rank_by"]
    write_scores(out / "scores.csv", datamodule, scores)
    write_suspects(out, datamodule, scores[rank_by], rank_by, predicted)
    save_json(out / "metrics.json", metrics)
    print_report(metrics, out)


def assemble_metrics(stages: Stages, detected: dict, trained: dict, replayed: dict, stats: ReplayStats, objective,
                     replay: dict, train_dir: Path, replay_dir: Path, datamodule, extras: dict, rank_by: str) -> dict:
    """The contents of ``metrics.json``; ``replay``: the replay's settings."""
    cost = {"train": trained.get("seconds"), "replay": replayed.get("seconds"),
            **({"class_replay": replayed["class_seconds"]} if "class_seconds" in replayed else {}),
            **{stage: stages.timings[stage] for stage in ("corpus_baselines",) if stage in stages.timings},
            **({"cleanlab": extras["cleanlab"]["seconds"]} if extras.get("cleanlab") else {})}
    metrics = {
        "detection": detected["detection"],
        "test_accuracy": trained["test_accuracy"],
        "ground_truth": f"{datamodule.kind.wrong} {datamodule.kind.unit}s",
        "costate": {"mode": replay["curvature"], "horizon": replay["horizon"], "objective": describe(objective),
                    "dynamics": replayed.get("dynamics"),
                    "lambda_norms": stats.lambda_norm.tolist(), "participation": stats.participation.tolist(),
                    "contribution_auroc": detected["per_snapshot"],
                    "growth_warnings": growth_steps(stats.lambda_norm, replay["growth_warning"])},
        "timings": stages.timings,
        "cost_s": cost,
        "peak_memory_mib": stages.memory,
        "cache": {"train": str(train_dir), "replay": str(replay_dir),
                  "computed": [stage for stage in ("train", "replay") if stage in stages.timings]},
    }
    if replayed.get("concentration"):
        metrics["costate"]["concentration"] = replayed["concentration"]
    if detected["caveat"]:
        metrics["detection_caveat"] = detected["caveat"]
    if detected.get("by_kind"):
        metrics["auroc_by_corruption"] = detected["by_kind"]
    metrics["downstream"] = datamodule.downstream_note
    if datamodule.split_note:  # a corpus: where its lines went, and what was dropped and why
        metrics["corpus_splits"] = datamodule.split_note["line"]
    if datamodule.known_error_counts is not None:
        metrics["known_errors"] = {"file": str(datamodule.known_errors), **datamodule.known_error_counts}
    metrics.update({name: value for name, value in extras.items() if value is not None})  # cleanlab, selection, canaries
    metrics["suspects"] = {"rank_by": rank_by, "file": "suspects.csv"}
    return metrics


def write_suspects(out: Path, datamodule, score: np.ndarray, name: str, predicted: np.ndarray | None) -> None:
    """``suspects.csv``: the whole pool, most suspect (lowest score) first, and for images ``suspects.png``, the first 32."""
    from pmp_lightning.report.compare import N_SUSPECTS, suspect_grid

    order = np.argsort(score, kind="stable")
    truth = datamodule.is_mislabeled if datamodule.is_mislabeled.any() else None
    columns = datamodule.suspect_columns(predicted)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["rank", *columns, name, *(["is_mislabeled"] if truth is not None else [])])
    for rank, i in enumerate(order, start=1):
        row = [rank, *(column[i] for column in columns.values()), repr(float(score[i]))]
        writer.writerow(row + ([int(truth[i])] if truth is not None else []))
    save_text(out / "suspects.csv", buf.getvalue())
    if predicted is None:  # a corpus: its first lines are in suspects.csv
        return
    top = order[:N_SUSPECTS]
    observed = datamodule.observed_labels.numpy()
    titles = [f"#{datamodule.pool_index[i]}: {observed[i]}, model {predicted[i]}" for i in top]
    suspect_grid(datamodule.pool.x[top], titles, None if truth is None else truth[top],
                 f"{N_SUSPECTS} most suspect by {name}: index: observed label, model's label"
                 + ("" if truth is None else " (red = mislabeled)"), out / "suspects.png")


def write_scores(path: Path, datamodule, scores: dict[str, np.ndarray]) -> None:
    _write_columns(path, datamodule.pool_columns(), scores)


def write_wide_scores(path: Path, datamodule, scores: dict[str, np.ndarray]) -> None:
    """``wide_scores.csv``: each document of a corpus's wide slice (``data.wide_size``), named as scores.csv names the
    pool's (``index`` its place in the slice, ``document`` its file or line and offset), with the data scorer's
    predicted score and the other scores computed there; choosing from the slice is what the scorer is for."""
    _write_columns(path, datamodule.wide_columns(), scores)


def _write_columns(path: Path, columns: dict[str, list], scores: dict[str, np.ndarray]) -> None:
    """A CSV of what the data says of each example (``columns``), then each score, written atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([*columns, *scores])
    for i in range(len(next(iter(columns.values())))):
        writer.writerow([column[i] for column in columns.values()] + [repr(float(s[i])) for s in scores.values()])
    save_text(path, buf.getvalue())


def print_report(metrics: dict, out: Path) -> None:
    norms = ", ".join(f"{v:.3g}" for v in metrics["costate"]["lambda_norms"])
    lines = [
        f"test accuracy{' (next token)' if metrics['ground_truth'] == 'corrupted documents' else ''}: "
        f"{metrics['test_accuracy']:.4f}",
        f"costate ({metrics['costate']['mode']}, J = {metrics['costate']['horizon']} of {metrics['costate']['objective']}) "
        f"‖λ_t‖, t=1..T: {norms}",
        "downstream examples carrying ∇J(θ_t), t=1..T: "
        + ", ".join(f"{v:.0%}" for v in metrics["costate"]["participation"]),
    ]
    if metrics["detection"]:
        lines += ["", f"detection of {metrics['ground_truth']} (low score = suspect), best AP first:",
                  format_table(metrics["detection"])]
    if "known_errors" in metrics:
        known = metrics["known_errors"]
        repeats = f" ({known['duplicates']} duplicate entries counted once)" if known["duplicates"] else ""
        lines += [f"known errors: {known['in_pool']} of the {known['listed']} distinct indices listed in {known['file']} "
                  f"are in the pool{repeats}"]
    if "cleanlab" in metrics:
        cl = metrics["cleanlab"]
        found = f"find_label_issues flags {cl['issues_found']}"
        if "precision" in cl:
            found += f" (precision {cl['precision']:.3f}, recall {cl['recall']:.3f})"
        lines += [f"cleanlab: probabilities from {cl['probabilities']}, {cl['seconds']:.0f} s; {found}"]
    if "selection" in metrics:
        sel = metrics["selection"]
        lines += ["", f"{sel['measure']} after retraining without the lowest-scored examples (all kept: {sel['full']:.4f}, "
                      f"oracle without exactly the mislabeled: {sel['oracle']:.4f}):"]
        lines += [f"  removed {float(f):.0%}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items())
                  for f, row in sel.items() if f not in REPORT_KEYS]
    lines += ["", "timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in metrics["timings"].items())]
    if metrics["peak_memory_mib"]:
        lines += ["peak memory (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in metrics["peak_memory_mib"].items())]
    costs = ", ".join(f"{k} {v:.0f} s" for k, v in metrics["cost_s"].items() if v is not None)
    if costs:
        lines += [f"cost of the cached results: {costs}"]
    lines += [f"suspects, most suspect first by {metrics['suspects']['rank_by']}: {out / 'suspects.csv'}", f"outputs: {out}"]
    print("\n".join(lines), flush=True)
