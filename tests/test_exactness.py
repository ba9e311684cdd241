"""The replay's raw score equals −N ∂J_total/∂γ_n from autograd through the unrolled training.

float64, a tiny MLP, full-batch gradient descent with a changing learning rate, a snapshot after
every step; every registered downstream objective, both horizons. Training runs through Lightning
with the ThetaSnapshot callback and the replay through its own Trainer, exactly as the pipeline runs them.
"""
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from callbacks.theta_snapshot import ThetaSnapshot
from pmp_lightning.trajectory import load_manifest, load_snapshot
from pmp_lightning.replay.costate import OBJECTIVES, objective
from pmp_lightning.data.labelled import PoolDataModule
from pmp_lightning.data.noise import LabelNoise
from pmp_lightning.models.classifiers import mlp
from pmp_lightning.training import Classifier
from pmp_lightning.replay.module import ReplayModule
from pmp_lightning.scores.registry import compute_scores
from tests.conftest import RandomSource, fit_replay

N_POOL, STEPS = 24, 6
ROOT = Path(__file__).resolve().parents[1]
PARAMS = {"tempered_ce": {"temperature": 3.0}}  # settings for the objectives that take one


def _objective(name, centred=False):
    return objective(name, centred=centred, **PARAMS.get(name, {}))


