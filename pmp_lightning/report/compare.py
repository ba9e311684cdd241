"""Comparison report over a Hydra multirun: which score finds mislabeled examples, under which settings.

    python -m pmp_lightning.report.compare outputs/multiruns/<date_time>

Also runs by itself at the end of every multirun (``hydra_callbacks.CompareAtSweepEnd`` in ``conf/hydra/default.yaml``).
A *setting* is a job's overrides minus ``scoring`` and ``seed``; seeds are averaged. Writes into the
sweep directory:

- ``comparison.md`` / ``comparison.csv``: score × setting, mean ± sample std over seeds of AUROC, AP, precision@k
- ``ap_per_score.png``: AP per score with error bars, one bar per setting
- ``pr_curves.png``: precision–recall curves of every score, one panel per setting (first seed)
- ``score_histograms_<setting>_<hash>.png``: clean vs mislabeled score histograms, one figure per setting (first seed)
- ``lambda_norms.png``: ‖λ_t‖ per snapshot, one line per curvature mode
- ``saturation.png``: per snapshot, the share of the downstream set that carries ∇J (participation ratio)
  beside the detection AUROC of that snapshot's contribution c_t: where J saturates, detection fails
- ``selection.png`` (with ``select.fractions``): what retraining on the kept fraction reaches, per score
- ``suspects_<score>.png``: the 32 most suspected examples per score, observed and true label
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import textwrap
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
from omegaconf import OmegaConf, open_dict  # noqa: E402
from sklearn.metrics import precision_recall_curve  # noqa: E402

from pmp_lightning.io import atomic_write, save_text  # noqa: E402
from pmp_lightning.scores.registry import pmp_names  # noqa: E402

log = logging.getLogger(__name__)
AVERAGED = ("scoring", "seed")  # override keys that do not define a setting
NOT_A_SETTING = ("paths.", "hydra.", "trainer.enable_progress_bar")  # where outputs go, not what is computed
TABLE_METRICS = ("auroc", "ap", "precision_at_k")
N_SUSPECTS = 32  # suspects shown per score: the grids here, suspects.png, the W&B table
# scores.csv's columns that describe an example (data.py's and corpus.py's pool_columns); the rest are scores
DESCRIBING = ("index", "true_label", "observed_label", "is_mislabeled", "known_error", "document", "corruption")
PANELS_PER_ROW = 4


class Job:
    def __init__(self, path: Path):
        self.path = path
        self.metrics = json.loads((path / "metrics.json").read_text())
        overrides = OmegaConf.load(path / ".hydra" / "overrides.yaml") if (path / ".hydra" / "overrides.yaml").is_file() else []
        self.overrides = [str(o) for o in overrides]
        keys = [o.split("=")[0].lstrip("+~") for o in self.overrides]
        self.defining = [o for o, k in zip(self.overrides, keys) if k not in AVERAGED and not k.startswith(NOT_A_SETTING)]
        self.setting = ""  # set by find_jobs: the defining overrides that differ between jobs
        config = path / ".hydra" / "config.yaml"
        self.seed = str(OmegaConf.load(config).get("seed", 0)) if config.is_file() else next(
            (o.split("=", 1)[1] for o in self.overrides if o.split("=")[0] == "seed"), "0")

    def scores(self) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Per-example scores, the mislabeled mask and the source indices, from scores.csv."""
        rows = list(csv.DictReader((self.path / "scores.csv").open()))
        names = [k for k in rows[0] if k not in DESCRIBING]
        scores = {n: np.array([float(r[n]) for r in rows]) for n in names}
        return scores, np.array([r["is_mislabeled"] == "1" for r in rows]), np.array([int(r["index"]) for r in rows])


def find_jobs(sweep_dir: Path) -> list[Job]:
    jobs = [Job(p.parent) for p in sorted(sweep_dir.glob("*/metrics.json"))]
    if not jobs:
        raise FileNotFoundError(f"no finished jobs (*/metrics.json) under {sweep_dir}; is it a Hydra multirun directory?")
    common = set.intersection(*(set(j.defining) for j in jobs))
    for job in jobs:
        job.setting = " ".join(o for o in job.defining if o not in common) or "all jobs"
    return jobs


