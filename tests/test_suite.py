"""The suite of drawn settings (pmp_lightning/report/suite.py, issue 39 item 4): the draw is seeded and byte for byte
the same, every drawn row composes and passes the settings check, ``run`` runs what it should and resumes, and
``table`` computes the numbers the issue asks for. No training."""
import json
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from pmp_lightning.report import suite as S

ROOT = Path(__file__).resolve().parents[1]
SUITES = {"development": (ROOT / "docs" / "suites" / "development.yaml", 1, 16),
          "validation": (ROOT / "docs" / "suites" / "validation.yaml", 2, 16),
          "test": (ROOT / "docs" / "suites" / "test.yaml", 3, 16),
          "fourth": (ROOT / "docs" / "suites" / "fourth.yaml", 4, 16)}


def test_the_draw_is_the_same_for_the_same_seed_and_differs_for_another(tmp_path):
    for name in ("a.yaml", "b.yaml"):
        assert S.main(["draw", "--seed", "1", "--rows", "16", "--out", str(tmp_path / name)]) == 0
    S.main(["draw", "--seed", "2", "--rows", "16", "--out", str(tmp_path / "c.yaml")])
    a, b, c = ((tmp_path / n).read_bytes() for n in ("a.yaml", "b.yaml", "c.yaml"))
    assert a == b and a != c
    suite = yaml.safe_load(a)
    assert suite["generator_version"] == S.GENERATOR_VERSION and suite["seed"] == 1 and len(suite["rows"]) == 16


@pytest.mark.parametrize("which", SUITES)
def test_the_committed_suites_are_the_generators_draws(which):
    """A change to the generator that would redraw a committed suite must bump GENERATOR_VERSION and draw it anew."""
    path, seed, rows = SUITES[which]
    assert path.read_text() == S.suite_yaml(seed, S.draw(seed, rows))
    suite = S.load_suite(path)
    assert suite["seed"] == seed and suite["generator_version"] == S.GENERATOR_VERSION


@pytest.mark.parametrize("seed", range(12))
def test_drawn_rows_keep_the_models_constraints_and_cover_the_axes(seed):
    rows = S.draw(seed, 16)
    assert len({r.name for r in rows}) == 16
    assert {r.axes["data"] for r in rows} == set(S.DATASETS)  # 16 rows over 6 data sets: every one
    for row in rows:
        data, model, noise = S.DATASETS[row.axes["data"]], row.axes["model"], row.axes["noise"]
        assert model in data.models
        if model in ("cnn", "vit"):
            assert data.name in ("mnist", "fashion_mnist")  # 28 x 28 (cnn), square (vit)
        if model == "text":
            assert data.name == "code_packages"
        assert (model == "gpt") == data.corpus
        if data.corpus:
            assert noise == "corrupt" and set(row.axes["kinds"]) <= set(S.CORRUPTION_KINDS)
        else:
            assert row.axes["rate"] in S.LABEL_NOISE[noise]
        assert row.axes["pool"] in S.POOLS
        assert row.axes["j"] == "drawn" or data.trusted
        assert row.seeds == (S.CHEAP_SEEDS if row.minutes <= S.CHEAP_MINUTES else S.EXPENSIVE_SEEDS)
        assert row.cheap == (row.seeds == S.CHEAP_SEEDS)
    for axis in ("model", "noise", "pool", "j"):
        assert len({r.axes[axis] for r in rows}) > 1


def _rows():
    return [pytest.param(row, id=f"{which}:{row['name']}")
            for which, (path, _, _) in SUITES.items() for row in yaml.safe_load(path.read_text())["rows"]]


def _composed_and_checked(row: dict, tmp_path):
    """What ``run`` will start for ``row`` (seed 0), up to the run directory: composed as run.py composes it, checked
    as run.py checks it (no data is read: the check needs no ../shared/data)."""
    from hydra import compose, initialize_config_dir

    from pmp_lightning.config import check_settings, register_configs

    register_configs()
    overrides = [o for o in S.run_command(row, 0, tmp_path)[2:] if not o.startswith("hydra.")]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"paths.root_dir={ROOT}", f"paths.output_dir={tmp_path}",
                                           f"paths.cache_dir={tmp_path / 'cache'}"])
    check_settings(cfg)
    return cfg