class Normed(torch.nn.Module):
    """LayerNorm and GroupNorm between linear layers: a normalisation model (examples stay independent in training)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Tanh(),
                                       torch.nn.Unflatten(1, (4, 2)), torch.nn.GroupNorm(2, 4), torch.nn.Flatten(),
                                       torch.nn.Linear(8, 10))

    def forward(self, x):
        return self.net(x)


class Attention(torch.nn.Module):
    """Tokens from a linear map, a learned position embedding held as a bare parameter, one multi-head self-attention
    layer with a pre-norm, mean pooling, a linear head: an attention model."""

    def __init__(self):
        super().__init__()
        self.tokens = torch.nn.Linear(4, 12)
        self.pos = torch.nn.Parameter(0.1 * torch.randn(1, 3, 4))
        self.norm = torch.nn.LayerNorm(4)
        self.attn = torch.nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = torch.nn.Linear(4, 10)

    def forward(self, x):
        h = self.tokens(x.flatten(1)).reshape(len(x), 3, 4) + self.pos
        a = self.norm(h)
        return self.head((h + self.attn(a, a, a, need_weights=False)[0]).mean(1))


MODELS = {"mlp": lambda: mlp(num_classes=10, in_features=4, hidden=6), "normed": Normed, "attention": Attention,
          "gated": lambda: Gated()}


def _train(tmp_path, model="mlp", momentum=0.0, weight_decay=0.0, optimizer=None, nesterov=False, callbacks=()):
    pl.seed_everything(0)
    dm = PoolDataModule(
        RandomSource(n=N_POOL + 9, dtype=torch.float64), LabelNoise("symmetric", 0.25, seed=1),
        pool_size=N_POOL, downstream_size=8, test_size=1, batch_size=N_POOL,
    )
    dm.setup()
    net = MODELS[model]()
    classifier = Classifier(
        net,
        optimizer=optimizer or (lambda params: torch.optim.SGD(params, lr=0.8 * (1 - momentum), momentum=momentum,
                                                               weight_decay=weight_decay, nesterov=nesterov)),
        lr_schedule=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    )
    trainer = pl.Trainer(
        max_epochs=STEPS, precision="64-true",
        callbacks=[*callbacks, ThetaSnapshot(tmp_path / "snapshots", every_n_epochs=None, every_n_steps=1)],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(classifier, datamodule=dm)
    return dm, net


def _autograd_reference(dm, net, snapshot_dir, horizon, j_fn, momentum=0.0, weight_decay=0.0, nesterov=False):
    """−N ∂J_total/∂γ_n, J_total built from the downstream mean of ``j_fn`` written out independently of the replay
    (second derivatives through attention need the math attention kernel)."""
    with sdpa_kernel(SDPBackend.MATH):
        return _unrolled(dm, net, snapshot_dir, horizon, j_fn, momentum, weight_decay, nesterov)


def _unrolled(dm, net, snapshot_dir, horizon, j_fn, momentum, weight_decay, nesterov=False):
    """Training unrolled as torch.optim.SGD runs it: g = ∇L(θ; γ) + wθ, v ← βv + g (v = g at the first step), θ ← θ − ηv,
    or with Nesterov momentum θ ← θ − η (g + βv)."""
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
    buffer = {k: torch.zeros_like(v) for k, v in theta.items()}
    j_values = []
    for t, eta in enumerate(etas):
        train_loss = (gamma * loss(theta, x, y, reduction="none")).mean()
        grads = torch.autograd.grad(train_loss, list(theta.values()), create_graph=True)
        decayed = {k: g + weight_decay * theta[k] for k, g in zip(theta, grads)}
        buffer = {k: momentum * buffer[k] + decayed[k] for k in theta}
        moved = {k: decayed[k] + momentum * buffer[k] for k in theta} if nesterov else buffer
        theta = {k: p - eta * moved[k] for k, p in theta.items()}
        # the callback recorded the trajectory that was actually trained
        for k, v in strip(states[t + 1]).items():
            torch.testing.assert_close(theta[k].detach(), v, rtol=1e-12, atol=1e-12)
        j_values.append(j_fn(functional_call(net, theta, (xd,)), yd).mean())
    j_total = sum(j_values) if horizon == "area" else j_values[-1]
    return (-N_POOL * torch.autograd.grad(j_total, gamma)[0]).numpy()


# the objectives written out by hand, not through pmp_lightning.replay.costate: the reference must not share the replay's code
REFERENCE_J = {
    "ce": lambda z, y: F.cross_entropy(z, y, reduction="none"),
    "tempered_ce": lambda z, y: 3.0 * F.cross_entropy(z / 3.0, y, reduction="none"),
    "logit_gap": lambda z, y: z.mean(1) - z[torch.arange(len(y)), y],
    "margin": lambda z, y: torch.stack([torch.cat([r[:k], r[k + 1:]]).max() for r, k in zip(z, y)]) - z[torch.arange(len(y)), y],
    "log_odds": lambda z, y: -torch.log(z.softmax(1)[torch.arange(len(y)), y] / (1 - z.softmax(1)[torch.arange(len(y)), y])),
    "unit_ce": lambda z, y: F.cross_entropy(z, y, reduction="none")
    / (z.softmax(1) - F.one_hot(y, z.shape[1])).norm(dim=1).detach(),
}


def centred_reference(j_fn):
    """j_m − w̄ᵀz_m with w̄ = mean_m ∂j_m/∂z_m at the current θ, held constant (the centred J, written out)."""

    def fn(z, y):
        z_const = z.detach().requires_grad_(True)
        (pulls,) = torch.autograd.grad(j_fn(z_const, y).sum(), z_const)
        return j_fn(z, y) - (z * pulls.mean(0)).sum(1)

    return fn


def test_every_objective_has_a_reference():
    assert set(REFERENCE_J) == set(OBJECTIVES)


def _identity_error(tmp_path, name, horizon, centred):
    """The replay's raw score against −N ∂J_total/∂γ_n: the largest relative difference."""
    dm, net = _train(tmp_path)
    manifest = load_manifest(tmp_path / "snapshots")
    assert len(manifest["snapshots"]) == STEPS + 1
    assert [s["lr_sum"] for s in manifest["snapshots"][1:]] == pytest.approx([0.8, 0.8, 0.4, 0.4, 0.2, 0.2])

    replay = ReplayModule(
        mlp(num_classes=10, in_features=4, hidden=6), tmp_path / "snapshots", dm.pool, dm.downstream, dm.train_set,
        curvature="exact", horizon=horizon, objective=_objective(name, centred), hvp_samples=None, batch_size=7,  # 7: several chunks
    )
    fit_replay(replay, tmp_path)
    s = compute_scores(["raw"], replay.results())["raw"]

    j_fn = centred_reference(REFERENCE_J[name]) if centred else REFERENCE_J[name]
    reference = _autograd_reference(dm, net, tmp_path / "snapshots", horizon, j_fn)
    assert np.abs(reference).max() > 1e-3  # the identity is not trivially 0 = 0
    rel = np.abs(s - reference).max() / np.abs(reference).max()
    print(f"J={horizon} of {name}{', centred' if centred else ''}: max relative error {rel:.2e}")
    return rel


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
@pytest.mark.parametrize("horizon", ["area", "terminal"])
@pytest.mark.parametrize("centred", [False, True], ids=["plain", "centred"])
def test_replay_matches_autograd_through_unrolled_training(tmp_path, horizon, name, centred):
    assert _identity_error(tmp_path, name, horizon, centred) < 1e-9


