"""scoring.by_class in one replay (``ClassReplayModule``): the K class costates as one stack, their Hessian-vector
products batched over the classes, each pool example dotted with its own label's costate, gives every class the
statistics of a replay of that class alone (J_k on the downstream examples labelled k, scoring the pool examples
labelled k), in float64 to 1e-10, under plain SGD, heavy-ball momentum with weight decay (a snapshot per step, the
exact adjoint), and the Lanczos propagator over epochs; a swapped costate fails the comparison; an interrupted
batched replay resumes its stacks."""
from dataclasses import fields

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from callbacks.theta_snapshot import ThetaSnapshot
from pmp_lightning.data.labelled import PoolDataModule
from pmp_lightning.data.noise import LabelNoise
from pmp_lightning.models.classifiers import mlp
from pmp_lightning.replay.costate import hessian_vector_product, hessian_vector_products, lanczos_expm, lanczos_expm_stack
from pmp_lightning.replay.costate import objective
from pmp_lightning.replay.module import ClassReplayModule, ReplayModule
from pmp_lightning.replay.store import ReplayStats
from pmp_lightning.training import Classifier, trainable
from tests.conftest import RandomSource, fit_replay

CLASSES, N_POOL, STEPS = 4, 30, 5
J = objective("unit_ce")  # a class's J is the run's objective without centring (pipeline.replay_stage)


