"""The downstream objectives and the saturation diagnostic (pmp_lightning/replay/costate.py)."""
import pytest
import torch

from pmp_lightning.replay.costate import OBJECTIVES, describe, logit_weights, objective, participation
from pmp_lightning.errors import ReplayConfigError


def _logit_grad(fn, z, y):
    z = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(z, y).sum(), z)
    return g


def _fitted_and_misfit():
    """Four examples of class 0: two fitted with large margins, two misfit."""
    z = torch.tensor([[12.0, 0, 0], [9.0, 1, 0], [0.0, 2, 0], [1.0, 0, 3]], dtype=torch.float64)
    return z, torch.zeros(4, dtype=torch.long)


def test_ce_saturates_and_the_others_do_not():
    z, y = _fitted_and_misfit()
    ce = logit_weights(objective("ce"), z, y)
    assert ce[:2].max() < 1e-3 < 0.5 < ce[2:].min()  # fitted examples stop pulling on ∇J
    assert participation(float(ce.sum()), float(ce.pow(2).sum()), 4) < 0.55  # about 2 of 4 carry it
    for name in ("logit_gap", "margin", "unit_ce"):
        w = logit_weights(objective(name), z, y)
        assert w.min() >= (1 - 1 / 3) ** 0.5 - 1e-12, name  # ‖∂l/∂z‖ ≥ √(1 − 1/K) whether fitted or not
    gap = logit_weights(objective("logit_gap"), z, y)
    assert participation(float(gap.sum()), float(gap.pow(2).sum()), 4) == pytest.approx(1.0)


def test_unit_ce_keeps_the_direction_of_ce_at_unit_length():
    z, y = _fitted_and_misfit()
    ce, unit = _logit_grad(objective("ce"), z, y), _logit_grad(objective("unit_ce"), z, y)
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(unit, ce / ce.norm(dim=1, keepdim=True))


def test_unit_ce_stays_finite_when_p_y_rounds_to_one():
    z = torch.tensor([[200.0, 0.0, 0.0]])  # float32: p_y is exactly 1
    g = _logit_grad(objective("unit_ce"), z, torch.zeros(1, dtype=torch.long))
    assert torch.isfinite(g).all()


def test_tempered_ce_tends_to_the_logit_gap():
    z, y = _fitted_and_misfit()
    gap = _logit_grad(objective("logit_gap"), z, y)
    errors = [float((_logit_grad(objective("tempered_ce", temperature=t), z, y) - gap).abs().max()) for t in (1, 10, 1000)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-2


def test_participation_counts_the_examples_that_carry_the_gradient():
    assert participation(4.0, 4.0, 4) == 1.0  # four equal weights
    assert participation(1.0, 1.0, 4) == 0.25  # one weight, three zeros
    assert participation(0.0, 0.0, 4) == 0.0


@pytest.mark.parametrize(("name", "params", "message"), [
    ("entropy", {}, "unknown objective 'entropy'; choose one of ce"),
    ("ce", {"temperature": 2.0}, r"objective=ce takes the setting\(s\) none"),
    ("tempered_ce", {}, r"objective=tempered_ce takes the setting\(s\) \['temperature'\], got none"),
    ("tempered_ce", {"temperature": -1.0}, "objective.temperature=-1.0; give a positive number"),
    ("tempered_ce", {"temperature": "abc"}, "objective.temperature='abc'; give a positive number"),
])
def test_bad_objective_settings_name_the_fix(name, params, message):
    with pytest.raises(ReplayConfigError, match=message):
        objective(name, **params)


def test_every_objective_is_named_with_its_settings():
    assert describe(objective("tempered_ce", temperature=8)) == "tempered_ce(temperature=8.0)"
    assert {describe(objective(n, **({"temperature": 2} if n == "tempered_ce" else {}))).split("(")[0] for n in OBJECTIVES} == set(OBJECTIVES)


@pytest.mark.parametrize(("pool", "expected"), [("train", "unit_ce"), ("holdout", "logit_gap"), ("test", "logit_gap")])
def test_the_default_objective_follows_what_the_pool_is(pool, expected):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pmp_lightning.config import register_configs
    from tests.test_pipeline import ROOT

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=noisy_mnist", f"pool={pool}"])
        chosen = compose("config", overrides=["+experiment=noisy_mnist", f"pool={pool}", "objective=ce"])
    assert OmegaConf.to_container(cfg.objective, resolve=True)["name"] == expected
    assert chosen.objective.name == "ce"  # a named objective wins


@pytest.mark.parametrize("name", ["logit_gap", "unit_ce", "ce"])
def test_a_centred_objective_gives_the_output_bias_no_gradient(name):
    """Centring removes the mean logit pull: shifting every logit by the same vector (the output bias) no longer
    changes J, while the plain J does move with it."""
    from pmp_lightning.replay.costate import centred_values, logit_pulls

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).double()
    x, y = torch.randn(30, 5, dtype=torch.float64), torch.randint(0, 4, (30,))
    obj = objective(name, centred=True)
    with torch.no_grad():
        mean_pull = logit_pulls(obj, net(x), y).mean(0)
    (centred_bias,) = torch.autograd.grad(centred_values(obj, net(x), y, mean_pull).mean(), net[2].bias)
    (plain_bias,) = torch.autograd.grad(centred_values(obj, net(x), y, None).mean(), net[2].bias)
    assert centred_bias.abs().max() < 1e-14 < plain_bias.abs().max()
    assert describe(obj) == f"{name}, centred" and describe(objective(name)) == name