@pytest.mark.parametrize(("name", "centred"), [("ce", False), ("unit_ce", True)], ids=["paper", "default"])
def test_the_identity_for_the_papers_and_the_default_objective(tmp_path, name, centred):
    """The fast tier's share of the case matrix above: the paper's J and the default J on the training pool."""
    assert _identity_error(tmp_path, name, "area", centred) < 1e-9


@pytest.mark.parametrize("model", ["normed", "attention"])
@pytest.mark.parametrize("name", [pytest.param("ce", marks=pytest.mark.slow), "logit_gap"])
def test_the_identity_holds_for_normalisation_and_attention_models(tmp_path, model, name):
    """The same comparison on a LayerNorm/GroupNorm model and on a multi-head attention model with a bare position
    parameter: the per-example statistics of their rules (and of the written-out attention) enter the exact identity."""
    dm, net = _train(tmp_path, model)
    pl.seed_everything(1)
    replay = ReplayModule(MODELS[model](), tmp_path / "snapshots", dm.pool, dm.downstream, dm.train_set, curvature="exact",
                          objective=_objective(name, centred=True), hvp_samples=None, batch_size=7)
    fit_replay(replay, tmp_path)
    s = compute_scores(["raw"], replay.results())["raw"]
    reference = _autograd_reference(dm, net, tmp_path / "snapshots", "area", centred_reference(REFERENCE_J[name]))
    rel = np.abs(s - reference).max() / np.abs(reference).max()
    print(f"{model}, J = area of {name}, centred: max relative error {rel:.2e}")
    assert rel < 1e-9, rel
    assert np.abs(reference).max() > 1e-3


MOMENTUM, DECAY = 0.9, 0.05


def _momentum_error(tmp_path, dynamics=None, nesterov=False):
    """The replay's raw score on a heavy-ball (or Nesterov) trajectory with weight decay, against −N ∂J_total/∂γ_n;
    ``dynamics`` replaces what the replay read from the snapshots (the guards)."""
    dm, net = _train(tmp_path, momentum=MOMENTUM, weight_decay=DECAY, nesterov=nesterov)
    replay = ReplayModule(mlp(num_classes=10, in_features=4, hidden=6), tmp_path / "snapshots", dm.pool, dm.downstream,
                          dm.train_set, curvature="exact", objective=_objective("unit_ce", True), hvp_samples=None, batch_size=7)
    assert replay.dynamics.heavy_ball and (replay.dynamics.momentum, replay.dynamics.weight_decay) == (MOMENTUM, DECAY)
    if dynamics is not None:
        replay.dynamics = dynamics
        replay.eta = dynamics.step_sizes(np.array([s["lr_sum"] for s in replay.manifest["snapshots"][1:]]))
    fit_replay(replay, tmp_path)
    s = compute_scores(["raw"], replay.results())["raw"]
    reference = _autograd_reference(dm, net, tmp_path / "snapshots", "area", centred_reference(REFERENCE_J["unit_ce"]),
                                    MOMENTUM, DECAY, nesterov)
    assert np.abs(reference).max() > 1e-3
    rel = np.abs(s - reference).max() / np.abs(reference).max()
    print(f"momentum {MOMENTUM}, weight decay {DECAY}: max relative error {rel:.2e}")
    return rel


def test_the_identity_holds_under_momentum_and_weight_decay(tmp_path):
    """SGD with heavy-ball momentum and weight decay (full batch, a snapshot per step): the adjoint of (θ, v) gives
    the exact −N ∂J_total/∂γ_n, as plain gradient descent does."""
    assert _momentum_error(tmp_path) < 1e-9


@pytest.mark.parametrize("wrong", ["no_momentum", "no_weight_decay", "steady_state"])
def test_leaving_out_momentum_or_weight_decay_breaks_the_identity(tmp_path, wrong):
    """Guards the test above: the same trajectory replayed as if it had no momentum, no weight decay, or with the
    steady-state approximation instead of the exact adjoint, misses the reference."""
    from pmp_lightning.replay.dynamics import SGD

    dynamics = {"no_momentum": SGD(DECAY, 0.0), "no_weight_decay": SGD(0.0, MOMENTUM, exact_momentum=True),
                "steady_state": SGD(DECAY, MOMENTUM, exact_momentum=False)}[wrong]
    assert _momentum_error(tmp_path, dynamics) > 1e-3


