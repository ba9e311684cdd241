"""A scoring-only multirun trains and replays once; the comparison report matches the jobs."""
import csv
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.test_pipeline import ROOT, SMALL


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    cmd = [sys.executable, "run.py", "-m", *SMALL, "scoring=raw,cosine,loss", "seed=0,1",
           f"hydra.sweep.dir={root / 'sweep'}", f"paths.cache_dir={root / 'cache'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, proc.stdout + proc.stderr


@pytest.mark.slow
def test_train_and_replay_run_once_per_seed(sweep):
    root, log = sweep
    assert len(re.findall("train cache miss", log)) == 2 and len(re.findall("train cache hit", log)) == 4
    assert len(re.findall("replay cache miss", log)) == 2 and len(re.findall("replay cache hit", log)) == 4
    assert len([p for p in (root / "cache" / "train").iterdir() if p.is_dir()]) == 2


@pytest.mark.slow
def test_the_report_equals_the_jobs(sweep):
    root, _ = sweep
    out = root / "sweep"
    jobs = [json.loads(p.read_text()) | {"overrides": (p.parent / ".hydra" / "overrides.yaml").read_text()}
            for p in out.glob("*/metrics.json")]
    assert len(jobs) == 6
    rows = {r["score"]: r for r in csv.DictReader((out / "comparison.csv").open())}
    assert set(rows) == {"raw", "cosine", "loss"}
    for score, row in rows.items():
        values = [j["detection"][score]["ap"] for j in jobs if score in j["detection"]]
        assert int(row["seeds"]) == len(values) == 2
        assert float(row["ap_mean"]) == pytest.approx(sum(values) / 2)
    for name in ("comparison.md", "ap_per_score.png", "pr_curves.png", "lambda_norms.png",
                 "saturation.png", "suspects_raw.png", "suspects_loss.png"):
        assert (out / name).stat().st_size > 0, name


@pytest.mark.slow
def test_parallel_jobs_through_joblib_compute_a_shared_entry_once(tmp_path):
    cmd = [sys.executable, "run.py", "-m", *SMALL, "trainer.max_epochs=2", "scoring=raw,cosine", "hydra/launcher=local",
           "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp_path / 'sweep'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "Joblib.Parallel(n_jobs=2" in log
    for stage in ("train", "replay"):
        assert log.count(f"{stage} cache miss") == 1 and log.count(f"{stage} cache hit") == 1
    assert (tmp_path / "sweep" / "comparison.md").is_file()


def test_the_slurm_launcher_config_composes_without_a_cluster():
    from hydra import compose, initialize_config_dir
    from hydra.utils import get_class

    from pmp_lightning.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*SMALL, "hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"  # the submitit plugin is installed
    assert (launcher.partition, launcher.tasks_per_node, launcher.gpus_per_node) == ("gpu", 1, 1)
    assert launcher.submitit_folder.endswith("/.submitit/%j")


@pytest.mark.slow
def test_the_report_names_unfinished_jobs_and_leaves_them_out(sweep, tmp_path):
    import shutil

    from pmp_lightning.report.compare import compare

    root, _ = sweep
    out = tmp_path / "sweep"
    shutil.copytree(root / "sweep", out)
    killed = out / "6"  # a job that died before writing metrics.json
    shutil.copytree(out / "0" / ".hydra", killed / ".hydra")
    (killed / "scores.csv").write_text("index\n")
    rows = compare(out)
    assert "Left out, unfinished (no metrics.json): jobs 6." in (out / "comparison.md").read_text()
    assert all(int(r["seeds"]) == 2 for r in rows)


def _fake_job(path, seed, ap, overrides=("+experiment=noisy_mnist",)):
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(f"seed: {seed}\n")
    (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    row = {"auroc": ap, "ap": ap, "precision_at_k": ap, "recall_at_10pct": ap}
    (path / "metrics.json").write_text(json.dumps({"detection": {"raw": row}, "costate": {}}))


def test_the_report_counts_seeds_not_jobs_and_names_duplicates(tmp_path):
    from pmp_lightning.report.compare import find_jobs, summarise

    _fake_job(tmp_path / "run_a", seed=0, ap=0.5)  # two separate runs of the same seed and setting
    _fake_job(tmp_path / "run_b", seed=0, ap=0.7)
    _fake_job(tmp_path / "run_c", seed=1, ap=0.9)
    rows, duplicates = summarise(find_jobs(tmp_path))
    assert [r["seeds"] for r in rows] == [2]
    assert rows[0]["ap_mean"] == pytest.approx(0.7)  # run_a (first) and run_c; run_b is the same measurement again
    assert duplicates == ["run_b = run_a"]


def test_compare_on_a_missing_directory_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pmp_lightning.report.compare", str(tmp_path / "nowhere")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"compare: {tmp_path / 'nowhere'} is not a directory; give a Hydra multirun "
                                   f"directory (outputs/multiruns/<date_time>) or outputs/runs")


def test_plots_tell_scores_and_settings_apart(tmp_path, monkeypatch):
    """Figure objects: distinct styles for all 15 scores and a legend off the curves; one histogram figure per setting,
    each naming its setting and seed; integer snapshot ticks."""

    from pmp_lightning.report import compare
    from pmp_lightning.scores.registry import SCORES

    figures = {}
    monkeypatch.setattr(compare, "_save", lambda fig, path: figures.__setitem__(path.name, fig))
    rng = np.random.default_rng(0)
    mask = rng.random(50) < 0.3
    job = type("J", (), {"seed": "7", "metrics": {"costate": {"mode": "expm", "lambda_norms": [3.0, 2.0, 1.0]}}})()
    merged = {s: ({n: rng.random(50) for n in SCORES}, mask, np.arange(50), job) for s in ("pool=train", "pool=holdout")}
    compare.plot_pr_curves(merged, tmp_path)
    compare.plot_histograms(merged, tmp_path)
    monkeypatch.setattr(compare, "first_job_per_setting", lambda jobs: {"pool=train": job})
    compare.plot_lambda_norms([job], tmp_path)

    pr = figures["pr_curves.png"]
    lines = pr.axes[0].get_lines()
    assert len(lines) == len(SCORES) == len({(ln.get_color(), ln.get_linestyle()) for ln in lines})
    assert pr.legends and all(ax.get_legend() is None for ax in pr.axes)  # one figure legend, outside the panels
    assert {f"score_histograms_{compare.slug(s)}.png" for s in merged} <= set(figures)
    for s in merged:
        assert figures[f"score_histograms_{compare.slug(s)}.png"].get_suptitle().endswith(f"{s} (seed 7)")
    ticks = figures["lambda_norms.png"].axes[0].get_xticks()
    assert all(float(t).is_integer() for t in ticks)
    assert "(seed 7)" in figures["lambda_norms.png"].axes[0].get_legend().get_texts()[0].get_text()


def test_the_report_has_selection_accuracies_and_costs_over_seeds(tmp_path):
    from pmp_lightning.report.compare import cost_lines, find_jobs, selection_lines

    for seed, (acc, cost) in enumerate([(0.80, 100.0), (0.84, 120.0)]):
        _fake_job(tmp_path / str(seed), seed=seed, ap=0.9, overrides=("+experiment=selection_pairflip", f"seed={seed}"))
        metrics = json.loads((tmp_path / str(seed) / "metrics.json").read_text())
        metrics["selection"] = {"full": 0.70 + seed / 100, "oracle": 0.90, "0.3": {"cosine": acc, "cleanlab": acc - 0.1, "random": 0.6}}
        metrics["cost_s"] = {"train": 10.0, "replay": cost, "cleanlab": 5 * cost}
        (tmp_path / str(seed) / "metrics.json").write_text(json.dumps(metrics))
    jobs = find_jobs(tmp_path)
    report = "\n".join(selection_lines(jobs) + cost_lines(jobs))
    assert "all kept 0.705 ± 0.007, oracle (exactly the mislabeled removed) 0.900 ± 0.000" in report  # sample std
    assert "| removed | cosine | cleanlab | random |" in report
    assert "| 30% | 0.820 ± 0.028 | 0.720 ± 0.028 | 0.600 ± 0.000 |" in report
    assert "| setting | train | replay | cleanlab |" in report and "| all jobs | 10 | 110 | 550 |" in report


def test_the_selection_plot_shows_each_score_against_the_fraction_kept(tmp_path, monkeypatch):
    """A language model's selection (its measure the test loss): one line per score over the fractions kept, the
    whole pool and the oracle as references, and the measure on the y axis."""
    from pmp_lightning.report import compare

    figures = {}
    monkeypatch.setattr(compare, "_save", lambda fig, path: figures.__setitem__(path.name, fig))
    for seed in (0, 1):
        _fake_job(tmp_path / str(seed), seed=seed, ap=0.9, overrides=("+experiment=code_lm", f"seed={seed}"))
        metrics = json.loads((tmp_path / str(seed) / "metrics.json").read_text())
        metrics["selection"] = {"measure": "test loss", "full": 2.0, "oracle": 1.8,
                                "0.1": {"cosine": 1.9 + seed / 10, "random": 2.1}, "0.3": {"cosine": 1.7, "random": 2.2}}
        (tmp_path / str(seed) / "metrics.json").write_text(json.dumps(metrics))
    jobs = compare.find_jobs(tmp_path)
    assert "clean test loss after retraining with the whole pool's token budget" in "\n".join(compare.selection_lines(jobs))
    compare.plot_selection(jobs, tmp_path)
    ax = figures["selection.png"].axes[0]
    assert ax.get_ylabel() == "test loss" and ax.get_xlabel() == "fraction of the pool kept"
    scores = {c.get_label(): c.lines[0] for c in ax.containers}  # errorbar containers, one per score
    assert set(scores) == {"cosine", "random"}
    assert np.allclose(scores["cosine"].get_xdata(), [0.7, 0.9]) and np.allclose(scores["cosine"].get_ydata(), [1.7, 1.95])
    assert {line.get_label() for line in ax.get_lines()} >= {"whole pool", "oracle"}


def test_settings_sharing_a_long_prefix_keep_their_own_plots(tmp_path, monkeypatch):
    """Twelve settings whose names agree for their first 80 characters: twelve histogram files, titles that name each
    setting in full, and the precision-recall panels wrapped into a grid of at most four columns."""

    from pmp_lightning.report import compare

    figures = {}
    monkeypatch.setattr(compare, "_save", lambda fig, path: figures.__setitem__(path.name, fig))
    prefix = "data.source.root=../shared/data data.pool_size=4000 objective=tempered_ce replay.curvature=expm"
    settings = [f"{prefix} objective.temperature={t}" for t in range(12)]
    rng = np.random.default_rng(0)
    mask = rng.random(40) < 0.3
    job = type("J", (), {"seed": "0"})()
    merged = {s: ({"raw": rng.random(40), "loss": rng.random(40)}, mask, np.arange(40), job) for s in settings}
    compare.plot_histograms(merged, tmp_path)
    histograms = [name for name in figures if name.startswith("score_histograms_")]
    assert len(histograms) == 12
    for s in settings:
        title = figures[f"score_histograms_{compare.slug(s)}.png"].get_suptitle().replace("\n", " ")
        assert f"objective.temperature={s.rsplit('=', 1)[1]} (seed 0)" in title
    compare.plot_pr_curves(merged, tmp_path)
    pr = figures["pr_curves.png"]
    width, height = pr.get_size_inches()
    assert width <= 4.5 * 4 + 2 and height >= 3 * 4  # 4 columns, 3 rows
    titles = [ax.get_title().replace("\n", " ") for ax in pr.axes if ax.get_title()]
    assert len(set(titles)) == 12 and all(t.startswith(prefix[:40]) for t in titles)


def test_the_spread_over_seeds_is_the_sample_std_and_one_seed_has_none(tmp_path):
    from pmp_lightning.report.compare import find_jobs, summarise, write_tables

    _fake_job(tmp_path / "a", seed=0, ap=0.7252)
    _fake_job(tmp_path / "b", seed=1, ap=0.6743)
    _fake_job(tmp_path / "c", seed=0, ap=0.5, overrides=("+experiment=noisy_mnist", "pool=holdout"))
    jobs = find_jobs(tmp_path)
    rows, duplicates = summarise(jobs)
    two = next(r for r in rows if r["seeds"] == 2)
    assert two["ap_std"] == pytest.approx(0.0360, abs=1e-4)  # not the population std, 0.0255
    write_tables(rows, [], tmp_path, [], jobs, duplicates)
    table = (tmp_path / "comparison.md").read_text()
    assert "| 2 | 0.700 ± 0.036 | 0.700 ± 0.036 | 0.700 ± 0.036 |" in table
    assert "| 1 | 0.500 ± n/a | 0.500 ± n/a | 0.500 ± n/a |" in table