def common_overrides(jobs: list[Job]) -> list[str]:
    common = set.intersection(*(set(j.defining) for j in jobs))
    return [o for o in jobs[0].defining if o in common]


def summarise(jobs: list[Job]) -> tuple[list[dict], list[str]]:
    """One row per (score, setting): mean and std over distinct seeds of each table metric.

    Two jobs that scored the same score in the same setting with the same seed are one measurement
    taken twice: the first is counted, and the duplicates are returned (``"<job> = <job>"``) to be named.
    """
    values: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    first: dict[tuple[str, str, str], Job] = {}
    duplicates: set[str] = set()
    for job in jobs:
        for score, row in job.metrics["detection"].items():
            key = (score, job.setting, job.seed)
            if key in first:
                duplicates.add(f"{job.path.name} = {first[key].path.name}")
                continue
            first[key] = job
            values[(score, job.setting)][job.seed] = row
    rows = []
    for (score, setting), by_seed in values.items():
        row = {"score": score, "setting": setting, "seeds": len(by_seed)}
        for m in TABLE_METRICS:
            row[f"{m}_mean"] = float(np.mean([r[m] for r in by_seed.values()]))
            row[f"{m}_std"] = sample_std([r[m] for r in by_seed.values()])
        rows.append(row)
    return sorted(rows, key=lambda r: (r["setting"], -r["ap_mean"])), sorted(duplicates)


def unfinished_jobs(sweep_dir: Path) -> list[str]:
    """Job directories without metrics.json (crashed, killed or still running): left out of the report."""
    return sorted(p.parent.parent.name for p in sweep_dir.glob("*/.hydra/overrides.yaml")
                  if not (p.parent.parent / "metrics.json").is_file())


def saturation_lines(jobs: list[Job]) -> list[str]:
    """Per setting, the share of the downstream set carrying ∇J at the last snapshot and at its lowest (mean over seeds)."""
    shares: dict[str, list[list[float]]] = defaultdict(list)
    for job in jobs:
        share = job.metrics["costate"].get("participation")
        if share:
            shares[job.setting].append(share)
    if not shares:
        return []
    lines = ["", "Saturation: share of the downstream set carrying ∇J(θ_t), (Σw)²/(M Σw²) with w_m = ‖∂J_m/∂z_m‖ "
                 "(1 = every example pulls equally; see saturation.png).", "",
             "| setting | at θ_T | lowest over t |", "| --- | ---: | ---: |"]
    for setting in sorted(shares):
        values = np.array(shares[setting])
        lines.append(f"| {setting} | {values[:, -1].mean():.2f} | {values.min(1).mean():.2f} |")
    return lines


def sample_std(values: list[float]) -> float:
    """The sample standard deviation over seeds (n − 1 in the denominator); NaN for a single seed, which has none."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def mean_std(mean: float, std: float) -> str:
    """``0.725 ± 0.036``, or ``0.725 ± n/a`` when there is one seed."""
    return f"{mean:.3f} ± " + ("n/a" if np.isnan(std) else f"{std:.3f}")


def _mean_std(values: list[float]) -> str:
    return mean_std(float(np.mean(values)), sample_std(values))


def selection_runs(jobs: list[Job]) -> dict[str, tuple[list[dict], list[str], list[str]]]:
    """Per setting: each seed's selection report, the removed fractions and the scores, in order."""
    by_setting: dict[str, dict[str, dict]] = defaultdict(dict)
    for job in jobs:
        if "selection" in job.metrics:
            by_setting[job.setting].setdefault(job.seed, job.metrics["selection"])
    from pmp_lightning.scores.select import REPORT_KEYS  # torch: not when Hydra loads this module's callback

    found = {}
    for setting, by_seed in sorted(by_setting.items()):
        runs = list(by_seed.values())
        fractions = sorted({f for r in runs for f in r if f not in REPORT_KEYS}, key=float)
        found[setting] = runs, fractions, list(dict.fromkeys(name for r in runs for f in fractions for name in r.get(f, {})))
    return found