@pytest.mark.parametrize("row", _rows())
def test_every_drawn_row_composes_and_passes_the_settings_check(row, tmp_path):
    cfg = _composed_and_checked(row, tmp_path)
    axes = row["axes"]
    assert cfg.data.pool_mode == axes["pool"] and cfg.seed == 0 and not cfg.logger
    assert cfg.model._target_.rsplit(".", 1)[-1] == {"cnn": "reported_cnn", "mlp": "mlp", "resnet": "ResNet",
                                                     "vit": "ViT", "text": "TextClassifier", "gpt": "GPT"}[axes["model"]]
    assert cfg.noise.rate == axes["rate"]
    if axes["noise"] == "corrupt":
        assert list(cfg.noise.kinds) == axes["kinds"]
    elif axes["noise"] != "confusion":
        assert cfg.noise.kind == axes["noise"]
    assert (cfg.data.get("downstream") is not None) == (axes["j"] == "trusted")
    if "data.source.root=../shared/data" in row["overrides"]:
        assert cfg.data.source.root == "../shared/data"


@pytest.mark.parametrize("row", yaml.safe_load((ROOT / "docs/suites/readme.yaml").read_text())["rows"],
                         ids=lambda row: row["name"])
def test_the_readme_suites_rows_compose_and_pass_the_settings_check(row, tmp_path):
    """The README's table as a hand-written suite: each row is what run.py will start, checked as run.py checks it."""
    suite = S.load_suite(ROOT / "docs/suites/readme.yaml")
    assert suite["seed"] is None and row in suite["rows"]
    cfg = _composed_and_checked(row, tmp_path)
    assert cfg.data.pool_mode == row["name"].rsplit("-", 1)[-1] and cfg.seed == 0 and not cfg.logger


