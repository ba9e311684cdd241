"""scoring.canaries=auto and scoring.by_class=auto (the defaults): made concrete by the data's sizes and where J
comes from (policy.py, resolve), never by the pool's labels. Every network gets 40 canaries where the data can spare
them; none gets the class replays, which did not earn their cost on the development suite."""
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from pmp_lightning.data.base import datamodule_from_config
from pmp_lightning import policy as check
from pmp_lightning.policy import AUTO_CANARIES
from pmp_lightning.policy import resolve as scoring_defaults
from pmp_lightning.models.classifiers import ResNet, ViT, logistic_regression, mlp, reported_cnn
from pmp_lightning.statistics.plan import stacked_blocks
from tests.test_language_model import make_cfg as lm_cfg
from tests.test_pipeline import make_cfg

NOWHERE = Path("/nonexistent")


def test_stacked_blocks_are_the_blocks_of_several_layers():
    assert stacked_blocks(ResNet(num_classes=10, in_channels=1, width=4)) == ["stem", "layers.0", "layers.1", "layers.2"]
    assert stacked_blocks(ViT(num_classes=10, image_size=28, in_channels=1, dim=8, depth=3, heads=2, mlp_dim=8)) == [
        "blocks.0", "blocks.1", "blocks.2"]  # the class token and position embedding (the root) are one module's
    assert stacked_blocks(ViT(num_classes=10, dim=8, depth=2, heads=2, mlp_dim=8, stem="conv")) == [
        "patch_embed", "blocks.0", "blocks.1"]  # the shipped ViT's convolutional stem is a block of three
    for single in (reported_cnn(num_classes=10), mlp(num_classes=10, in_features=784), logistic_regression(10, 784)):
        assert stacked_blocks(single) == []
    # a network of your own written as conv–BatchNorm blocks is stacked too
    vgg = nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
                        nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), nn.Flatten(), nn.LazyLinear(10))
    vgg(torch.zeros(1, 1, 28, 28))
    assert stacked_blocks(vgg) == ["0", "1"]


@pytest.mark.parametrize("model", ["mlp", "cnn", "logreg", "resnet", "vit"])
def test_auto_gives_every_network_canaries_and_none_class_replays(model, caplog):
    """Guard: before, a network of single layers got no canaries (the score auto could not choose there), and a
    stacked one the class replays."""
    with caplog.at_level("INFO"):
        cfg = scoring_defaults(make_cfg(NOWHERE, f"model={model}"))
    assert (cfg.scoring.canaries, cfg.scoring.by_class) == (AUTO_CANARIES, False)
    assert "the data spares 80 examples for them beside J" in caplog.text and "no class replays" in caplog.text


def test_auto_leaves_what_was_set(monkeypatch):
    cfg = scoring_defaults(make_cfg(NOWHERE, "model=resnet", "scoring.by_class=false"))
    assert (cfg.scoring.canaries, cfg.scoring.by_class) == (AUTO_CANARIES, False)
    cfg = scoring_defaults(make_cfg(NOWHERE, "model=mlp", "scoring.canaries=10", "scoring.by_class=true"))
    assert (cfg.scoring.canaries, cfg.scoring.by_class) == (10, True)
    # no canaries: the class variants would idle, and the network is not even looked at
    monkeypatch.setattr(check, "_room", lambda *a: pytest.fail("scoring.canaries=0 needs no look at the network"))
    cfg = scoring_defaults(make_cfg(NOWHERE, "model=resnet", "scoring.canaries=0"))
    assert (cfg.scoring.canaries, cfg.scoring.by_class) == (0, False)


def test_auto_never_cuts_into_a_j_holding_the_pool(caplog):
    """Told apart by its reason in the log: without its branch, the data setup would decide (and either draw canaries
    or fail for another reason)."""
    with caplog.at_level("INFO"):
        cfg = scoring_defaults(make_cfg(NOWHERE, "model=resnet", "pool=test", "data.downstream_includes_pool=true"))
    assert (cfg.scoring.canaries, cfg.scoring.by_class) == (0, False)
    assert "J holds the pool itself" in caplog.text