def selection_lines(jobs: list[Job]) -> list[str]:
    """Per setting, what retraining without the lowest-scored fraction reaches (test accuracy, or a language model's
    test loss), mean ± std over seeds."""
    lines = []
    for setting, (runs, fractions, names) in selection_runs(jobs).items():
        measure = runs[0].get("measure", "test accuracy")
        budget = " with the whole pool's token budget" if measure == "test loss" else ""
        lines += ["", f"Selection ({setting}, {len(runs)} seeds): clean {measure} after retraining{budget} without the "
                      f"lowest-scored fraction of the pool; all kept {_mean_std([r['full'] for r in runs])}, "
                      f"oracle (exactly the mislabeled removed) {_mean_std([r['oracle'] for r in runs])}.", "",
                  "| removed | " + " | ".join(names) + " |", "| ---: |" + " ---: |" * len(names)]
        for f in fractions:
            cells = [_mean_std([r[f][n] for r in runs if n in r.get(f, {})]) for n in names]
            lines.append(f"| {float(f):.0%} | " + " | ".join(cells) + " |")
    return lines


def cost_lines(jobs: list[Job]) -> list[str]:
    """Per setting, what each cached stage cost when it was computed (``cost_s``), mean over seeds."""
    costs: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for job in jobs:
        for stage, seconds in job.metrics.get("cost_s", {}).items():
            if seconds is not None:
                costs[job.setting][stage][job.seed] = seconds
    found = {stage for by_stage in costs.values() for stage in by_stage}
    stages = [st for st in ("train", "replay", "cleanlab") if st in found] + sorted(found - {"train", "replay", "cleanlab"})
    if not stages:
        return []
    lines = ["", "Cost: wall seconds of each stage when it was computed (cached afterwards), mean over seeds.", "",
             "| setting | " + " | ".join(stages) + " |", "| --- |" + " ---: |" * len(stages)]
    for setting, by_stage in sorted(costs.items()):
        cells = [f"{np.mean(list(by_stage[st].values())):.0f}" if by_stage.get(st) else "" for st in stages]
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return lines


def write_tables(rows: list[dict], common: list[str], out: Path, unfinished: list[str], jobs: list[Job],
                 duplicates: list[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    save_text(out / "comparison.csv", buf.getvalue())
    lines = [f"Overrides shared by every job: `{' '.join(common) or '(none)'}`. Mean ± sample std over seeds "
             f"(n/a for one seed); low score = suspect.", "",
             "| setting | score | seeds | AUROC | AP | precision@k |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    if unfinished:
        lines[1:1] = ["", f"Left out, unfinished (no metrics.json): jobs {', '.join(unfinished)}."]
    if duplicates:
        lines[1:1] = ["", f"Duplicate jobs (same setting, seed and score; counted once): {'; '.join(duplicates)}."]
    for r in rows:
        cells = " | ".join(mean_std(r[f"{m}_mean"], r[f"{m}_std"]) for m in TABLE_METRICS)
        lines.append(f"| {r['setting']} | {r['score']} | {r['seeds']} | {cells} |")
    lines += saturation_lines(jobs) + selection_lines(jobs) + cost_lines(jobs)
    save_text(out / "comparison.md", "\n".join(lines) + "\n")


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def plot_ap(rows: list[dict], out: Path) -> None:
    settings = sorted({r["setting"] for r in rows})
    scores = [r["score"] for r in sorted(rows, key=lambda r: -r["ap_mean"]) if r["setting"] == settings[0]]
    scores += sorted({r["score"] for r in rows} - set(scores))
    lookup = {(r["score"], r["setting"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(scores) * max(1, len(settings)) ** 0.5), 4))
    width = 0.8 / len(settings)
    for i, setting in enumerate(settings):
        x = [j + i * width for j, s in enumerate(scores) if (s, setting) in lookup]
        r = [lookup[(s, setting)] for s in scores if (s, setting) in lookup]
        ax.bar(x, [v["ap_mean"] for v in r], width, yerr=[np.nan_to_num(v["ap_std"]) for v in r], capsize=2,
               label=wrapped(setting))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(scores))], scores, rotation=60, ha="right")
    ax.set_ylabel("average precision (mean ± std over seeds)")
    ax.set_title("Detection of mislabeled examples")
    ax.legend(fontsize=7)
    _save(fig, out / "ap_per_score.png")