def _train(tmp_path, momentum=0.0, weight_decay=0.0, per_step=True):
    """float64, a tiny MLP on 4 classes, full-batch SGD (a snapshot per step) or 2 steps per snapshot (per epoch)."""
    pl.seed_everything(0)
    dm = PoolDataModule(RandomSource(n=N_POOL + 20, num_classes=CLASSES, seed=2, dtype=torch.float64),
                        LabelNoise("symmetric", 0.25, seed=1), pool_size=N_POOL, downstream_size=16, test_size=1,
                        batch_size=N_POOL if per_step else N_POOL // 2)
    dm.setup()
    assert set(dm.pool.y.tolist()) == set(dm.downstream.y.tolist()) == set(range(CLASSES))
    net = mlp(num_classes=CLASSES, in_features=4, hidden=6)
    model = Classifier(net, optimizer=lambda params: torch.optim.SGD(params, lr=0.5 * (1 - momentum), momentum=momentum,
                                                                   weight_decay=weight_decay))
    snapshot = ThetaSnapshot(tmp_path / "snapshots", **({"every_n_epochs": None, "every_n_steps": 1} if per_step else {}))
    pl.Trainer(max_epochs=STEPS, precision="64-true", callbacks=[snapshot], logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path).fit(model, datamodule=dm)
    return dm


def _net():
    return mlp(num_classes=CLASSES, in_features=4, hidden=6)


def _separate(dm, snaps, tmp_path, **settings) -> dict[int, ReplayStats]:
    """The reference: one ReplayModule per class, as the pipeline ran them before."""
    out = {}
    for k in range(CLASSES):
        replay = ReplayModule(_net(), snaps, dm.pool.where(dm.pool.y == k), dm.downstream.where(dm.downstream.y == k),
                              dm.train_set, objective=J, **settings)
        out[k] = fit_replay(replay, tmp_path / f"separate_{k}").results()
    return out


def _batched(dm, snaps, tmp_path, module=ClassReplayModule, **settings) -> dict[int, ReplayStats]:
    replay = module(_net(), snaps, dm.pool, dm.downstream, dm.train_set, objective=J, **settings)
    return fit_replay(replay, tmp_path / "batched").results()


def _largest_error(batched: dict[int, ReplayStats], separate: dict[int, ReplayStats]) -> float:
    """The largest relative difference over every class and every numeric field of the statistics (each field
    relative to its own largest entry)."""
    assert set(batched) == set(separate)
    worst = 0.0
    for k in separate:
        for f in fields(ReplayStats):
            a, b = getattr(batched[k], f.name), getattr(separate[k], f.name)
            assert a.shape == b.shape, (k, f.name)
            if a.dtype.kind in "US":
                assert (a == b).all(), (k, f.name)
                continue
            scale = max(np.abs(b).max(initial=0.0), 1e-300)
            worst = max(worst, float(np.abs(a - b).max(initial=0.0) / scale))
    return worst


CASES = {"sgd": dict(curvature="exact"),
         "momentum": dict(curvature="exact", momentum=0.9, weight_decay=0.05),
         "expm_epochs": dict(curvature="expm", per_step=False)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_batched_class_replay_gives_each_class_its_own_replay(tmp_path, case):
    settings = dict(CASES[case])
    curvature = settings.pop("curvature")
    dm = _train(tmp_path, **settings)
    replay = dict(curvature=curvature, hvp_samples=None, batch_size=7)  # 7: several chunks per class
    separate = _separate(dm, tmp_path / "snapshots", tmp_path, **replay)
    batched = _batched(dm, tmp_path / "snapshots", tmp_path, **replay)
    assert np.abs(separate[0].dot).max() > 1e-3 and np.isfinite(separate[0].lambda_norm).all()
    error = _largest_error(batched, separate)
    print(f"{case}: batched vs {CLASSES} separate class replays, largest relative difference {error:.2e}")
    assert error <= 1e-10


class Swapped(ClassReplayModule):
    """Dots class 1's examples with class 2's costate: what the guard must catch."""

    def _directions(self):
        directions = super()._directions()
        return {**directions, 1: directions[2]}


def test_a_swapped_class_costate_fails_the_comparison(tmp_path):
    dm = _train(tmp_path, momentum=0.9, weight_decay=0.05)
    replay = dict(curvature="exact", hvp_samples=None, batch_size=7)
    separate = _separate(dm, tmp_path / "snapshots", tmp_path, **replay)
    swapped = _batched(dm, tmp_path / "snapshots", tmp_path, module=Swapped, **replay)
    error = _largest_error(swapped, separate)
    print(f"class 1 dotted with class 2's costate: largest relative difference {error:.2e}")
    assert error > 1e-2
    assert _largest_error({k: swapped[k] for k in (0, 2, 3)}, {k: separate[k] for k in (0, 2, 3)}) <= 1e-10


def test_vmap_and_the_loop_give_the_same_stacked_products_and_lanczos_matches_row_by_row():
    torch.manual_seed(0)
    net = mlp(num_classes=CLASSES, in_features=4, hidden=6).double().eval()
    params = {k: p.detach() for k, p in trainable(net).items()}
    x, y = torch.randn(11, 1, 2, 2, dtype=torch.float64), torch.randint(0, CLASSES, (11,))
    vs = {k: torch.randn(3, *p.shape, dtype=torch.float64) for k, p in params.items()}
    batches = lambda: [(x[:6], y[:6]), (x[6:], y[6:])]  # noqa: E731
    fast = hessian_vector_products(net, params, vs, batches, vectorised=True)
    slow = hessian_vector_products(net, params, vs, batches, vectorised=False)
    for r in range(3):
        one = hessian_vector_product(net, params, {k: v[r] for k, v in vs.items()}, batches)
        for k in params:
            torch.testing.assert_close(fast[k][r], one[k], rtol=1e-12, atol=1e-13)
            torch.testing.assert_close(slow[k][r], one[k], rtol=1e-12, atol=1e-13)
    # exp(−η H⁺) v row by row, with rows that stop early (a zero row, an invariant Krylov space) beside full ones
    h = torch.randn(6, 6, dtype=torch.float64)
    h = h @ h.T - 2 * torch.eye(6, dtype=torch.float64)
    eig = torch.linalg.eigh(h).eigenvectors
    v = torch.stack([torch.randn(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64), eig[:, 0] + eig[:, 1],
                     torch.randn(6, dtype=torch.float64)])
    stacked = lanczos_expm_stack(lambda m: m @ h.T, v, 0.3, 4)
    for r in range(len(v)):
        torch.testing.assert_close(stacked[r], lanczos_expm(lambda u: h @ u, v[r], 0.3, 4), rtol=1e-12, atol=1e-14)


def test_an_interrupted_batched_replay_resumes_its_stacks(tmp_path):
    """Stopped after 2 of its 6 snapshots and resumed from its progress files, the batched replay gives what one never
    stopped gives, and writes one stats.npz per class."""
    dm = _train(tmp_path, momentum=0.9, weight_decay=0.05)

    def replay(progress=None):
        return ClassReplayModule(_net(), tmp_path / "snapshots", dm.pool, dm.downstream, dm.train_set, objective=J,
                                 curvature="exact", hvp_samples=None, batch_size=7, progress_dir=progress)

    whole = fit_replay(replay(), tmp_path / "whole").results()
    first = replay(tmp_path / "progress")
    pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, default_root_dir=tmp_path / "first").fit(first)
    second = replay(tmp_path / "progress")
    assert second.remaining == STEPS + 1 - 2 and second.lam.shape[0] == CLASSES
    resumed = fit_replay(second, tmp_path / "second").results()
    assert _largest_error(resumed, whole) == 0.0
    for k in range(CLASSES):
        saved = ReplayStats.load(tmp_path / "progress" / "classes" / str(k) / "stats.npz")
        np.testing.assert_array_equal(saved.dot, whole[k].dot)


def test_the_class_replay_refuses_a_class_without_downstream_examples(tmp_path):
    from pmp_lightning.errors import ReplayConfigError

    dm = _train(tmp_path)
    with pytest.raises(ReplayConfigError, match=r"no example of class\(es\) \[3\]"):
        ClassReplayModule(_net(), tmp_path / "snapshots", dm.pool, dm.downstream.where(dm.downstream.y != 3),
                          dm.train_set, objective=J, curvature="exact", hvp_samples=None)


@pytest.mark.slow
def test_two_processes_give_the_class_replay_of_one(tmp_path):
    """The batched class replay in 2 CPU processes (ddp_spawn, through the CLI): each rank scores whole one-label
    chunks of the pool and its share of every class's downstream examples; the class variants equal one process's."""
    import csv
    import subprocess
    import sys

    from hydra.utils import instantiate

    from pmp_lightning.data.base import datamodule_from_config
    from pmp_lightning.policy import resolve as scoring_defaults
    from pmp_lightning.replay.costate import objective as make_objective
    from pmp_lightning.scores.registry import CLASS_VARIANTS, class_scores
    from pmp_lightning.training import shaped
    from tests.test_pipeline import ROOT, SMALL, make_cfg

    shared = ["trainer.max_epochs=2", "data.pool_size=301", "scoring.by_class=true", "scoring.scores=[cosine,loss]",
              "scoring.canaries=0"]
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "run.py", *SMALL, *shared, "trainer.accelerator=cpu", "trainer.devices=2",
           "trainer.strategy=ddp_spawn", f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "class replays: 10 class costates in one replay" in proc.stdout + proc.stderr
    rows = list(csv.DictReader((run_dir / "scores.csv").open()))

    cfg = scoring_defaults(make_cfg(tmp_path / "single", *shared))
    dm = datamodule_from_config(cfg)
    dm.setup()
    run_objective = instantiate(cfg.objective)
    module = ClassReplayModule(shaped(instantiate(cfg.model, _partial_=True), dm.pool.x, dm.num_classes)(),
                               run_dir / "snapshots", dm.scored, dm.downstream, dm.train_set,
                               objective=make_objective(run_objective.name, **run_objective.params),
                               **instantiate(cfg.replay, _partial_=True).keywords)
    expected = class_scores(fit_replay(module, accelerator="cpu").results(), dm.scored.y.numpy())
    for name in CLASS_VARIANTS:
        got = np.array([float(r[name]) for r in rows])
        assert np.abs(got - expected[name]).max() <= 1e-5 * np.abs(expected[name]).max(), name


def test_where_vmap_fails_or_memory_runs_out_the_products_go_by_fewer_classes(tmp_path, monkeypatch):
    """A layer vmap cannot batch: the class replay warns and takes one jvp per class; a stacked product that runs out
    of memory: it halves the classes per product until it fits. Both give the statistics of the plain run."""
    import pmp_lightning.replay.module as module

    dm = _train(tmp_path, momentum=0.9, weight_decay=0.05)
    replay = dict(curvature="exact", hvp_samples=None, batch_size=7)
    plain = _batched(dm, tmp_path / "snapshots", tmp_path / "plain", **replay)

    real = module.hessian_vector_products

    def no_vmap(*args, vectorised=True):
        if vectorised:
            raise RuntimeError("vmap: no batching rule for this layer")
        return real(*args, vectorised=False)

    monkeypatch.setattr(module, "hessian_vector_products", no_vmap)
    with pytest.warns(UserWarning, match="cannot be vectorised over the classes"):
        looped = _batched(dm, tmp_path / "snapshots", tmp_path / "looped", **replay)
    assert _largest_error(looped, plain) <= 1e-12
    monkeypatch.setattr(module, "hessian_vector_products", real)

    sizes = []
    stacked = ClassReplayModule._stacked_hvp

    def small_memory(self, rows):
        sizes.append(len(rows))
        if len(rows) > 1:
            raise torch.OutOfMemoryError("out of memory")
        return stacked(self, rows)

    monkeypatch.setattr(ClassReplayModule, "_stacked_hvp", small_memory)
    with pytest.warns(UserWarning, match="ran out of memory; 1 classes at a time"):
        halved = _batched(dm, tmp_path / "snapshots", tmp_path / "halved", **replay)
    assert sizes[:2] == [CLASSES, CLASSES // 2] and set(sizes[3:]) == {1}
    assert _largest_error(halved, plain) <= 1e-12