@pytest.mark.parametrize("size, canaries", [(20 * AUTO_CANARIES, AUTO_CANARIES), (20 * AUTO_CANARIES - 1, 0)])
def test_a_trusted_j_gives_canaries_when_it_can_spare_a_tenth(size, canaries, tmp_path, caplog):
    """A trusted set of your own (the reporter's set-up) gives its first 2k examples for the canaries and controls
    when it holds at least 10 × 2k (J keeps 90% of it); a smaller one keeps them, and the log says why in one line."""
    import numpy as np

    rng = np.random.default_rng(0)
    path = tmp_path / "j.npz"
    np.savez(path, x=rng.random((size, 1, 28, 28), dtype=np.float32), y=np.arange(size) % 10)
    with caplog.at_level("INFO"):
        cfg = scoring_defaults(make_cfg(NOWHERE, "model=resnet", "downstream=file", f"data.downstream.source.path={path}"))
    assert (cfg.scoring.canaries, cfg.scoring.by_class) == (canaries, False)
    if not canaries:
        assert f"J is a trusted set of {size} examples" in caplog.text and "only from 800 up" in caplog.text
    else:  # J keeps the rest of the set
        dm = datamodule_from_config(cfg)
        dm.setup()
        assert len(dm.downstream) == size - 2 * canaries and int(dm.canary_mask.sum()) == canaries


def test_a_corpus_gets_canary_documents_and_no_class_replays(caplog):
    """A corpus is a path that chooses too: on any language model it holds out canary documents beside J (each
    corrupted, the kinds in turn, scored beside its clean twin); its documents have no class, so no class replays.
    A one-block model and a deeper one alike."""
    from pmp_lightning.data.corruption import CORRUPTIONS

    with caplog.at_level("INFO"):
        flat = scoring_defaults(lm_cfg(NOWHERE))
        corpus = scoring_defaults(lm_cfg(NOWHERE, "model.depth=2"))
    assert (flat.scoring.canaries, flat.scoring.by_class) == (AUTO_CANARIES, False)
    assert (corpus.scoring.canaries, corpus.scoring.by_class) == (AUTO_CANARIES, False)
    dm = datamodule_from_config(corpus)
    dm.setup()
    k = int(dm.canary_mask.sum())
    assert len(dm.downstream) == 16 and len(dm.scored) == len(dm.pool) + 2 * k and k >= AUTO_CANARIES - 2
    assert set(dm.canary_kinds) == set(CORRUPTIONS)  # no one kind decides
    canaries, twins = dm.scored.x[len(dm.pool):][:k], dm.scored.x[len(dm.pool):][k:]
    assert all(not torch.equal(a, b) for a, b in zip(canaries, twins))  # each canary differs from its twin
    assert dm.train_set is dm.scored  # pool=train: they train with the pool, as labelled canaries do


@pytest.mark.parametrize("bad, message", [("scoring.by_class=maybe", "scoring.by_class='maybe'"),
                                          ("scoring.canaries=abc", "scoring.canaries='abc'"),
                                          ("seed=-1", "seed=-1")])
def test_a_bad_setting_is_refused_before_auto_sets_the_data_up(bad, message, tmp_path, monkeypatch):
    """auto sets the data up (with noise=confusion: trains its reference model); every setting is checked first."""
    from pmp_lightning.errors import SettingError
    from pmp_lightning.pipeline import run

    monkeypatch.setattr(check, "_room", lambda *a: pytest.fail("the data was set up before the settings were checked"))
    with pytest.raises(SettingError, match=re.escape(message)):
        run(make_cfg(tmp_path, "model=resnet", bad))


