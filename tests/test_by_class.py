"""scoring.by_class: each example scored against the costate of its own observed label's class (one replay per class,
J restricted to the downstream examples of that class), after the class-based influence functions of Nguyen-Duc et al.
(ACL 2023)."""
import csv
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
from hydra.utils import instantiate

from pmp_lightning.config import check_settings
from pmp_lightning.data.base import datamodule_from_config
from pmp_lightning.errors import DataConfigError, SettingError
from pmp_lightning.policy import resolve as scoring_defaults
from pmp_lightning.pipeline import run
from pmp_lightning.replay.costate import objective as make_objective
from pmp_lightning.scores.registry import CLASS_VARIANTS, SCORES, class_scores
from pmp_lightning.training import shaped
from tests.test_downstream import TENSORS, _digits_file
from tests.test_language_model import make_cfg as lm_cfg
from tests.test_pipeline import make_cfg


def test_class_scores_take_each_example_from_its_own_class_replay():
    class Stats:  # a class replay's statistics: what the within-class variants read
        def __init__(self, values):
            self.values = np.asarray(values, dtype=float)

    saved = dict(SCORES)
    for within in CLASS_VARIANTS.values():
        SCORES[within] = lambda s: s.values
    try:
        scores = class_scores({0: Stats([1.0, 2.0]), 1: Stats([3.0])}, np.array([0, 1, 0]))
    finally:
        SCORES.clear(), SCORES.update(saved)
    assert set(scores) == set(CLASS_VARIANTS)
    for name in CLASS_VARIANTS:
        assert scores[name].tolist() == [1.0, 3.0, 2.0], name


def test_by_class_is_refused_for_a_corpus_and_must_be_a_boolean():
    with pytest.raises(SettingError, match="a corpus has no labels"):
        check_settings(lm_cfg(Path("/nonexistent"), "scoring.by_class=true"))
    with pytest.raises(Exception, match="by_class"):
        check_settings(make_cfg(Path("/nonexistent"), "scoring.by_class=sometimes"))


@pytest.mark.slow
def test_a_downstream_set_lacking_a_pool_label_is_named_before_training(tmp_path):
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = d.target[1000:1200] < 5
    np.savez(tmp_path / "ds.npz", x=(d.images[1000:1200][keep].reshape(-1, 1, 8, 8) / 16.0).astype(np.float32),
             y=d.target[1000:1200][keep])
    with pytest.raises(DataConfigError, match=r"scoring.by_class: the downstream set .* no example of class\(es\) \[5, 6, 7, 8, 9\]"):
        run(make_cfg(tmp_path, *TENSORS, f"data.source.path={_digits_file(tmp_path / 'pool.npz', 0, 400)}",
                     "downstream=file", f"data.downstream.source.path={tmp_path / 'ds.npz'}", "scoring.by_class=true"))
    assert not (tmp_path / "cache" / "train").exists()  # refused before any training


@pytest.mark.slow
def test_each_example_is_scored_against_its_own_class_costate(tmp_path, caplog):
    """class_cosine equals the cosine of a plain replay whose J is the uncentred objective over the downstream examples
    of one class, for the pool examples labelled with that class (their observed, possibly wrong, label); examples of
    other labels get another costate. The class costates run in one replay, and the log says so."""
    cfg = make_cfg(tmp_path, "scoring.by_class=true", "scoring.scores=[cosine,loss]", "trainer.max_epochs=3",
                   "scoring.canaries=0")
    with caplog.at_level("INFO"):
        metrics = run(cfg)
    assert "class replays: 10 class costates in one replay" in caplog.text
    assert set(CLASS_VARIANTS) <= set(metrics["detection"]) and metrics["cost_s"]["class_replay"] > 0
    rows = list(csv.DictReader((tmp_path / "scores.csv").open()))
    dm = datamodule_from_config(scoring_defaults(cfg))
    dm.setup()
    observed = dm.scored.y.numpy()
    assert [int(r["observed_label"]) for r in rows] == observed.tolist()
    run_objective = instantiate(cfg.objective)
    assert run_objective.centred  # the run's J is centred; a class's J is not
    got = np.array([float(r["class_cosine"]) for r in rows])
    for k in (int(np.bincount(observed).argmax()), int(np.bincount(observed).argmin())):  # the largest and smallest
        module = instantiate(cfg.replay, _partial_=True)(
            net=shaped(instantiate(cfg.model, _partial_=True), dm.pool.x, dm.num_classes)(),
            objective=make_objective(run_objective.name, **run_objective.params), snapshot_dir=tmp_path / "snapshots",
            pool=dm.scored, downstream=dm.downstream.where(dm.downstream.y == k), train_set=dm.train_set)
        pl.Trainer(max_epochs=module.remaining, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False).fit(module)
        reference = SCORES["cosine"](module.results())
        assert np.allclose(got[observed == k], reference[observed == k], rtol=1e-5, atol=1e-7)
        assert not np.allclose(got[observed != k], reference[observed != k], rtol=1e-3)
    again = run(make_cfg(tmp_path / "again", "scoring.by_class=true", "scoring.scores=[cosine,loss]", "trainer.max_epochs=3",
                         "scoring.canaries=0",
                         cache=tmp_path / "cache"))
    assert again["cache"]["computed"] == [] and "class_replay" in again["cost_s"]  # every class's entry hits
