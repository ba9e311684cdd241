"""Canaries: downstream examples given a wrong label on purpose, held out of J and scored beside the pool, choose the
PMP variant without the pool's labels (scoring.canaries, rank_by=auto)."""
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from pmp_lightning.data.labelled import PoolDataModule, TrustedSet
from pmp_lightning.errors import DataConfigError, SettingError
from pmp_lightning import policy
from pmp_lightning.policy import RULES, Rule, choose, decide
from pmp_lightning.data.noise import LabelNoise
from pmp_lightning.pipeline import run
from pmp_lightning.scores.registry import AUTO_FAMILY, FITTED_VARIANTS
from tests.conftest import RandomSource
from tests.test_pipeline import make_cfg


@pytest.mark.parametrize("mode", ["train", "holdout", "test"])
def test_canaries_are_drawn_beside_j_and_scored_beside_the_pool(mode):
    """J drawn from the data keeps its examples: the canaries are drawn beside it, after the pool, so the pool and J
    are those of the run without canaries."""
    sizes = {"train_size": 60} if mode == "holdout" else {}
    kw = dict(pool_mode=mode, pool_size=80, downstream_size=30, test_size=20, **sizes)
    plain = PoolDataModule(RandomSource(n=300, test_n=200), LabelNoise("symmetric", 0.2), **kw)
    with_canaries = PoolDataModule(RandomSource(n=300, test_n=200), LabelNoise("symmetric", 0.2), **kw, canaries=10)
    plain.setup(), with_canaries.setup()
    for name in ("pool", "downstream", "test_set"):
        assert torch.equal(getattr(plain, name).x, getattr(with_canaries, name).x), name
        assert torch.equal(getattr(plain, name).y, getattr(with_canaries, name).y), name
    scored = with_canaries.scored
    assert len(scored) == 100 and torch.equal(scored.x[:80], plain.pool.x)
    held = scored.x[80:].flatten(1)
    for other in (plain.pool, plain.downstream, plain.test_set):  # images of their own
        assert not (held[:, None] == other.x.flatten(1)[None]).all(-1).any()
    assert with_canaries.canary_mask.tolist() == [True] * 10 + [False] * 10
    assert (with_canaries.train_set is scored) == (mode == "train")  # trained on, as the pool is, only with pool=train
    if mode == "holdout":
        assert torch.equal(with_canaries.train_set.x, plain.train_set.x)  # a training set of a given size: the same
    if mode == "train":  # a pool of the rest of the images (data.pool_size=null) leaves room for the canaries
        rest = PoolDataModule(RandomSource(n=300, test_n=200), LabelNoise("symmetric", 0.2), **{**kw, "pool_size": None},
                              canaries=10)
        rest.setup()
        assert len(rest.pool) == 300 - 30 - 20 and len(rest.scored) == len(rest.pool) + 20
    assert plain.scored is plain.pool and plain.canary_mask is None


def test_a_trusted_set_gives_its_own_canaries_and_the_pool_stays():
    kw = dict(pool_mode="holdout", pool_size=40, downstream_size=20, test_size=20)
    src = RandomSource(n=200, test_n=120)
    plain = PoolDataModule(src, LabelNoise("symmetric", 0.2), **kw, downstream=TrustedSet(None, "test", 50))
    with_canaries = PoolDataModule(src, LabelNoise("symmetric", 0.2), **kw, downstream=TrustedSet(None, "test", 50),
                                   canaries=10)
    drawn = PoolDataModule(src, LabelNoise("symmetric", 0.2), **kw, canaries=10)
    plain.setup(), with_canaries.setup(), drawn.setup()
    assert len(with_canaries.downstream) == 30 and torch.equal(with_canaries.downstream.x, plain.downstream.x[20:])
    held_y, original = with_canaries.scored.y[40:], plain.downstream.y[:20]
    assert (held_y[:10] != original[:10]).all() and torch.equal(held_y[10:], original[10:])  # canaries, then controls
    for name in ("pool", "train_set", "test_set"):  # either J, with canaries: the same pool and training set
        assert torch.equal(getattr(drawn, name).x, getattr(with_canaries, name).x), name