def test_reports_rebuild_a_run_with_what_the_run_resolved(tmp_path):
    """compare and diagnose read scoring.canaries and by_class from the run's metrics.json, not from today's rule:
    here the rule would give this MLP 40 canaries and no class replays, the run recorded 10 and class replays (as if
    resolved by another rule)."""
    from omegaconf import OmegaConf

    from pmp_lightning.report.compare import run_config

    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(make_cfg(NOWHERE, "model=mlp"), tmp_path / ".hydra" / "config.yaml")
    assert (run_config(tmp_path).scoring.canaries, run_config(tmp_path).scoring.by_class) == (40, False)  # no record
    (tmp_path / "metrics.json").write_text(json.dumps({"scoring": {"canaries": 10, "by_class": True}}))
    assert (run_config(tmp_path).scoring.canaries, run_config(tmp_path).scoring.by_class) == (10, True)


def test_the_data_is_never_built_from_an_unresolved_auto():
    """The guard: datamodule_from_config refuses auto, so no caller (the run, the sweep report, diagnose) can build a
    pool without the canaries the run drew."""
    with pytest.raises(TypeError, match="policy.resolve"):
        datamodule_from_config(make_cfg(NOWHERE, "model=resnet"))
    assert datamodule_from_config(scoring_defaults(make_cfg(NOWHERE, "model=resnet"))).canaries == AUTO_CANARIES


def test_auto_draws_no_canaries_from_data_that_cannot_spare_them(caplog):
    """5,000 images less J's 100, the test set's 300 and a pool of 4,580 leave 20: not the 80 that 40 canaries and
    their controls need. auto then draws none (and says why), where an explicit scoring.canaries=40 is refused."""
    tight = ("model=resnet", "data.pool_size=4580")
    with caplog.at_level("INFO"):
        cfg = scoring_defaults(make_cfg(NOWHERE, *tight))
    assert (cfg.scoring.canaries, cfg.scoring.by_class) == (0, False)
    assert "cannot spare the 80 examples of scoring.canaries=40" in caplog.text
    assert scoring_defaults(make_cfg(NOWHERE, *tight, "data.pool_size=4500")).scoring.canaries == AUTO_CANARIES


def test_the_scores_asked_for_do_not_change_the_canaries():
    """Whatever scoring.scores holds, auto draws the same canaries, so changing the scores retrains nothing (with a
    training pool the canaries train with it). Guard: before, scores without the block family drew none."""
    for scores in ("[raw,loss]", "[late_cosine]", "[cosine,block_cosine]"):
        assert scoring_defaults(make_cfg(NOWHERE, f"scoring.scores={scores}")).scoring.canaries == AUTO_CANARIES


def test_auto_leaves_data_it_cannot_set_up_to_the_settings_check():
    """A data setting that is wrong (a corpus's wide slice asked of images) is not auto's to report: it counts the
    network as unstacked, and the settings check names the problem, as the run does, before any work."""
    from pmp_lightning.config import check_settings
    from pmp_lightning.errors import SettingError

    cfg = scoring_defaults(make_cfg(NOWHERE, "model=resnet", "+data.wide_size=120"))
    assert (cfg.scoring.canaries, cfg.scoring.by_class) == (0, False)
    with pytest.raises(SettingError, match="data.wide_size is the data scorer's wide slice of a corpus"):
        check_settings(cfg)


@pytest.mark.slow
def test_a_corpus_run_chooses_its_score_on_canary_documents(tmp_path):
    """End to end: the canary documents are scored with the pool, choose the score auto among the PMP family, and are
    left out of every pool output (scores.csv holds the pool's documents only)."""
    import csv

    from pmp_lightning.pipeline import run
    from pmp_lightning.scores.registry import AUTO_FAMILY, FITTED_VARIANTS

    metrics = run(lm_cfg(tmp_path, "model.depth=2", "trainer.max_epochs=1"))
    assert metrics["scoring"] == {"canaries": AUTO_CANARIES, "by_class": False}
    assert set(metrics["canaries"]["combined"]) <= {*AUTO_FAMILY, *FITTED_VARIANTS}
    assert set(metrics["canaries"]["ap"]) <= {*AUTO_FAMILY, *FITTED_VARIANTS}
    assert set(FITTED_VARIANTS) <= set(metrics["canaries"]["inputs"]["scores"])  # fitted on the canary documents too
    with open(tmp_path / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 60 and "auto" in rows[0]
