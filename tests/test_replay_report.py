"""What the replay says about itself: the dynamics it modelled (a log line and ``costate.dynamics`` in metrics.json),
a direction that a few parameters dominate (``costate.concentration``, a warning), settings it refuses before any
work (a typo'd key, an unknown curvature), and what it costs before it runs."""
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pmp_lightning.errors import ReplayConfigError, SettingError
from pmp_lightning.replay.dynamics import modelled_dynamics
from pmp_lightning.replay.store import (COSINE_COLLAPSE, TOP_FRACTION, TOP_SHARE_WARNING, ReplayStats, concentration,
                                       top_share)

ROOT = Path(__file__).resolve().parents[1]


def manifest(optimizer: dict, steps_per_snapshot: int = 1) -> dict:
    """Snapshots of ``steps_per_snapshot`` steps each; an optimizer with ``betas`` (Adam written since trajectory
    format 2) has its moments kept with every snapshot."""
    kept = {"moments": "moments.pt"} if "betas" in optimizer else {}
    return {"optimizer": optimizer,
            "snapshots": [{"lrs": [], **kept}] + [{"lrs": [0.1] * steps_per_snapshot, **kept}] * 3}


@pytest.mark.parametrize("optimizer, steps, curvature, said", [
    ({"name": "SGD", "momentum": 0.0, "weight_decay": 0.0}, 5, "expm",
     "SGD: gradient descent with the recorded learning rates, no weight decay"),
    ({"name": "SGD", "momentum": 0.9, "weight_decay": 5e-4}, 5, "expm",
     "SGD: momentum 0.9 at its steady state within each interval (step η/(1−β)), weight decay 0.0005"),
    ({"name": "SGD", "momentum": 0.9, "weight_decay": 0.0}, 1, "exact",
     "SGD: heavy-ball momentum 0.9 replayed exactly, step by step, no weight decay"),
    ({"name": "AdamW", "weight_decay": 0.05}, 5, "expm",
     "AdamW: preconditioner 1/(√v̂+ε) held over each interval between snapshots, first moment at its steady state, "
     "decoupled weight decay 0.05"),
    ({"name": "Adam", "weight_decay": 0.0}, 5, "expm",
     "Adam: preconditioner 1/(√v̂+ε) held over each interval between snapshots, first moment at its steady state, "
     "no weight decay"),
    ({"name": "AdamW", "weight_decay": 0.05, "betas": [0.9, 0.999], "eps": 1e-8}, 5, "expm",
     "AdamW: the exact adjoint of (θ, m, v) folded over each interval between snapshots, the state held at its end "
     "(β1 0.9, β2 0.999, ε 1e-08), decoupled weight decay 0.05"),
    ({"name": "Adam", "weight_decay": 0.0, "betas": [0.9, 0.99], "eps": 1e-8}, 1, "coarse",
     "Adam: the exact adjoint of (θ, m, v), step by step (β1 0.9, β2 0.99, ε 1e-08), no weight decay"),
    ({"name": "SGD", "momentum": 0.9, "nesterov": True, "weight_decay": 0.0}, 5, "expm",
     "SGD: Nesterov momentum 0.9 at its steady state within each interval (step η/(1−β)), no weight decay"),
    ({"name": "SGD", "momentum": 0.9, "nesterov": True, "weight_decay": 0.0}, 1, "coarse",
     "SGD: Nesterov momentum 0.9 replayed exactly, step by step, no weight decay"),
    ({"name": "SGD", "momentum": 0.9, "dampening": 0.5}, 5, "expm",
     "SGD (momentum 0.9, dampening 0.5) is not modelled: replayed as plain gradient descent with the recorded learning "
     "rates"),
    ({"name": "RMSprop", "alpha": 0.99}, 5, "expm",
     "RMSprop (alpha 0.99) is not modelled: replayed as plain gradient descent with the recorded learning rates"),
])
def test_the_replay_names_the_dynamics_it_models(optimizer, steps, curvature, said):
    assert modelled_dynamics(manifest(optimizer, steps), curvature)[1] == said


def _shapes():
    return {"emb.weight": (50, 8), "head.weight": (4, 8), "head.bias": (4,)}