def test_the_identity_holds_under_nesterov_momentum(tmp_path):
    """SGD with Nesterov momentum and weight decay, the optimizer added as one class (``replay.dynamics.NesterovSGD``)
    and one yaml (conf/optimizer/nesterov.yaml): its adjoint of (θ, v) gives the exact −N ∂J_total/∂γ_n."""
    from pmp_lightning.replay.dynamics import NesterovSGD

    dm, _ = _train(tmp_path / "probe", momentum=MOMENTUM, weight_decay=DECAY, nesterov=True)
    replay = ReplayModule(mlp(num_classes=10, in_features=4, hidden=6), tmp_path / "probe" / "snapshots", dm.pool,
                          dm.downstream, dm.train_set, curvature="exact", hvp_samples=None)
    assert isinstance(replay.dynamics, NesterovSGD) and replay.dynamics.heavy_ball
    assert _momentum_error(tmp_path / "run", nesterov=True) < 1e-9


def test_a_nesterov_trajectory_replayed_as_heavy_ball_misses_the_identity(tmp_path):
    """Guards the test above: the same trajectory replayed with the heavy ball's direction misses the reference."""
    from pmp_lightning.replay.dynamics import SGD

    assert _momentum_error(tmp_path, SGD(DECAY, MOMENTUM, exact_momentum=True), nesterov=True) > 1e-3


def test_the_nesterov_config_is_the_optimizer_the_test_checks():
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "conf" / "optimizer" / "nesterov.yaml")
    assert cfg._target_ == "torch.optim.SGD" and cfg.nesterov is True and cfg.momentum > 0 and not cfg.get("dampening")


ADAM = {"lr": 0.05, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}


def _adam_reference(dm, net, snapshot_dir, kind, late=None):
    """−N ∂J_total/∂γ_n (J: the area of the downstream mean CE) through Adam or AdamW unrolled as torch.optim runs it:
    g = ∇L(θ; γ) (+ wθ for Adam), θ ← (1 − ηw)θ for AdamW, m ← β1 m + (1−β1) g, v ← β2 v + (1−β2) g²,
    θ ← θ − η m̂/(√v̂ + ε). The square root is taken of v̂ + 1e-300, so that a row with v = 0 has a finite derivative
    (its value moves by 1e-150 at most). ``late``: (parameter, step) whose gradient is held at 0 before that step, as
    ``Gated`` does in training."""
    manifest = load_manifest(snapshot_dir)
    states = [{k[len("net."):]: v.double() for k, v in load_snapshot(snapshot_dir, s).items()} for s in manifest["snapshots"]]
    etas = [s["lr_sum"] for s in manifest["snapshots"][1:]]
    (beta1, beta2), eps, decay = ADAM["betas"], ADAM["eps"], ADAM["weight_decay"]
    x, y, xd, yd = dm.pool.x.double(), dm.pool.y, dm.downstream.x.double(), dm.downstream.y
    names = [n for n, _ in net.named_parameters()]
    gamma = torch.ones(N_POOL, dtype=torch.float64, requires_grad=True)
    theta = {k: states[0][k].clone().requires_grad_(True) for k in names}
    m = {k: torch.zeros_like(v) for k, v in theta.items()}
    v2 = {k: torch.zeros_like(v) for k, v in theta.items()}
    j_total = 0.0
    for step, eta in enumerate(etas, start=1):
        buffers = {k: b for k, b in states[step - 1].items() if k not in theta}
        train_loss = (gamma * F.cross_entropy(functional_call(net, {**theta, **buffers}, (x,)), y, reduction="none")).mean()
        grads = dict(zip(names, torch.autograd.grad(train_loss, list(theta.values()), create_graph=True)))
        new = {}
        for k in names:
            g = grads[k] + (decay * theta[k] if kind == "Adam" else 0.0)
            p = theta[k] * (1 - eta * decay) if kind == "AdamW" else theta[k]
            m[k] = beta1 * m[k] + (1 - beta1) * g
            v2[k] = beta2 * v2[k] + (1 - beta2) * g * g
            hat_m, hat_v = m[k] / (1 - beta1**step), v2[k] / (1 - beta2**step)
            new[k] = p - eta * hat_m / ((hat_v + 1e-300).sqrt() + eps)
        theta = new
        for k in names:  # the callback recorded the trajectory torch's Adam trained
            torch.testing.assert_close(theta[k].detach(), states[step][k], rtol=1e-10, atol=1e-12)
        buffers = {k: b for k, b in states[step].items() if k not in theta}
        j_total = j_total + F.cross_entropy(functional_call(net, {**theta, **buffers}, (xd,)), yd)
    return (-N_POOL * torch.autograd.grad(j_total, gamma)[0]).numpy()