def test_centred_takes_a_boolean():
    with pytest.raises(ReplayConfigError, match=r"objective.centred='yes'; give true or false"):
        objective("unit_ce", centred="yes")


@pytest.mark.slow
def test_diagnose_splits_the_dot_product_by_layer_for_the_plain_and_the_centred_j(tmp_path):
    """A finished run's ⟨∇J, ∇l_n⟩ at θ_T, per layer, for both forms of its objective (python -m pmp_lightning.report.diagnose)."""
    import subprocess
    import sys

    from pmp_lightning.report.diagnose import diagnose
    from tests.test_pipeline import ROOT, SMALL

    done = subprocess.run([sys.executable, "run.py", *SMALL, "trainer.max_epochs=2", "scoring=cosine", f"hydra.run.dir={tmp_path / 'run'}",
                           f"paths.cache_dir={tmp_path / 'cache'}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = diagnose(tmp_path / "run")
    assert report["snapshot"] == 2 and set(report) == {"snapshot", "unit_ce", "unit_ce, centred"}
    for variant in ("unit_ce", "unit_ce, centred"):
        rows = report[variant]["layers"]
        assert [r["layer"] for r in rows] == ["1 (Linear)", "3 (Linear)"]
        assert sum(r["share"] for r in rows) == pytest.approx(1.0)
        assert all(0.0 <= r["auroc"] <= 1.0 for r in rows)
    assert report["unit_ce"]["mean_pull_norm"] == report["unit_ce, centred"]["mean_pull_norm"] > 0
    shown = subprocess.run([sys.executable, "-m", "pmp_lightning.report.diagnose", str(tmp_path / "run")], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert "J = unit_ce, centred at θ_2: mean logit pull ‖w̄‖ = " in shown.stdout and ", removed" in shown.stdout
    assert "AUROC alone" in shown.stdout and (tmp_path / "run" / "diagnose.png").stat().st_size > 1000
    from pmp_lightning.report.diagnose import block_picture

    rows, _ = block_picture(tmp_path / "run")
    assert [r["block"] for r in rows] == ["1", "3"] and sum(r["share"] for r in rows) == pytest.approx(1.0)
    missing = subprocess.run([sys.executable, "-m", "pmp_lightning.report.diagnose", str(tmp_path / "nowhere")], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "is not a finished run directory" in missing.stderr

    # a snapshot the run does not have, and a run whose cache entry was deleted: one line each, no traceback
    cmd = [sys.executable, "-m", "pmp_lightning.report.diagnose", str(tmp_path / "run")]
    done = subprocess.run([*cmd, "--snapshot", "7"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--snapshot 7 is not a snapshot of this run, which has θ_0 … θ_2; give 0 to 2, or -1 for the last" in done.stderr
    import shutil

    shutil.rmtree((tmp_path / "run" / "snapshots").resolve().parent)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "points at the train cache entry" in done.stderr and "which no longer exists" in done.stderr
