"""The replay's raw score equals −N ∂J_total/∂γ_n from autograd through the unrolled training.

float64, a tiny MLP, full-batch gradient descent with a changing learning rate, a snapshot after
every step; both J forms. Training runs through Lightning with the ThetaSnapshot callback and the
replay through its own Trainer, exactly as the pipeline runs them.
"""
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.func import functional_call

from callbacks.theta_snapshot import ThetaSnapshot, load_manifest, load_snapshot
from pmp_lightning.data import LabelNoise, PoolDataModule
from pmp_lightning.models import Classifier, mlp
from pmp_lightning.replay import ReplayModule
from pmp_lightning.scores import compute_scores
from tests.conftest import RandomSource, fit_replay

N_POOL, STEPS = 24, 6


def _train(tmp_path):
    pl.seed_everything(0)
    dm = PoolDataModule(
        RandomSource(n=N_POOL + 9, dtype=torch.float64), LabelNoise("symmetric", 0.25, seed=1),
        pool_size=N_POOL, downstream_size=8, test_size=1, batch_size=N_POOL,
    )
    dm.setup()
    net = mlp(num_classes=10, in_features=4, hidden=6)
    classifier = Classifier(
        net,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.8),
        lr_schedule=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    )
    trainer = pl.Trainer(
        max_epochs=STEPS, precision="64-true", callbacks=[ThetaSnapshot(tmp_path / "snapshots", every_n_epochs=None, every_n_steps=1)],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(classifier, datamodule=dm)
    return dm, net


def _autograd_reference(dm, net, snapshot_dir, objective):
    manifest = load_manifest(snapshot_dir)
    states = [load_snapshot(snapshot_dir, s) for s in manifest["snapshots"]]
    etas = [s["lr_sum"] for s in manifest["snapshots"][1:]]
    strip = lambda st: {k[len("net."):]: v.double() for k, v in st.items()}  # noqa: E731
    x, y = dm.pool.x.double(), dm.pool.y
    xd, yd = dm.downstream.x.double(), dm.downstream.y

    def loss(params, x, y, reduction="mean"):
        return F.cross_entropy(functional_call(net, params, (x,)), y, reduction=reduction)

    gamma = torch.ones(N_POOL, dtype=torch.float64, requires_grad=True)
    theta = {k: v.clone().requires_grad_(True) for k, v in strip(states[0]).items()}
    j_values = []
    for t, eta in enumerate(etas):
        train_loss = (gamma * loss(theta, x, y, reduction="none")).mean()
        grads = torch.autograd.grad(train_loss, list(theta.values()), create_graph=True)
        theta = {k: p - eta * g for (k, p), g in zip(theta.items(), grads)}
        # the callback recorded the trajectory that was actually trained
        for k, v in strip(states[t + 1]).items():
            torch.testing.assert_close(theta[k].detach(), v, rtol=1e-12, atol=1e-12)
        j_values.append(loss(theta, xd, yd))
    j_total = sum(j_values) if objective == "area" else j_values[-1]
    return (-N_POOL * torch.autograd.grad(j_total, gamma)[0]).numpy()


@pytest.mark.parametrize("objective", ["area", "terminal"])
def test_replay_matches_autograd_through_unrolled_training(tmp_path, objective):
    dm, net = _train(tmp_path)
    manifest = load_manifest(tmp_path / "snapshots")
    assert len(manifest["snapshots"]) == STEPS + 1
    assert [s["lr_sum"] for s in manifest["snapshots"][1:]] == pytest.approx([0.8, 0.8, 0.4, 0.4, 0.2, 0.2])

    replay = ReplayModule(
        mlp(num_classes=10, in_features=4, hidden=6), tmp_path / "snapshots", dm.pool, dm.downstream, dm.train_set,
        curvature="exact", objective=objective, hvp_samples=None, batch_size=7,  # 7: several chunks per pass
    )
    fit_replay(replay, tmp_path)
    s = compute_scores(["raw"], replay.results())["raw"]

    reference = _autograd_reference(dm, net, tmp_path / "snapshots", objective)
    rel = np.abs(s - reference).max() / np.abs(reference).max()
    print(f"J={objective}: max relative error {rel:.2e}")
    assert rel < 1e-9, rel
    assert np.abs(reference).max() > 1e-3  # the identity is not trivially 0 = 0


def test_dropping_the_hessian_term_breaks_the_identity(tmp_path):
    """Guards the test above: the same comparison fails when the curvature term is left out."""
    dm, net = _train(tmp_path)
    replay = ReplayModule(mlp(num_classes=10, in_features=4, hidden=6), tmp_path / "snapshots", dm.pool, dm.downstream,
                          dm.train_set, curvature="none", hvp_samples=None)
    fit_replay(replay)
    s = compute_scores(["raw"], replay.results())["raw"]
    reference = _autograd_reference(dm, net, tmp_path / "snapshots", "area")
    assert np.abs(s - reference).max() / np.abs(reference).max() > 1e-6


def test_the_replay_runs_the_network_without_dropout(tmp_path):
    dm, _ = _train(tmp_path)

    def with_dropout():
        net = mlp(num_classes=10, in_features=4, hidden=6)
        return torch.nn.Sequential(*net, torch.nn.Dropout(0.5))  # appended: parameter names unchanged

    replay = ReplayModule(with_dropout(), tmp_path / "snapshots", dm.pool, dm.downstream, dm.train_set, curvature="none")
    assert replay.net.training  # as built: Lightning itself never switches it
    fit_replay(replay)
    net = with_dropout().double().eval()
    state = load_snapshot(tmp_path / "snapshots", load_manifest(tmp_path / "snapshots")["snapshots"][0])
    net.load_state_dict({k[len("net."):]: v for k, v in state.items()})
    expected = F.cross_entropy(net(dm.pool.x.double()), dm.pool.y, reduction="none").detach().numpy()
    np.testing.assert_allclose(replay.results().loss[0], expected, rtol=1e-12)