class Gated(torch.nn.Module):
    """An MLP with one more output bias that joins only from step ``LATE`` on (its gate, a buffer, turns 1 then): a
    parameter row that receives its first gradient late in training, as a rare token's row does. Adam's v is 0 there
    until then, so the frozen preconditioner is 1/ε on it."""

    LATE = 3

    def __init__(self):
        super().__init__()
        self.body = mlp(num_classes=10, in_features=4, hidden=6)
        self.late = torch.nn.Parameter(torch.zeros(10))
        self.register_buffer("gate", torch.zeros(()))

    def forward(self, x):
        return self.body(x) + self.gate * self.late


class OpenGate(pl.Callback):
    """Opens the gate for step ``Gated.LATE`` on, at the end of the step before it: before the snapshot is written
    (this callback runs first), so that each snapshot holds the gate the next step trains with, as the replay reads it."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step + 1 >= Gated.LATE:
            pl_module.net.gate.fill_(1.0)


def _exact_adam(tmp_path, kind, model="mlp", dynamics=None):
    """The replay's raw score on a full-batch Adam/AdamW trajectory with a snapshot per step, against autograd."""
    from pmp_lightning.replay.dynamics import ExactAdam

    make = getattr(torch.optim, kind)
    dm, net = _train(tmp_path, model=model, optimizer=lambda params: make(params, **ADAM),
                     callbacks=[OpenGate()] if model == "gated" else [])
    replay = ReplayModule(MODELS[model](), tmp_path / "snapshots", dm.pool, dm.downstream, dm.train_set,
                          curvature="exact", objective=_objective("ce"), hvp_samples=None, batch_size=7)
    assert isinstance(replay.dynamics, ExactAdam) and replay.dynamics.decoupled == (kind == "AdamW")
    if dynamics is not None:
        replay.dynamics = dynamics
    fit_replay(replay, tmp_path)
    s = compute_scores(["raw"], replay.results())["raw"]
    reference = _adam_reference(dm, net, tmp_path / "snapshots", kind)
    assert np.abs(reference).max() > 1e-3
    rel = np.abs(s - reference).max() / np.abs(reference).max()
    print(f"{kind} on {model}, exact adjoint of (θ, m, v){' (replaced)' if dynamics else ''}: max relative error {rel:.2e}")
    return rel


@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
@pytest.mark.parametrize("model", ["mlp", "gated"])
def test_the_identity_holds_through_adam(tmp_path, kind, model):
    """Adam and AdamW, full batch, a snapshot per step, float64: the exact adjoint of (θ, m, v) gives −N ∂J_total/∂γ_n
    from autograd through the unrolled training, a parameter first touched at step 3 included (``gated``)."""
    assert _exact_adam(tmp_path, kind, model) < 1e-9


@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
def test_the_frozen_preconditioner_misses_the_identity_through_adam(tmp_path, kind):
    """Guards the test above: the same trajectory replayed with the preconditioner held fixed over each step (the
    per-epoch replay's approximation) misses the reference, most of all on the late parameter."""
    from pmp_lightning.replay.dynamics import Adam

    assert _exact_adam(tmp_path, kind, "gated", Adam(ADAM["weight_decay"], kind == "AdamW")) > 1e-2


@pytest.mark.parametrize("frozen", [False, True])
def test_the_replay_reads_each_snapshots_optimizer_state_once_per_use(tmp_path, monkeypatch, frozen):
    """The state kept with snapshot t is read by the epochs of snapshots t and t − 1; the second takes the first's
    copy. The frozen P: each snapshot's P read once. The exact adjoint: each snapshot's moments read twice (as m_t at
    snapshot t, as m_{t−1} at snapshot t + 1), not four times. The scores are those the identity test checks."""
    from pmp_lightning.replay import module
    from pmp_lightning.replay.dynamics import Adam

    reads = []
    for name in ("load_moments", "load_preconditioner"):
        load = getattr(module, name)
        monkeypatch.setattr(module, name, lambda d, entry, load=load, name=name: reads.append((name, entry["step"]))
                            or load(d, entry))
    _exact_adam(tmp_path, "AdamW", "gated", Adam(ADAM["weight_decay"], True) if frozen else None)
    steps = sorted({step for _, step in reads})  # a snapshot per step: snapshot t is step t
    assert {name for name, _ in reads} == {"load_preconditioner" if frozen else "load_moments"}
    counts = [sum(step == s for _, step in reads) for s in steps]
    if frozen:  # P_1 … P_T (none before θ_1), once each
        assert steps == list(range(1, STEPS + 1)) and counts == [1] * STEPS
    else:  # θ_0's moments only as m_0, θ_T's only as m_T, the others as both
        assert steps == list(range(STEPS + 1)) and counts == [1] + [2] * (STEPS - 1) + [1]