def test_too_many_canaries_and_auto_without_them_are_named():
    dm = PoolDataModule(RandomSource(n=300, test_n=100), LabelNoise("symmetric", 0.2), pool_size=80, downstream_size=20,
                        test_size=20, canaries=25, downstream=TrustedSet(None, "test", 60))
    with pytest.raises(DataConfigError, match=r"scoring.canaries=25: twice that many .*J keeps at least 20"):
        dm.setup()
    dm = PoolDataModule(RandomSource(n=150), LabelNoise("symmetric", 0.2), pool_size=80, downstream_size=20,
                        test_size=20, canaries=25)
    with pytest.raises(DataConfigError, match=r"canaries and controls \(2 × scoring.canaries=25, drawn beside J\) needs 50"):
        dm.setup()
    with pytest.raises(SettingError, match=r"scoring.rank_by=auto ranks by the PMP variant the policy chooses, and this "
                                           r"run computes none"):
        run(make_cfg(__import__("pathlib").Path("/nonexistent"), "scoring.rank_by=auto", "scoring=baselines"))
    with pytest.raises(SettingError, match=r"scoring.canaries chooses among the PMP variants cosine, .* and this run computes none"):
        run(make_cfg(__import__("pathlib").Path("/nonexistent"), "scoring.canaries=5", "scoring=baselines"))


TEST = Rule("family", "cosine", "test")


def test_the_variant_that_ranks_the_canaries_lowest_wins():
    is_canary = np.array([True] * 5 + [False] * 5)
    good = np.where(is_canary, -1.0, 1.0) + np.linspace(0, 0.1, 10)
    scores = {"bad": -good, "good": good, "tie": good.copy()}
    choice = decide(TEST, scores, is_canary, list(scores))
    assert choice["combined"] == ["good"] and choice["ap"]["good"] == 1.0 and choice["ap"]["bad"] < 0.5
    assert (choice["canaries"], choice["controls"]) == (5, 5) and choice["beats"] == {"good": 1.0, "tie": 1.0}
    assert decide(Rule("family", "cosine", "best"), scores, is_canary, list(scores))["combined"] == ["good"]
    assert decide(Rule("family", "cosine", "none"), scores, is_canary, list(scores))["combined"] == ["bad"]
    # tied: the best and every variant it does not beat with confidence (here its copy), by the mean of their ranks
    assert decide(Rule("family", "cosine", "tied"), scores, is_canary, list(scores))["combined"] == ["good", "tie"]


def test_a_difference_the_canaries_cannot_tell_from_chance_keeps_the_first():
    """An alternative a little better on 40 + 40 examples does not replace the incumbent; a clearly better one does;
    without the resamples' test (the rule best) the slightly better one would have won."""
    rng = np.random.default_rng(1)
    is_canary = np.arange(80) < 40
    first = np.where(is_canary, -1.0, 1.0) + rng.normal(0, 1.2, 80)
    slightly = first + rng.normal(0, 0.3, 80)
    while average_precision_score(is_canary, -slightly) <= average_precision_score(is_canary, -first):
        slightly = first + rng.normal(0, 0.3, 80)
    clearly = np.where(is_canary, -1.0, 1.0) + rng.normal(0, 0.5, 80)
    two = {"cosine": first, "slightly": slightly}
    assert decide(TEST, two, is_canary, list(two))["combined"] == ["cosine"]
    assert decide(Rule("family", "cosine", "best"), two, is_canary, list(two))["combined"] == ["slightly"]
    three = {**two, "clearly": clearly}
    choice = decide(TEST, three, is_canary, list(three))
    assert choice["combined"] == ["clearly"] and choice["beats"]["clearly"] >= 0.95 > choice["beats"]["slightly"]


def test_block_fit_is_computed_where_the_policy_chooses_on_canaries_and_asked_for_elsewhere_is_refused_before_work():
    """``block_fit`` is among the run's scores with canaries (auto or a number) and two PMP variants or more, and
    ``scoring.rank_by`` may name it there; with one PMP variant or no canaries it is not, and asking to rank by it says
    why and what to set, before any data is set up (the output directory does not exist)."""
    from pmp_lightning.config import run_scores

    out = Path("/nonexistent")
    assert "block_fit" in run_scores(make_cfg(out))[0]  # the defaults: canaries=auto, every score
    assert run_scores(make_cfg(out, "scoring.canaries=20", "scoring.rank_by=block_fit"))[1] == "block_fit"
    assert "block_fit" not in run_scores(make_cfg(out, "scoring.scores=[cosine,loss]"))[0]
    assert "block_fit" not in run_scores(make_cfg(out, "scoring.canaries=0"))[0]
    with pytest.raises(SettingError, match=r"scoring.rank_by=block_fit: block_fit is fitted on the canaries, and this "
                                           r"run has none .* set scoring.canaries"):
        run(make_cfg(out, "scoring.canaries=0", "scoring.rank_by=block_fit"))


