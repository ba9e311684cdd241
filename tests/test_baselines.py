"""The baselines read the trained trajectory θ_1..θ_T: the final model counts, the random initialisation does not."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pmp_lightning.trajectory import load_manifest, load_snapshot
from pmp_lightning.models.classifiers import mlp
from pmp_lightning.replay.module import ReplayModule
from pmp_lightning.scores.registry import compute_scores
from tests.conftest import fit_replay


def _per_snapshot(dm, snaps):
    """Loss, margin and correctness of every pool example at every snapshot θ_0..θ_T, from the snapshot files."""
    net = mlp(in_features=4, hidden=5).eval()
    rows = []
    for entry in load_manifest(snaps)["snapshots"]:
        net.load_state_dict({k[len("net."):]: v for k, v in load_snapshot(snaps, entry).items()})
        with torch.no_grad():
            z = net(dm.pool.x)
        y = dm.pool.y
        others = z.scatter(1, y[:, None], float("-inf")).max(1).values
        rows.append((F.cross_entropy(z, y, reduction="none").numpy(), (z.gather(1, y[:, None]).squeeze(1) - others).numpy(),
                     (z.argmax(1) == y).numpy()))
    return [np.stack(r) for r in zip(*rows)]


def test_the_baselines_average_over_the_trained_snapshots(trained):
    dm, snaps = trained  # 2 epochs: θ_0 (random), θ_1, θ_2 (the trained model)
    replay = fit_replay(ReplayModule(mlp(in_features=4, hidden=5), snaps, dm.pool, dm.downstream, dm.train_set, curvature="none"))
    stats = replay.results()
    assert stats.dot.shape == stats.grad_norm.shape == (2, 24) and stats.loss.shape == stats.margin.shape == (3, 24)
    loss, margin, correct = _per_snapshot(dm, snaps)
    np.testing.assert_allclose(stats.loss, loss, rtol=1e-5)  # θ_T's row is the final model's
    scores = compute_scores(["loss", "aum", "forgetting", "grand"], stats)
    np.testing.assert_allclose(scores["loss"], -loss[1:].mean(0), rtol=1e-5)
    np.testing.assert_allclose(scores["aum"], margin[1:].mean(0), rtol=1e-5, atol=1e-6)
    learned = correct[1:]
    expected = np.where(~learned.any(0), 2, (learned[:-1] & ~learned[1:]).sum(0))
    np.testing.assert_array_equal(scores["forgetting"], -expected)
    assert not np.allclose(scores["loss"], -loss[:-1].mean(0))  # the old window θ_0..θ_{T-1} differs here
    np.testing.assert_allclose(scores["grand"], -stats.grad_norm.mean(0))  # gradients where each step starts


def test_one_epoch_means_the_trained_model_not_the_initialisation(trained, tmp_path):
    import pytorch_lightning as pl

    from callbacks.theta_snapshot import ThetaSnapshot
    from pmp_lightning.training import Classifier

    dm, _ = trained
    pl.seed_everything(0)
    model = Classifier(mlp(in_features=4, hidden=5), optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    pl.Trainer(max_epochs=1, callbacks=[ThetaSnapshot(tmp_path / "one")], logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(model, datamodule=dm)
    stats = fit_replay(ReplayModule(mlp(in_features=4, hidden=5), tmp_path / "one", dm.pool, dm.downstream, dm.train_set,
                                    curvature="none")).results()
    with torch.no_grad():
        final = F.cross_entropy(model.net.eval()(dm.pool.x), dm.pool.y, reduction="none").numpy()
    np.testing.assert_allclose(compute_scores(["loss"], stats)["loss"], -final, rtol=1e-5)
    assert stats.trained("loss").shape == (1, 24)


@pytest.mark.parametrize("name", ["raw", "cosine", "unit_grad", "clip", "relative"])
def test_pmp_variants_read_the_snapshots_the_costate_scores(trained, name):
    """The PMP variants pair ⟨λ_{t+1}, ∇l_n(θ_t)⟩ with ‖∇l_n(θ_t)‖ of the same θ_t, t = 0..T-1."""
    dm, snaps = trained
    stats = fit_replay(ReplayModule(mlp(in_features=4, hidden=5), snaps, dm.pool, dm.downstream, dm.train_set,
                                    curvature="none")).results()
    assert stats.grad_norm.shape == stats.dot.shape
    if name == "cosine":
        expected = (stats.dot / (stats.lambda_norm[:, None] * stats.grad_norm)).sum(0)
        np.testing.assert_allclose(compute_scores([name], stats)[name], expected)
    assert np.isfinite(compute_scores([name], stats)[name]).all()