def test_an_interrupted_exact_adam_replay_resumes_with_the_costates_of_m_and_v(tmp_path):
    """The exact adjoint carries two more costates (of m and v); a replay stopped after 3 of its 7 snapshots and
    resumed from its progress gives the dots of one never stopped."""
    dm, _ = _train(tmp_path, model="gated", optimizer=lambda params: torch.optim.AdamW(params, **ADAM),
                   callbacks=[OpenGate()])

    def replay(progress=None):
        return ReplayModule(MODELS["gated"](), tmp_path / "snapshots", dm.pool, dm.downstream, dm.train_set,
                            curvature="exact", objective=_objective("ce"), hvp_samples=None, progress_dir=progress)

    whole = fit_replay(replay(), tmp_path / "whole").results().dot
    first = replay(tmp_path / "progress")
    pl.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, default_root_dir=tmp_path / "first").fit(first)
    assert set(first.carry) == {"a", "b"}
    second = replay(tmp_path / "progress")
    assert second.remaining == STEPS + 1 - 3 and set(second.carry) == {"a", "b"}
    np.testing.assert_array_equal(fit_replay(second, tmp_path / "second").results().dot, whole)


def test_under_adam_the_scores_read_psi_only_where_a_training_gradient_reached():
    """``Dynamics.reach``: a coordinate where √v̂ ≤ ε/1000 (v̂ = 0: no training gradient reached it) is left out of the
    dots and norms the scores read, from the frozen P kept with a snapshot and from the exact adjoint's v alike; just
    above the line it is read. Plain descent and momentum read ψ everywhere."""
    from pmp_lightning.replay.dynamics import SGD, UNREACHED, Adam, Dynamics, ExactAdam

    eps, beta2, k = 1e-8, 0.999, 5
    root = torch.tensor([0.0, 1e-30, 0.5 * UNREACHED * eps, 2 * UNREACHED * eps, 1e-3, 1.0], dtype=torch.float64)
    want = torch.tensor([False, False, False, True, True, True])
    frozen = Adam(0.0, True, eps).reach(precond=(1 / (root + eps)).float().double())  # P is kept in float32
    exact = ExactAdam(0.0, True, eps, 0.9, beta2).reach(moments=(None, None, root**2 * (1 - beta2**k), k, 1))
    assert torch.equal(frozen, want) and torch.equal(exact, want)
    assert Dynamics().reach() is None and SGD(0.0, 0.9).reach() is None


def test_the_folded_adam_adjoint_is_the_exact_one_run_over_the_interval_with_the_state_held():
    """``FoldedAdam`` (several steps per snapshot, m and v kept with each): with S = 1 its direction and the costates
    it carries are ExactAdam's; with S = 4 they are ExactAdam's run step by step over 4 steps whose state is held (m
    and v at a fixed point: m = g, v = g², each step with its own step count and η/4), the costates chained from step
    to step. The guard: the frozen P's direction P λ on the same state differs."""
    from pmp_lightning.replay.dynamics import ExactAdam, FoldedAdam

    torch.manual_seed(0)
    n, k, eta = 50, 37, 0.3
    g = torch.randn(n, dtype=torch.float64)
    g[:5] = 0.0  # rows no gradient reached
    lam, m_before = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    m, v = torch.randn(n, dtype=torch.float64), torch.rand(n, dtype=torch.float64)
    a0, b0 = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    settings = dict(weight_decay=0.1, decoupled=True, eps=1e-8, beta1=0.9, beta2=0.99)
    exact, folded = ExactAdam(**settings), FoldedAdam(**settings)

    def run(dynamics, moments, step_eta, start=(a0, b0)):
        carry = {"a": start[0].clone(), "b": start[1].clone()}
        return dynamics.direction(lam, None, 0.0, step_eta, moments=moments, carry=carry), carry

    one, one_carry = run(folded, (m_before, m, v, k, 1), eta)
    want, want_carry = run(exact, (m_before, m, v, k, 1), eta)
    torch.testing.assert_close(one, want, rtol=1e-13, atol=0)
    for key in "ab":
        torch.testing.assert_close(one_carry[key], want_carry[key], rtol=1e-13, atol=0)

    held = (g, g, g * g)  # m_before = m = g, v = g²: the state each of the S steps sees
    four, four_carry = run(folded, (*held, k, 4), eta)
    carry, total = {"a": a0.clone(), "b": b0.clone()}, torch.zeros(n, dtype=torch.float64)
    for j in range(4):
        total += exact.direction(lam, None, 0.0, eta / 4, moments=(*held, k - j, 1), carry=carry) * (eta / 4)
    torch.testing.assert_close(four, total / eta, rtol=1e-12, atol=1e-300)
    for key in "ab":
        torch.testing.assert_close(four_carry[key], carry[key], rtol=1e-12, atol=1e-300)

    # at θ_T (no costates of m and v yet) the frozen P reads P λ; the folded adjoint takes the v-costate off it
    fresh, _ = run(folded, (*held, k, 4), eta, start=(torch.zeros(n, dtype=torch.float64),) * 2)
    frozen = lam / ((g * g / (1 - settings["beta2"] ** k)).sqrt() + settings["eps"])
    assert (frozen - fresh)[5:].abs().max() > 0.1 * fresh[5:].abs().max()