def first_job_per_setting(jobs: list[Job]) -> dict[str, Job]:
    chosen: dict[str, Job] = {}
    for job in sorted(jobs, key=lambda j: j.seed):
        chosen.setdefault(job.setting, job)
    return chosen


def scores_per_setting(jobs: list[Job]) -> dict[str, tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, Job]]:
    """Per setting, the first seed's per-example scores gathered from every job that computed one
    (a scoring sweep computes one score per job), the mislabeled mask, the source indices, and one of
    those jobs (they share their data)."""
    merged: dict[str, tuple[dict, np.ndarray, np.ndarray, Job]] = {}
    for setting, first in first_job_per_setting(jobs).items():
        scores = {}
        for job in jobs:
            if job.setting == setting and job.seed == first.seed:
                job_scores, mask, index = job.scores()
                for name, s in job_scores.items():
                    scores.setdefault(name, s)
        merged[setting] = (scores, mask, index, first)
    return merged


def score_styles(names) -> dict[str, dict]:
    """One colour per score (tab20, then dashes), PMP variants solid and baselines dotted, the same in every plot."""
    colours, pmp = plt.get_cmap("tab20").colors, set(pmp_names(names))
    return {name: {"color": colours[i % len(colours)], "ls": ("-" if name in pmp else ":") if i < len(colours) else "--"}
            for i, name in enumerate(sorted(names))}


def slug(setting: str) -> str:
    """A file-name part for a setting, unique per setting: a readable prefix and a short hash of the whole setting
    (``objective=ce pool=holdout`` -> ``objective-ce_pool-holdout_1f2e3d4c``), so settings sharing a long prefix
    never overwrite each other's files."""
    readable = "".join(c if c.isalnum() or c in "-." else "_" for c in setting.replace("=", "-").replace(" ", "_"))[:60]
    return f"{readable}_{hashlib.sha1(setting.encode()).hexdigest()[:8]}"


def wrapped(text: str, width: int = 60) -> str:
    """A title or legend entry on as many lines as it needs: never cut short, so every setting can be told apart."""
    return "\n".join(textwrap.wrap(text, width, break_on_hyphens=False)) or text


def plot_pr_curves(merged, out: Path) -> None:
    """One panel per setting, at most ``PANELS_PER_ROW`` to a row: many settings wrap into a grid a person can read."""
    styles = score_styles({name for scores, *_ in merged.values() for name in scores})
    cols = min(PANELS_PER_ROW, len(merged))
    rows = -(-len(merged) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols + 2, 4.2 * rows), squeeze=False)
    for ax, (setting, (scores, mask, _, job)) in zip(axes.flat, merged.items()):
        for name, s in scores.items():
            precision, recall, _ = precision_recall_curve(mask, -s)
            ax.plot(recall, precision, label=name, lw=1.2, **styles[name])
        ax.set(xlabel="recall", ylabel="precision", ylim=(0, 1.02))
        ax.set_title(wrapped(f"{setting} (seed {job.seed})", 50), fontsize=8)
    for ax in list(axes.flat)[len(merged):]:
        ax.axis("off")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.95), title="score (solid: PMP)")
    fig.tight_layout()
    _save(fig, out / "pr_curves.png")


def plot_histograms(merged, out: Path) -> None:
    """One figure per setting, ``score_histograms_<setting>.png``: clean vs mislabeled scores of its first seed."""
    for setting, (scores, mask, _, job) in merged.items():
        cols = min(4, len(scores))
        rows = -(-len(scores) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, layout="constrained")
        for ax, (name, s) in zip(axes.flat, scores.items()):
            bins = np.linspace(s.min(), s.max(), 40) if s.max() > s.min() else 10
            ax.hist(s[~mask], bins=bins, alpha=0.6, density=True, label="clean")
            ax.hist(s[mask], bins=bins, alpha=0.6, density=True, label="mislabeled")
            ax.set_title(name, fontsize=9)
            ax.tick_params(labelsize=6)
        for ax in list(axes.flat)[len(scores):]:
            ax.axis("off")
        axes[0, 0].legend(fontsize=7)
        fig.suptitle(wrapped(f"score histograms: {setting} (seed {job.seed})", 90), fontsize=9)
        _save(fig, out / f"score_histograms_{slug(setting)}.png")


