"""Exploration, not part of the package: the class-conditional costate on a finished run (docs/results.md, "A lead
for the training pool: the costate of the example's own class").

For each class k of the downstream set, the run's trajectory is replayed with J restricted to the downstream examples
labelled k (J_k, the run's objective without centring: a class's own mean pull is what J_k measures), scoring only the
pool examples labelled k. Each example is then scored against the costate of its own observed label's class,

    class_cosine_n = Σ_t cos(λ^{(y_n)}_{t+1}, ∇l_n(θ_t)),

after the class-based influence functions of Nguyen-Duc et al. (ACL 2023, "IFs-class"), who found influence between
examples of different classes unreliable in deep networks. Also printed: the same over the later half of the blocks
(class_late_cosine) and, with no costate, the instantaneous cos(∇J_{y_n}(θ_t), ∇l_n(θ_t)) summed over t (own_gradient).
The pool's ground truth only evaluates.

    python docs/explorations/class_costate.py RUN_DIR OUT_DIR
"""
import sys
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from sklearn.metrics import average_precision_score
from torch.func import functional_call, grad, vmap

from pmp_lightning.config import register_configs
from pmp_lightning.data.base import IndexedDataset, datamodule_from_config
from pmp_lightning.replay.costate import objective as make_objective
from pmp_lightning.replay.store import ReplayStats
from pmp_lightning.scores.registry import AUTO_FAMILY, SCORES
from pmp_lightning.training import shaped
from pmp_lightning.trajectory import load_manifest, network_state


def class_replays(run: Path, out: Path, dm, make, cfg) -> dict[int, ReplayStats]:
    """Replay k: J over the downstream examples labelled k, the pool examples labelled k scored (cached in OUT_DIR)."""
    run_objective, settings = instantiate(cfg.objective), instantiate(cfg.replay, _partial_=True)
    stats = {}
    for k in range(dm.num_classes):
        path = out / f"class_{k}" / "stats.npz"
        if not path.is_file():
            own, sel = dm.scored.y == k, dm.downstream.y == k
            module = settings(net=make(), objective=make_objective(run_objective.name, **run_objective.params),
                              snapshot_dir=run / "snapshots", pool=IndexedDataset(dm.scored.x[own], dm.scored.y[own]),
                              downstream=IndexedDataset(dm.downstream.x[sel], dm.downstream.y[sel]),
                              train_set=dm.train_set, progress_dir=out / f"class_{k}")
            pl.Trainer(max_epochs=module.remaining, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                       enable_model_summary=False, default_root_dir=out / f"class_{k}").fit(module)
        stats[k] = ReplayStats.load(path)
    return stats


def class_scores(stats: dict[int, ReplayStats], y: np.ndarray) -> dict[str, np.ndarray]:
    """class_cosine and class_late_cosine of every scored example, from its own class's replay."""
    scores = {"class_cosine": np.zeros(len(y)), "class_late_cosine": np.zeros(len(y))}
    for k, s in stats.items():
        scores["class_cosine"][y == k] = SCORES["cosine"](s)
        scores["class_late_cosine"][y == k] = SCORES["late_cosine"](s)
    return scores


def own_gradient(run: Path, dm, make) -> np.ndarray:
    """Σ_t cos(∇J_{y_n}(θ_t), ∇l_n(θ_t)) over t = 0..T-1, the whole downstream set's class k in J_k, no costate."""
    net, manifest = make().eval(), load_manifest(run / "snapshots")
    x, y, dx, dy = dm.scored.x, dm.scored.y, dm.downstream.x, dm.downstream.y
    total = np.zeros(len(y))
    for entry in manifest["snapshots"][:-1]:
        net.load_state_dict(network_state(run / "snapshots", entry))
        params = {k: p.detach() for k, p in net.named_parameters()}
        buffers = dict(net.named_buffers())
        rows = []
        for k in range(dm.num_classes):
            g = torch.autograd.grad(F.cross_entropy(net(dx[dy == k]), dy[dy == k]), list(net.parameters()))
            rows.append(torch.cat([v.reshape(-1) for v in g]))
        classes = torch.nn.functional.normalize(torch.stack(rows), dim=1)

        def loss(p, xi, yi):
            return F.cross_entropy(functional_call(net, (p, buffers), (xi[None],)), yi[None])

        cos = []
        for xs, ys in zip(x.split(256), y.split(256)):
            per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, xs, ys)
            flat = torch.nn.functional.normalize(torch.cat([v.reshape(len(xs), -1) for v in per_example.values()], 1), dim=1)
            cos.append((flat @ classes.T).gather(1, ys[:, None])[:, 0])
        total += torch.cat(cos).double().numpy()
    return total


def main(run: Path, out: Path) -> None:
    register_configs()
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    dm = datamodule_from_config(cfg)
    dm.setup()
    make = shaped(instantiate(cfg.model, _partial_=True), dm.pool.x, dm.num_classes)
    n, mask, y = len(dm.pool), dm.is_mislabeled, dm.scored.y.numpy()
    whole = ReplayStats.load(run / "replay" / "stats.npz")
    scores = {name: SCORES[name](whole) for name in AUTO_FAMILY}
    scores.update(class_scores(class_replays(run, out, dm, make, cfg), y))
    scores["own_gradient"] = own_gradient(run, dm, make)
    for name in ("loss", "aum"):
        scores[name] = SCORES[name](whole)
    print(run, " ".join(f"{name}={average_precision_score(mask, -s[:n]):.3f}" for name, s in scores.items()), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