def test_run_dry_run_prints_the_commands(tmp_path, capsys):
    path = SUITES["development"][0]
    rows = yaml.safe_load(path.read_text())["rows"]
    first, other = rows[0], rows[1]
    assert S.main(["run", str(path), "--out", str(tmp_path / "runs"), "--only", first["name"], "--only", other["name"],
                   "--dry-run"]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    expected = []
    for row in (first, other):
        for seed in row["seeds"]:
            expected.append(shlex.join([sys.executable, "run.py", *row["overrides"], f"seed={seed}", "logger=none",
                                        "trainer.enable_progress_bar=false",
                                        f"hydra.run.dir={(tmp_path / 'runs').resolve() / row['name'] / f'seed{seed}'}"]))
    assert printed == expected
    assert not (tmp_path / "runs").exists()  # a dry run starts nothing
    with pytest.raises(SystemExit):
        S.main(["run", str(path), "--out", str(tmp_path), "--only", "no-such-row", "--dry-run"])


def test_run_skips_the_runs_that_finished_and_starts_the_rest(tmp_path):
    """A killed suite resumes: the runs with a metrics.json are skipped; a stand-in for python writes one for the
    others, from the hydra.run.dir it is given, and records its arguments."""
    fake = tmp_path / "fake_python"
    fake.write_text("#!/bin/sh\nfor a; do last=$a; done\ndir=${last#hydra.run.dir=}\nmkdir -p \"$dir\"\n"
                    "echo \"$@\" > \"$dir/args\"\necho '{}' > \"$dir/metrics.json\"\n")
    fake.chmod(0o755)
    suite = {"generator_version": 1, "seed": 0,
             "rows": [{"name": "r", "overrides": ["model=mlp"], "seeds": [0, 1, 2]}]}
    out = tmp_path / "runs"
    (out / "r" / "seed1").mkdir(parents=True)
    (out / "r" / "seed1" / "metrics.json").write_text("{}")
    said = []
    assert S.run_suite(suite, out, python=str(fake), say=said.append) == 0
    assert [line.split("]")[1].split(":")[0].strip() for line in said[:-1]] == [
        "start r seed 0 (estimated ? min); output in " + str(out.resolve() / "r" / "seed0.out"), "done r seed 0",
        "skip r seed 1", "start r seed 2 (estimated ? min); output in " + str(out.resolve() / "r" / "seed2.out"),
        "done r seed 2"]
    assert not (out / "r" / "seed1" / "args").exists()
    args = (out / "r" / "seed2" / "args").read_text().split()
    assert args == ["run.py", "model=mlp", "seed=2", "logger=none", "trainer.enable_progress_bar=false",
                    f"hydra.run.dir={out.resolve() / 'r' / 'seed2'}"]
    said.clear()
    assert S.run_suite(suite, out, python=str(fake), say=said.append) == 0
    assert sum("skip" in line for line in said) == 3


def _metrics(aps: dict, rank_by: str | None = "auto", replay=10.0, class_replay=None) -> dict:
    """metrics.json as report/outputs.py's assemble_metrics writes it, with the keys the table reads."""
    detection = {name: {"auroc": 0.5, "ap": ap, "precision_at_k": 0.5, "recall_at_10pct": 0.5, "hits_in_lowest_1pct": 1}
                 for name, ap in aps.items()}
    cost = {"train": 5.0, "replay": replay, **({"class_replay": class_replay} if class_replay is not None else {})}
    metrics = {"detection": detection, "test_accuracy": 0.9, "ground_truth": "mislabeled examples",
               "timings": {"train": 5.0, "replay": replay}, "cost_s": cost, "peak_memory_mib": {}}
    if rank_by:
        metrics["suspects"] = {"rank_by": rank_by, "file": "suspects.csv"}
    return metrics


def _write(runs: Path, row: str, seed: int, metrics: dict) -> None:
    (runs / row / f"seed{seed}").mkdir(parents=True, exist_ok=True)
    (runs / row / f"seed{seed}" / "metrics.json").write_text(json.dumps(metrics))


def test_table_computes_the_rows_numbers_and_the_summary(tmp_path):
    runs = tmp_path / "runs"
    # row a, two seeds: auto 0.80 / 0.90 (mean 0.85); class_late_fisher 0.90 / 0.96 (0.93) beats cosine (0.70) and
    # late_fisher (0.92 / 0.90: 0.91); loss 0.95 / 0.85 (0.90) beats aum (0.88); random (0.99) is no baseline
    _write(runs, "a", 0, _metrics({"auto": 0.80, "cosine": 0.70, "late_fisher": 0.92, "class_late_fisher": 0.90,
                                   "loss": 0.95, "aum": 0.88, "random": 0.99}, class_replay=20.0))
    _write(runs, "a", 1, _metrics({"auto": 0.90, "cosine": 0.70, "late_fisher": 0.90, "class_late_fisher": 0.96,
                                   "loss": 0.85, "aum": 0.88, "random": 0.99}, replay=20.0, class_replay=20.0))
    # row b, one seed, the cosine the default (no canaries): regret 0, ratio 0.97
    _write(runs, "b", 0, _metrics({"cosine": 0.97, "zscore": 0.90, "el2n": 1.0}, rank_by="cosine"))
    suite = {"generator_version": 1, "seed": 5, "rows": [
        {"name": "a", "cheap": True, "seeds": [0, 1, 2], "overrides": []},
        {"name": "b", "cheap": False, "seeds": [0], "overrides": []},
        {"name": "c", "cheap": False, "seeds": [0], "overrides": []}]}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    out = tmp_path / "docs" / "table.md"
    assert S.main(["table", str(path), "--runs", str(runs), "--out", str(out)]) == 0
    results = {r.name: r for r in S.suite_table(suite, runs)[1]}
    a, b, c = results["a"], results["b"], results["c"]
    assert a.seeds == 2 and a.missing == [2] and a.default == ["auto"]
    assert a.default_ap == pytest.approx(0.85)
    assert (a.best_pmp, a.best_pmp_ap) == ("class_late_fisher", pytest.approx(0.93))
    assert (a.best_baseline, a.best_baseline_ap) == ("loss", pytest.approx(0.90))
    assert a.regret == pytest.approx(0.08) and a.ratio == pytest.approx(0.85 / 0.90)
    assert a.cost == pytest.approx(((10 + 20) / 10 + (20 + 20) / 20) / 2)  # 3x and 2x
    assert b.default == ["cosine"] and b.regret == pytest.approx(0.0) and b.ratio == pytest.approx(0.97)
    assert b.best_baseline == "el2n" and b.cost == pytest.approx(1.0)
    assert c.seeds == 0 and c.missing == [0]
    text = out.read_text()
    assert "| a | 2 (cheap), missing 2 | auto | 0.850 | class_late_fisher | 0.930 | loss | 0.900 | 0.080 | 0.94 | 2.50 |" in text
    assert "| c | 0, missing 0 | – |" in text
    assert "- median regret: 0.040; max regret: 0.080 (a)" in text
    assert "- rows with regret > 0.05: a" in text
    assert "- share of rows with default / best baseline ≥ 0.95: 50% (1 of 2)" in text
    assert "- rows below 0.95: a (0.94)" in text


def test_the_default_column_is_the_one_metrics_json_ranks_by(tmp_path):
    """A guard: the regret is taken against the score suspects.csv is ranked by, not against some fixed column; a
    wrong default column changes it."""
    runs = tmp_path / "runs"
    aps = {"auto": 0.60, "cosine": 0.75, "block_cosine": 0.90, "loss": 0.80}
    _write(runs, "a", 0, _metrics(aps, rank_by="auto"))
    _write(runs, "b", 0, _metrics(aps, rank_by="cosine"))
    _write(runs, "c", 0, _metrics(aps, rank_by=None))  # an older metrics.json: auto when computed
    _write(runs, "d", 0, _metrics({k: v for k, v in aps.items() if k != "auto"}, rank_by=None))  # else the cosine
    suite = {"generator_version": 1, "seed": 0, "rows": [{"name": n, "seeds": [0], "overrides": []} for n in "abcd"]}
    results = {r.name: r for r in S.suite_table(suite, runs)[1]}
    assert results["a"].regret == pytest.approx(0.30) and results["a"].ratio == pytest.approx(0.75)
    assert results["b"].regret == pytest.approx(0.15) and results["b"].ratio == pytest.approx(0.75 / 0.80)
    assert results["a"].regret != results["b"].regret
    assert results["c"].default == ["auto"] and results["c"].regret == pytest.approx(0.30)
    assert results["d"].default == ["cosine"] and results["d"].regret == pytest.approx(0.15)
    assert S.default_score({"detection": {"auto": {}}}) == "auto" and S.default_score({"detection": {}}) == "cosine"


def test_replay_cost_adds_the_class_replays_and_the_canaries_extra():
    assert S.replay_cost({"cost_s": {"replay": 10.0}}) == pytest.approx(1.0)
    assert S.replay_cost({"cost_s": {"replay": 10.0, "class_replay": 25.0, "canary_train": 5.0, "train": 99.0,
                                     "cleanlab": 50.0}}) == pytest.approx(4.0)
    assert S.replay_cost({"cost_s": {"replay": None}}) is None and S.replay_cost({}) is None


def _fitted_run(runs: Path, row: str, seed: int, canaries: bool) -> None:
    """A run whose pool late_fisher ranks perfectly and the cosine at chance (loss in between, the baseline), and, with
    canaries, recorded canary inputs where late_fisher separates them clearly and the rest do not."""
    import numpy as np
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(seed)
    truth = np.arange(40) < 10
    pool = {"cosine": rng.normal(size=40), "block_cosine": rng.normal(size=40), "late_cosine": rng.normal(size=40),
            "late_fisher": np.where(truth, -1.0, 1.0) + rng.normal(0, 0.1, 40),
            "loss": np.where(truth, -1.0, 1.0) + rng.normal(0, 1.0, 40)}
    metrics = _metrics({name: float(average_precision_score(truth, -s)) for name, s in pool.items()}, rank_by="auto")
    if canaries:
        is_canary = np.arange(80) < 40
        inputs = {name: rng.normal(size=80).tolist() for name in ("cosine", "block_cosine", "late_cosine")}
        inputs["late_fisher"] = (np.where(is_canary, -1.0, 1.0) + rng.normal(0, 0.2, 80)).tolist()
        metrics["canaries"] = {"inputs": {"is_canary": is_canary.astype(int).tolist(), "scores": inputs}}
    _write(runs, row, seed, metrics)
    lines = ["index,is_mislabeled," + ",".join(pool)] + [
        f"{i},{int(truth[i])}," + ",".join(repr(float(s[i])) for s in pool.values()) for i in range(40)]
    (runs / row / f"seed{seed}" / "scores.csv").write_text("\n".join(lines) + "\n")


def test_fit_replays_every_rule_and_names_the_fallback_and_the_winner(tmp_path):
    """On runs where late_fisher is the best column and the canaries say so clearly: the fallback is late_fisher (the
    whole-J variant best on average), the winner has no regret on any row, the cosine's rule has (the guard that the
    rules are told apart), and a run without canaries takes the incumbent."""
    from pmp_lightning.policy import RULES

    runs = tmp_path / "runs"
    for seed in (0, 1):
        _fitted_run(runs, "with", seed, canaries=True)
        _fitted_run(runs, "without", seed, canaries=False)
    suite = {"generator_version": 1, "seed": 0,
             "rows": [{"name": "with", "seeds": [0, 1]}, {"name": "without", "seeds": [0, 1]}]}
    text, best, fallback, class_worth = S.fit(suite, runs)
    assert fallback == "late_fisher" and not class_worth
    assert best in RULES and f"**{best}**" in text
    load = lambda run_dir: S.load_run(run_dir, json.loads((run_dir / "metrics.json").read_text()))  # noqa: E731
    run = load(runs / "with" / "seed0")
    assert S.rule_ap(run, RULES["test_cosine"], fallback) == run.ap["late_fisher"]  # the canaries move it
    assert S.rule_ap(run, RULES["cosine"], fallback) == run.ap["cosine"] < run.ap["late_fisher"]
    bare = load(runs / "without" / "seed0")
    assert S.rule_ap(bare, RULES["test_fallback"], fallback) == bare.ap["late_fisher"]
    assert S.rule_ap(bare, RULES["test_cosine"], fallback) == bare.ap["cosine"]
    assert "| with | 2 | late_fisher |" in text


def test_fit_lists_the_named_rules_rows_side_by_side(tmp_path):
    """``rules``: each named rule's per-row AP and regret (the comparison a suite was drawn to decide). The cosine's
    rule keeps its regret where the canaries point to late_fisher, the winner has none; an unknown rule is refused."""
    runs = tmp_path / "runs"
    for seed in (0, 1):
        _fitted_run(runs, "with", seed, canaries=True)
    suite = {"generator_version": 1, "seed": 0, "rows": [{"name": "with", "seeds": [0, 1]}]}
    text, best, _, _ = S.fit(suite, runs, rules=["cosine", "test_cosine"])
    header = next(line for line in text.splitlines() if line.startswith("| row |"))
    assert "| cosine | regret | test_cosine | regret |" in header
    row = next(line for line in text.splitlines() if line.startswith("| with |")).split(" | ")
    cosine_ap, cosine_regret, test_ap, test_regret = map(float, row[4:8])
    assert cosine_regret > 0.05 and test_regret == 0.0 and test_ap == float(row[3]) > cosine_ap
    with pytest.raises(ValueError, match="no such rule"):
        S.fit(suite, runs, rules=["tide"])