def plot_lambda_norms(jobs: list[Job], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for setting, job in first_job_per_setting(jobs).items():
        norms = job.metrics["costate"]["lambda_norms"]
        ax.semilogy(range(1, len(norms) + 1), norms, marker="o",
                    label=wrapped(f"{job.metrics['costate']['mode']}: {setting} (seed {job.seed})"))
    ax.set(xlabel="snapshot t (λ_t, t = 1..T)", ylabel="‖λ_t‖", title="costate norm per snapshot")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=6)
    _save(fig, out / "lambda_norms.png")


def plot_saturation(jobs: list[Job], out: Path) -> None:
    """The saturation diagnostic: per snapshot, the share of downstream examples carrying ∇J(θ_t) (left)
    beside the detection AUROC of that snapshot's contribution c_t alone (right), one line per setting."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for setting, job in first_job_per_setting(jobs).items():
        costate = job.metrics["costate"]
        label = wrapped(f"{setting} (seed {job.seed})")
        share = costate.get("participation", [])
        left.plot(range(1, len(share) + 1), share, marker="o", label=label)
        auroc = costate.get("contribution_auroc", [])
        right.plot(range(len(auroc)), auroc, marker="o", label=label)
    left.set(xlabel="snapshot t (θ_t)", ylabel="(Σw)² / (M Σw²), w_m = ‖∂J_m/∂z_m‖", ylim=(0, 1.02),
             title="share of the downstream set carrying ∇J(θ_t)")
    right.axhline(0.5, color="grey", lw=0.8, ls="--")
    right.set(xlabel="snapshot t (c_t = η_t⟨λ_{t+1}, ∇l_n(θ_t)⟩)", ylabel="AUROC of c_t (low = suspect)", ylim=(0, 1.02),
              title="detection by one snapshot's contribution")
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.legend(fontsize=6, loc="lower left")
    _save(fig, out / "saturation.png")


def plot_selection(jobs: list[Job], out: Path) -> None:
    """``selection.png``: per setting, what the retrained model reaches against the fraction of the pool kept, one
    line per score (mean ± std over seeds), with the whole pool and the oracle as references."""
    found = selection_runs(jobs)
    if not found:
        return
    fig, axes = plt.subplots(1, len(found), figsize=(5.5 * len(found), 4), squeeze=False)
    for ax, (setting, (runs, fractions, names)) in zip(axes[0], found.items()):
        fractions = fractions[::-1]  # the fraction kept rising left to right
        kept = [1 - float(f) for f in fractions]
        for name, style in score_styles(names).items():
            values = [[r[f][name] for r in runs if name in r.get(f, {})] for f in fractions]
            ax.errorbar(kept, [np.mean(v) for v in values], yerr=[sample_std(v) if len(v) > 1 else 0 for v in values],
                        marker="o", capsize=3, label=name, **style)
        ax.axhline(np.mean([r["full"] for r in runs]), color="black", lw=0.8, ls="--", label="whole pool")
        ax.axhline(np.mean([r["oracle"] for r in runs]), color="green", lw=0.8, ls=":", label="oracle")
        ax.set(xlabel="fraction of the pool kept", ylabel=runs[0].get("measure", "test accuracy"),
               title=wrapped(f"{setting} ({len(runs)} seeds)"))
        ax.legend(fontsize=6)
    _save(fig, out / "selection.png")


def suspect_grid(images, titles: list[str], red, title: str, path: Path) -> None:
    """A 4 × 8 grid of pool images with a caption each (red where ``red`` is true); inputs that are not
    images ((C, H, W) with 1 or 3 channels) are left undrawn."""
    shown = [x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).clamp(0, 1).numpy()
             for x in images if x.dim() == 3 and x.shape[0] in (1, 3)]
    if len(shown) != len(images):
        log.info(f"{path.name} not drawn: the inputs are not images (shape {tuple(images.shape[1:])})")
        return
    fig, axes = plt.subplots(4, 8, figsize=(10, 5.6))
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(shown):
            ax.imshow(shown[k], cmap="gray")
            ax.set_title(titles[k], fontsize=7, color="red" if red is not None and red[k] else "black")
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def run_config(run_dir: Path):
    """A finished run's config as it ran: ``scoring.canaries`` and ``scoring.by_class`` as the run resolved them
    (metrics.json's ``scoring``), so a report rebuilds the very pool the run scored even where the rule that resolves
    ``auto`` (``policy.resolve``) would decide otherwise today; a run without that record is resolved
    by today's rule."""
    from pmp_lightning.policy import resolve  # torch: only where a run's data is rebuilt

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    metrics = run_dir / "metrics.json"
    resolved = json.loads(metrics.read_text()).get("scoring") if metrics.exists() else None
    if resolved is None:
        return resolve(cfg)
    with open_dict(cfg):
        cfg.scoring.canaries, cfg.scoring.by_class = resolved["canaries"], resolved["by_class"]
    return cfg


def plot_suspects(merged, out: Path) -> None:
    """The lowest-scored examples of each score (first setting, first seed), observed and true labels."""
    from pmp_lightning.data.base import datamodule_from_config

    setting, (scores, mask, index, job) = next(iter(merged.items()))
    with (job.path / "scores.csv").open() as f:
        header = f.readline().split(",")
    if "document" in header:
        return  # a corpus: no pictures; each run's suspects.csv shows the documents' first lines
    cfg = run_config(job.path)
    datamodule = datamodule_from_config(cfg)
    datamodule.setup()
    if not np.array_equal(index, datamodule.pool_index):
        raise RuntimeError(f"{job.path}: the rebuilt pool does not match scores.csv; the data source changed since the run")
    for name, s in scores.items():
        order = np.argsort(s, kind="stable")[:N_SUSPECTS]
        titles = [f"obs {int(datamodule.observed_labels[i])} / true {int(datamodule.true_labels[i])}" for i in order]
        suspect_grid(datamodule.pool.x[order], titles, mask[order],
                     wrapped(f"{name}: {N_SUSPECTS} most suspected (red = mislabeled); {setting}, seed {job.seed}", 110),
                     out / f"suspects_{name}.png")


def compare(sweep_dir: str | Path) -> list[dict]:
    sweep_dir = Path(sweep_dir)
    jobs = find_jobs(sweep_dir)
    rows, duplicates = summarise(jobs)
    if duplicates:
        log.warning(f"duplicate jobs under {sweep_dir} (same setting, seed and score), each counted once: {'; '.join(duplicates)}")
    if not rows:
        raise FileNotFoundError(f"the jobs under {sweep_dir} have no detection metrics (noise=none?); nothing to compare")
    unfinished = unfinished_jobs(sweep_dir)
    if unfinished:
        log.warning(f"jobs {', '.join(unfinished)} under {sweep_dir} did not finish; the report leaves them out")
    write_tables(rows, common_overrides(jobs), sweep_dir, unfinished, jobs, duplicates)
    plot_ap(rows, sweep_dir)
    merged = scores_per_setting(jobs)
    plot_pr_curves(merged, sweep_dir)
    plot_histograms(merged, sweep_dir)
    plot_lambda_norms(jobs, sweep_dir)
    plot_saturation(jobs, sweep_dir)
    plot_selection(jobs, sweep_dir)
    plot_suspects(merged, sweep_dir)
    log.info(f"comparison of {len(jobs)} jobs written to {sweep_dir}/comparison.md")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pmp_lightning.report.compare", description="Write the comparison report of a Hydra multirun directory.")
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.exit(2, f"compare: {args.sweep_dir} is not a directory; give a Hydra multirun directory "
                       f"(outputs/multiruns/<date_time>) or outputs/runs\n")
    try:
        rows = compare(args.sweep_dir)
    except FileNotFoundError as err:
        parser.exit(1, f"compare: {err}\n")
    print((args.sweep_dir / "comparison.md").read_text(), end="")
    print(f"{len(rows)} rows; plots in {args.sweep_dir}")


if __name__ == "__main__":
    main()