def test_every_rule_is_of_the_kinds_named_and_a_run_without_canaries_takes_the_incumbent():
    assert all(r.variants in ("family", "fitted", "all") and r.incumbent in ("cosine", "fallback") and
               r.decide in ("none", "test", "best", "tied") for r in RULES.values())
    pool = {"cosine": np.arange(5.0), "block_cosine": -np.arange(5.0), "loss": np.ones(5)}
    out, record = choose(pool, None, 5, rule="test_cosine")
    assert record == {"rule": "test_cosine", "canaries": 0, "combined": ["cosine"]}
    assert np.array_equal(out["auto"], out["cosine"])
    assert choose({"loss": np.ones(5)}, None, 5)[1] is None  # no PMP variant: no score auto
    assert "auto" not in choose({"cosine": np.ones(5), "loss": np.ones(5)}, None, 5)[0]  # one: nothing to choose


@pytest.mark.slow
def test_a_run_with_canaries_ranks_by_the_chosen_variant(tmp_path):
    metrics = run(make_cfg(tmp_path, "scoring.canaries=20", "data.downstream_size=100"))
    combined = metrics["canaries"]["combined"]
    assert set(combined) <= {*AUTO_FAMILY, *FITTED_VARIANTS}
    assert set(metrics["canaries"]["ap"]) == {*AUTO_FAMILY, *FITTED_VARIANTS}
    assert metrics["canaries"]["rule"] == policy.RULE and metrics["suspects"]["rank_by"] == "auto"
    rows = list(csv.DictReader((tmp_path / "scores.csv").open()))
    column = lambda name: np.array([float(r[name]) for r in rows])  # noqa: E731
    assert len(rows) == 600  # the pool only, the canaries left out
    assert np.allclose(column("auto"), policy.combine([column(name) for name in combined]))
    assert metrics["downstream"]["size"] == 100  # J keeps its examples: the canaries were drawn beside it


@pytest.mark.slow
def test_the_sweep_report_rebuilds_the_pool_a_run_with_canaries_scored(tmp_path):
    """With pool=train and a pool of every image left (data.pool_size=null) the canaries take their images out of the
    pool: the report's suspect pictures (and diagnose) rebuild the data from the run's config, canaries included, and
    so find the pool the run scored (they rebuilt it without them, and the report stopped on a mismatch)."""
    from omegaconf import OmegaConf

    from pmp_lightning.data.base import datamodule_from_config
    from pmp_lightning.report.compare import compare

    job = tmp_path / "sweep" / "0"
    cfg = make_cfg(job, "scoring.canaries=10", "data.pool_size=null", "trainer.max_epochs=2",
                   "scoring=cosine")
    run(cfg)
    (job / ".hydra").mkdir()
    OmegaConf.save(cfg, job / ".hydra" / "config.yaml")
    (job / ".hydra" / "overrides.yaml").write_text("- scoring.canaries=10\n")
    rebuilt = datamodule_from_config(OmegaConf.load(job / ".hydra" / "config.yaml"))
    rebuilt.setup()
    assert len(rebuilt.scored) == len(rebuilt.pool) + 20
    compare(tmp_path / "sweep")
    assert (tmp_path / "sweep" / "suspects_cosine.png").stat().st_size > 0


def test_the_hedge_is_the_mean_of_the_ranks():
    """An example is a suspect of the hedge as far as both scores find it one: the lowest under both stays lowest, one
    lowest under only one of them falls in between; any increasing map of either score leaves it as it is."""
    from pmp_lightning.policy import hedge

    a, b = np.array([0.0, 1.0, 2.0, 3.0]), np.array([-5.0, 9.0, -1.0, 7.0])
    assert hedge(a, b).tolist() == [0.25, 0.75, 0.625, 0.875]
    assert np.array_equal(hedge(np.exp(a), b**3), hedge(a, b)) and np.array_equal(hedge(a), (np.arange(4) + 1) / 4)