def test_a_direction_spread_over_the_network_holds_little_in_its_largest_entries():
    direction = torch.randn(50 * 8 + 4 * 8 + 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    share, where = top_share(direction, _shapes())
    assert share < 0.2  # the largest 5 of 436 entries of a Gaussian vector
    stats = _stats(np.array([share, share]), np.array([where, where]), cosine=0.0)
    assert concentration(stats) is None


def test_a_direction_held_by_a_few_rows_is_measured_named_and_warned_of():
    """A preconditioner of 1e8 on two embedding rows that no example touched (Adam's v̂ = 0 there), as ψ = P λ."""
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(50 * 8 + 4 * 8 + 4, generator=gen, dtype=torch.float64)
    direction[3 * 8: 3 * 8 + 2] *= 1e8  # two entries of row 3 of emb.weight: under 1% of the entries
    share, where = top_share(direction, _shapes())
    assert share > 0.999 and where == "emb.weight rows [3]"
    report = concentration(_stats(np.array([0.2, share]), np.array(["head.weight", where]), cosine=1e-5))
    assert report["snapshots"] == [2] and report["parameter"] == "emb.weight rows [3]"
    assert f"{share:.1%} of ‖ψ‖² lies in its largest {TOP_FRACTION:.0%}" in report["warning"]
    assert "exceeds 1.0e-05" in report["warning"] and "its preconditioner 1/(√v̂+ε)" in report["warning"]
    # guards: just under the share, or cosines that did not collapse (a concentrated but healthy direction), say nothing
    assert concentration(_stats(np.array([TOP_SHARE_WARNING - 1e-9]), np.array([where]), cosine=1e-5)) is None
    assert concentration(_stats(np.array([0.99]), np.array([where]), cosine=COSINE_COLLAPSE * 1.01)) is None


def _stats(share: np.ndarray, param: np.ndarray, cosine: float = 0.5) -> ReplayStats:
    """Statistics over three pool examples whose largest whole-gradient |cosine| with ψ is ``cosine``."""
    T, zeros, ones = len(share), np.zeros((len(share), 3)), np.ones((len(share), 3))
    dot = np.tile([cosine, -cosine / 2, 0.0], (T, 1))
    return ReplayStats(dot=dot, grad_norm=ones, loss=zeros, margin=zeros, correct=zeros, el2n=zeros,
                       eta=np.ones(T), lambda_norm=np.ones(T), direction_norm=np.ones(T), participation=np.ones(T),
                       block_dot=zeros[..., None], block_sq=zeros[..., None], block_direction_norm=np.ones((T, 1)),
                       blocks=np.array(["all"]), direction_top_share=share, direction_top_param=param)


def test_the_top_share_survives_the_stats_file(tmp_path):
    stats = _stats(np.array([0.3, 0.95]), np.array(["a", "emb.weight rows [3, 7]"]))
    loaded = ReplayStats.load(stats.save(tmp_path / "stats.npz"))
    np.testing.assert_array_equal(loaded.direction_top_share, stats.direction_top_share)
    assert loaded.direction_top_param.tolist() == ["a", "emb.weight rows [3, 7]"]


def test_a_growing_costate_is_never_told_to_use_the_curvature_it_uses():
    from pmp_lightning.replay.costate import PROPAGATORS
    from pmp_lightning.replay.settings import CURVATURES, growth_advice

    assert set(CURVATURES) == set(PROPAGATORS)  # the light list the settings check reads is the replay's own

    assert "replay.curvature=expm" not in growth_advice("expm") and "data.source.scale=255" in growth_advice("expm")
    assert all("replay.curvature=expm" in growth_advice(c) for c in CURVATURES if c != "expm")


# ------------------------------------------------------------------ settings refused before any work
def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    from pmp_lightning.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("override, message", [
    ("+data.pool_sise=300", r"data.pool_sise is not a setting of pmp_lightning.data.labelled.PoolDataModule \(did you mean "
                            r"data.pool_size\?\); its settings: source, noise, pool_mode, pool_size"),
    ("+model.hiden=32", r"model.hiden is not a setting of pmp_lightning.models.classifiers.mlp \(did you mean model.hidden\?\)"),
    ("+trainer.max_epoch=3", r"trainer.max_epoch is not a setting of pytorch_lightning.Trainer \(did you mean "
                             r"trainer.max_epochs\?\)"),
    ("+data.downstream.sise=3", r"data.downstream.sise is not a setting of pmp_lightning.data.labelled.TrustedSet"),
])
def test_a_key_the_target_does_not_take_is_named_with_the_nearest_one(override, message):
    from pmp_lightning.config import check_settings

    extra = ["downstream=file", "data.downstream.source.path=x.npz"] if "downstream" in override else ["model=mlp"]
    with pytest.raises(SettingError, match=message):
        check_settings(_compose(*extra, override))


def test_every_shipped_experiment_passes_the_key_check():
    """Guards the check above against refusing what the project ships (a model's null shape settings included)."""
    from pmp_lightning.config import check_keys

    for name in sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")):
        check_keys(_compose(f"+experiment={name}"))
    for models in ("model=resnet", "model=vit", "model=logreg"):
        check_keys(_compose(models))


@pytest.mark.parametrize("override, message", [
    ("replay.curvature=expn", "unknown replay.curvature 'expn'; choose one of exact, coarse, none, expm"),
    ("replay.horizon=areas", "unknown replay.horizon 'areas'; choose one of area, terminal"),
])
def test_replay_settings_are_refused_with_the_settings(override, message):
    from pmp_lightning.config import check_settings

    with pytest.raises(ReplayConfigError, match=message):
        check_settings(_compose(override))


def test_a_curvature_typo_stops_the_command_before_any_data_or_training(tmp_path):
    out = subprocess.run([sys.executable, "run.py", "replay.curvature=expn", f"hydra.run.dir={tmp_path / 'run'}",
                          f"paths.cache_dir={tmp_path / 'cache'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "ReplayConfigError: unknown replay.curvature 'expn'" in out.stderr + out.stdout
    assert not (tmp_path / "cache").exists()  # nothing was set up, trained or cached


# ------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_a_target_document_of_bytes_the_pool_never_holds_leaves_the_cosines_whole(tmp_path, caplog, monkeypatch):
    """The new user's case: AdamW leaves v = 0 on the embedding rows of bytes that no training document holds, so its
    preconditioner is 1/ε = 1e8 there. J's target set holds such bytes (non-ASCII text), so ψ = P λ is huge on those
    rows, which no pool example's gradient touches. The replay reads ψ only where a training gradient reached
    (``Dynamics.reach``), so the whole-gradient cosines keep the size they have with target documents of the pool's own
    words. The guard: with ψ read everywhere (the replay before), every cosine collapses to about 1e-5 of that and
    the run warns of the concentration, naming the rows.
    (A byte that the pool holds only as the last byte of its lines, a target, never an input, counts as never seen.)"""
    from tests.test_user_corpus import compose_data, lines, write_jsonl

    from pmp_lightning.pipeline import run
    from pmp_lightning.replay.dynamics import Adam, ExactAdam, FoldedAdam

    pool = write_jsonl(tmp_path / "pool.jsonl", lines(0, 60))
    test = write_jsonl(tmp_path / "test.jsonl", lines(2, 8))  # a test file: every target line is J's
    rare = ["Größe für café, naïve façade, ñandú, 日本語 " * 3]
    results = {}

    def scored(kind, extra, cache):
        target = write_jsonl(tmp_path / f"target_{kind}.jsonl", [*lines(1, 30), *extra])
        cfg = compose_data(tmp_path / kind, "+experiment=code_lm", "data=jsonl", f"data.path={pool}",
                           f"data.downstream={target}", f"data.test={test}", "noise=none", "scoring=cosine",
                           cache=tmp_path / cache)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            metrics = run(cfg)
        cosine = np.abs(np.loadtxt(tmp_path / kind / "scores.csv", delimiter=",", skiprows=1, usecols=4,
                                   dtype=float)).max()
        results[kind] = (metrics, caplog.text, cosine)

    scored("rare", rare, "cache")
    scored("ascii", lines(9, 1), "cache")  # the pool's own words, its bytes all seen
    for cls in (Adam, ExactAdam, FoldedAdam):  # each Adam replay's line, the folded one's included
        monkeypatch.setattr(cls, "reach", lambda self, precond=None, moments=None: None)
    scored("everywhere", rare, "cache_everywhere")  # a cache of its own: the code differs, not the settings

    metrics, text, rare_cosine = results["rare"]
    assert metrics["costate"]["dynamics"].startswith("AdamW: the exact adjoint of (θ, m, v) folded")
    assert "pool 130 documents from 60 lines" in metrics["corpus_splits"]  # where the corpus's lines went
    _, _, ascii_cosine = results["ascii"]
    print(f"largest |cosine| summed over snapshots: rare {rare_cosine:.3g}, ascii {ascii_cosine:.3g}, "
          f"rare read everywhere {results['everywhere'][2]:.3g}")
    assert 0.3 < rare_cosine / ascii_cosine < 3, (rare_cosine, ascii_cosine)  # the same order
    assert "concentration" not in metrics["costate"] and "dominate" not in text
    metrics, text, everywhere = results["everywhere"]  # the guard
    assert everywhere < 1e-4 * ascii_cosine
    found = metrics["costate"]["concentration"]
    assert max(found["share"]) > TOP_SHARE_WARNING and found["parameter"].startswith("tokens.weight rows [")
    assert "a few parameters dominate the replayed direction" in text