@pytest.mark.parametrize("kind", ["AdamW", "Adam"])
def test_adam_replays_the_preconditioned_recursion(tmp_path, kind):
    """Adam/AdamW with the preconditioner P_t held fixed over each step: the replay's dots are ⟨P_t λ_{t+1}, ∇l_n(θ_t)⟩
    and λ_t = ∇J(θ_t) + λ_{t+1} − η_t (H̃ P_t λ_{t+1} + w_d λ_{t+1}), written out here with explicit per-example gradients,
    a Hessian from autograd and P from a second run of torch's own optimizer (v̂ = v / (1 − β₂^k), P = 1/(√v̂ + ε))."""
    lr, decay, betas, eps = 0.05, 0.1, (0.9, 0.99), 1e-8
    make = getattr(torch.optim, kind)
    dm, net = _train(tmp_path, optimizer=lambda params: make(params, lr=lr, betas=betas, eps=eps, weight_decay=decay))
    replay = ReplayModule(mlp(num_classes=10, in_features=4, hidden=6), tmp_path / "snapshots", dm.pool, dm.downstream,
                          dm.train_set, curvature="coarse", objective=_objective("ce"), hvp_samples=None, batch_size=7)
    from pmp_lightning.replay.dynamics import Adam, ExactAdam

    assert isinstance(replay.dynamics, ExactAdam)  # a snapshot per step keeps the moments: the exact adjoint by default
    replay.dynamics = Adam(decay, kind == "AdamW")  # the frozen-P recursion, as a replay of a snapshot per epoch runs it
    assert replay.dynamics.preconditioned and replay.dynamics.decoupled == (kind == "AdamW")
    fit_replay(replay, tmp_path)
    stats = replay.results()

    manifest = load_manifest(tmp_path / "snapshots")
    strip = lambda st: {k[len("net."):]: v for k, v in st.items()}  # noqa: E731
    states = [strip(load_snapshot(tmp_path / "snapshots", s)) for s in manifest["snapshots"]]
    etas = [s["lr_sum"] for s in manifest["snapshots"][1:]]
    # P_t from the optimizer itself, replaying training step by step
    twin = mlp(num_classes=10, in_features=4, hidden=6).double()
    twin.load_state_dict(states[0])
    opt = make(twin.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    x, y, xd, yd = dm.pool.x.double(), dm.pool.y, dm.downstream.x.double(), dm.downstream.y
    P = []
    for t in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(twin(x), y).backward()
        opt.step()
        sched.step()
        P.append({n: 1 / ((opt.state[p]["exp_avg_sq"] / (1 - betas[1] ** float(opt.state[p]["step"]))).sqrt() + eps)
                  for n, p in twin.named_parameters()})
        for k, v in twin.state_dict().items():
            torch.testing.assert_close(v, states[t + 1][k], rtol=1e-12, atol=1e-12)

    names = [n for n, _ in twin.named_parameters()]

    def at(t):
        return {k: states[t][k].clone().requires_grad_(True) for k in names}

    def grad_j(t):
        p = at(t)
        return dict(zip(names, torch.autograd.grad(F.cross_entropy(functional_call(twin, p, (xd,)), yd), list(p.values()))))

    lam = grad_j(STEPS)
    w_d = decay if kind == "AdamW" else 0.0
    for t in reversed(range(STEPS)):
        psi = {k: P[t][k] * lam[k] for k in names}
        per_example = []
        for n in range(N_POOL):
            p = at(t)
            g = torch.autograd.grad(F.cross_entropy(functional_call(twin, p, (x[n:n + 1],)), y[n:n + 1]), list(p.values()))
            per_example.append(sum((gi * psi[k]).sum() for gi, k in zip(g, names)))
        np.testing.assert_allclose(stats.dot[t], torch.stack(per_example).detach().numpy(), rtol=1e-9, atol=1e-12)
        if t == 0:
            break
        p = at(t)
        g = torch.autograd.grad(F.cross_entropy(functional_call(twin, p, (x,)), y), list(p.values()), create_graph=True)
        coupled = 0.0 if kind == "AdamW" else decay  # Adam's decay is in the gradient: H̃ = H + wI
        hv = torch.autograd.grad(sum((gi * psi[k]).sum() for gi, k in zip(g, names)), list(p.values()))
        lam = {k: grad_j(t)[k] + lam[k] - etas[t] * (h + coupled * psi[k] + w_d * lam[k]) for k, h in zip(names, hv)}
    np.testing.assert_allclose(stats.eta, etas)


def test_leaving_out_the_preconditioner_changes_the_dots(tmp_path):
    """Guards the test above: an Adam trajectory replayed as plain gradient descent gives other dots."""
    from pmp_lightning.replay.dynamics import Dynamics

    dm, _ = _train(tmp_path, optimizer=lambda params: torch.optim.AdamW(params, lr=0.05))
    replays = []
    for plain in (False, True):
        replay = ReplayModule(mlp(num_classes=10, in_features=4, hidden=6), tmp_path / "snapshots", dm.pool, dm.downstream,
                              dm.train_set, curvature="coarse", objective=_objective("ce"), hvp_samples=None)
        if plain:
            replay.dynamics = Dynamics()
        replays.append(fit_replay(replay, tmp_path / str(plain)).results().dot)
    assert np.abs(replays[0] - replays[1]).max() > 1e-3 * np.abs(replays[0]).max()


def test_dropping_the_hessian_term_breaks_the_identity(tmp_path):
    """Guards the test above: the same comparison fails when the curvature term is left out."""
    dm, net = _train(tmp_path)
    replay = ReplayModule(mlp(num_classes=10, in_features=4, hidden=6), tmp_path / "snapshots", dm.pool, dm.downstream,
                          dm.train_set, curvature="none", hvp_samples=None)
    fit_replay(replay)
    s = compute_scores(["raw"], replay.results())["raw"]
    reference = _autograd_reference(dm, net, tmp_path / "snapshots", "area", REFERENCE_J["ce"])
    assert np.abs(s - reference).max() / np.abs(reference).max() > 1e-6


def test_centring_changes_the_scores(tmp_path):
    """Guards the centred cases above: the centred and the plain J give different scores on this trajectory,
    and the plain reference does not match the centred replay."""
    dm, net = _train(tmp_path)
    scores = {}
    for centred in (False, True):
        replay = ReplayModule(mlp(num_classes=10, in_features=4, hidden=6), tmp_path / "snapshots", dm.pool, dm.downstream,
                              dm.train_set, curvature="exact", objective=_objective("logit_gap", centred), hvp_samples=None)
        fit_replay(replay)
        scores[centred] = compute_scores(["raw"], replay.results())["raw"]
    plain = _autograd_reference(dm, net, tmp_path / "snapshots", "area", REFERENCE_J["logit_gap"])
    assert np.abs(scores[True] - plain).max() / np.abs(plain).max() > 1e-3


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_a_wrong_objective_gradient_breaks_the_identity(tmp_path, name):
    """Guards the exactness test: an objective with the right values but a wrong gradient is caught.

    ``z + 0.05·(z − z.detach())²``-style perturbations would vanish at first order, so the wrong one adds a
    term whose value is 0 but whose gradient is not: 0.1·(z₀ − z₀.detach()).
    """
    dm, net = _train(tmp_path)
    right = _objective(name)

    def wrong(z, y):
        return right(z, y) + 0.1 * (z[:, 0] - z[:, 0].detach())

    replay = ReplayModule(mlp(num_classes=10, in_features=4, hidden=6), tmp_path / "snapshots", dm.pool, dm.downstream,
                          dm.train_set, curvature="exact", objective=wrong, hvp_samples=None)
    fit_replay(replay)
    s = compute_scores(["raw"], replay.results())["raw"]
    reference = _autograd_reference(dm, net, tmp_path / "snapshots", "area", REFERENCE_J[name])
    assert np.abs(s - reference).max() / np.abs(reference).max() > 1e-4


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