def test_a_class_variant_the_canaries_choose_is_hedged_with_the_best_whole_j_variant():
    """Where the canaries choose a class variant, the whole-J variant they choose among the family alone goes with it
    (``hedged_with``); where they choose a whole-J variant, nothing does."""
    rng = np.random.default_rng(0)
    is_canary = np.arange(80) < 40
    signal = np.where(is_canary, -1.0, 1.0)
    weak, fair, sharp = (signal + rng.normal(0, s, 80) for s in (3.0, 1.0, 0.2))
    whole = {"cosine": weak, "block_cosine": weak.copy(), "late_cosine": fair, "late_fisher": weak[::-1].copy()}
    hedged = lambda scores: decide(RULES["test_cosine_hedged"], scores, is_canary, list(scores))["combined"]  # noqa: E731
    assert hedged({**whole, "class_cosine": weak.copy(), "class_late_fisher": sharp}) == ["class_late_fisher", "late_cosine"]
    assert hedged({**whole, "class_cosine": weak.copy(), "class_late_fisher": weak.copy()}) == ["late_cosine"]
    assert hedged({"class_cosine": weak.copy(), "class_late_fisher": sharp}) == ["class_late_fisher"]  # no whole-J one
    # guard: the unhedged rule keeps the class variant alone
    assert decide(RULES["test_cosine"], {**whole, "class_late_fisher": sharp}, is_canary,
                  [*whole, "class_late_fisher"])["combined"] == ["class_late_fisher"]


def test_the_run_ranks_the_pool_by_the_hedge_where_the_canaries_choose_a_class_variant(monkeypatch):
    monkeypatch.setattr(policy, "RULE", "test_cosine_hedged")
    """score_stage: ``auto`` on the pool is the hedge of the chosen class variant and ``hedged_with``, ranked over the
    pool alone, and every score comes back without the canaries' rows."""
    from types import SimpleNamespace

    import pmp_lightning.pipeline as pipeline
    from pmp_lightning.policy import hedge
    from pmp_lightning.scores.registry import CLASS_VARIANTS

    rng = np.random.default_rng(0)
    n, is_canary = 30, np.arange(80) < 40
    spread = {"late_cosine": 1.0, "class_late_fisher": 0.2}  # the rest: weak on the canaries
    full = {name: np.r_[rng.random(n), np.where(is_canary, -1.0, 1.0) + rng.normal(0, spread.get(name, 3.0), 80)]
            for name in (*AUTO_FAMILY, *CLASS_VARIANTS)}
    monkeypatch.setattr(pipeline, "compute_scores", lambda names, stats: {k: full[k] for k in AUTO_FAMILY})
    monkeypatch.setattr(pipeline, "class_scores", lambda by_class, labels: {k: full[k] for k in CLASS_VARIANTS})
    monkeypatch.setattr(pipeline.ReplayStats, "load", staticmethod(lambda path: None))
    datamodule = SimpleNamespace(pool=range(n), canary_mask=is_canary, scored=SimpleNamespace(y=torch.zeros(n + 80)))
    scores, choice = pipeline.score_stage(None, [*AUTO_FAMILY, *CLASS_VARIANTS], datamodule, {0: Path("unused")})
    assert choice["combined"] == ["class_late_fisher", "late_cosine"] and choice["rule"] == "test_cosine_hedged"
    assert np.array_equal(scores["auto"], hedge(full["class_late_fisher"][:n], full["late_cosine"][:n]))
    assert all(len(s) == n for s in scores.values())


def test_the_canaries_average_precision_is_scikit_learns_ties_included():
    """policy.average_precision, many resamples at once, gives average_precision_score on random and on heavily tied
    scores (integers 0-4): tied scores share one threshold. Guard: the precision at each positive's own position,
    ignoring ties, differs on the tied ones."""
    from pmp_lightning.policy import average_precision

    rng = np.random.default_rng(0)
    naive_differs = False
    for t in range(200):
        m = int(rng.integers(5, 60))
        y = rng.random(m) < 0.4
        y[0] = True
        s = rng.integers(0, 5, m).astype(float) if t % 2 else rng.normal(size=m)
        assert abs(average_precision(y, s)[0] - average_precision_score(y, s)) < 1e-12
        order = np.argsort(-s, kind="stable")
        naive = (np.cumsum(y[order]) / np.arange(1, m + 1))[y[order]].mean()
        naive_differs |= abs(naive - average_precision_score(y, s)) > 1e-6
    assert naive_differs
    rows = rng.normal(size=(3, 20))
    labels = np.arange(20) < 7
    assert np.allclose(average_precision(np.tile(labels, (3, 1)), rows),
                       [average_precision_score(labels, r) for r in rows])
