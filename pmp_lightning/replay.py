"""The backward PMP replay as a LightningModule: one Trainer epoch per snapshot, newest first.

Epoch e handles snapshot t = T-e. The first epoch scores the trained model θ_T: the statistics the
baselines need (loss, margin, correctness, EL2N, ‖∇l_n‖; no costate yet), then λ_T = ∇J(θ_T). Every
later epoch, with λ_{t+1} known, loads θ_t, runs the per-example statistics pass over the pool (the
epoch's batches) and propagates the costate:

    λ_T = ∇J(θ_T)
    λ_t = a_t ∇J(θ_t) + P_t(λ_{t+1})          (a_t = 1 for horizon=area, 0 for terminal)

J is the mean of ``objective`` over the downstream set and P_t is picked by ``curvature``; both are
pure functions in ``pmp_lightning/costate.py``. ``curvature=exact`` is the paper's step formula plus a
check that the trajectory was full-batch with one step per snapshot (then the scores are exact).
At each snapshot the replay also records how many downstream examples carry ∇J
(``costate.participation``).

Hessian-vector products use a fixed subsample of the trajectory's training set (all of it in
exact mode). The net stays in eval mode (dropout off).

Distributed (``trainer.strategy=ddp`` / ``ddp_spawn``): rank r scores the pool examples r, r+W, …
(each exactly once), and computes its share of ∇J and of every Hessian-vector product; the shares
are all-reduced, so λ is the same on every rank. Each snapshot's statistics are all-reduced too.

Resume: with ``progress_dir`` set, global rank zero writes each finished snapshot's statistics
(``rows/row_<t>.npz``) and then ``costate.npz`` (λ, the done-mask, a fingerprint of the inputs)
atomically. A new ReplayModule on the same directory continues after the last finished snapshot;
``stats.npz`` is written there only when every snapshot is done.
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.func import functional_call, grad, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from callbacks.theta_snapshot import load_manifest, load_snapshot
from pmp_lightning.costate import (PROPAGATORS, ObjectiveFn, centred_values, describe, is_centred, logit_pulls, logit_weights,
                                   participation)
from pmp_lightning.costate import objective as make_objective
from pmp_lightning.errors import CostateDivergedError, ReplayConfigError, SnapshotError
from pmp_lightning.io import save_npz
from pmp_lightning.models import training_loss
from pmp_lightning.stats import STAT_NAMES, per_example_stats, trainable

CURVATURES = tuple(PROPAGATORS)
HORIZONS = ("area", "terminal")
PREFIX = "net."  # the training module keeps its network as ``self.net``


def network_state(snapshot_dir: str | Path, entry: dict) -> dict[str, torch.Tensor]:
    """The network's own ``state_dict`` at one snapshot (the manifest ``entry``): the training module's prefix removed."""
    return {k[len(PREFIX):]: v for k, v in load_snapshot(snapshot_dir, entry).items()}


@dataclass
class ReplayStats:
    """Everything the scores need: per-example arrays over the snapshots and per-step vectors.

    ``dot[t, n] = ⟨λ_{t+1}, ∇l_n(θ_t)⟩`` for t = 0..T-1 (T × N); the PMP contribution is
    ``c[t, n] = eta[t] * dot[t, n]``. ``grad_norm``, ``loss``, ``margin``, ``correct`` and ``el2n`` hold one
    row per snapshot θ_0..θ_T ((T+1) × N): the PMP variants read rows 0..T-1 (beside ``dot``), the baselines
    the trained snapshots θ_1..θ_T (``trained``), so the final model counts and the initialisation does not.
    ``lambda_norm[t] = ‖λ_{t+1}‖``; ``participation[t]`` is the fraction of downstream examples carrying
    ∇J(θ_{t+1}) (``costate.participation``). Columns follow the pool's positions.
    """

    dot: np.ndarray
    grad_norm: np.ndarray
    loss: np.ndarray
    margin: np.ndarray
    correct: np.ndarray
    el2n: np.ndarray
    eta: np.ndarray
    lambda_norm: np.ndarray
    participation: np.ndarray

    @property
    def contribution(self) -> np.ndarray:
        return self.eta[:, None] * self.dot

    @property
    def replayed_grad_norm(self) -> np.ndarray:
        """‖∇l_n(θ_t)‖ for t = 0..T-1, the snapshots the costate scores (T × N, beside ``dot``)."""
        return self.grad_norm[:-1]

    def trained(self, name: str) -> np.ndarray:
        """The per-example statistic ``name`` at the trained snapshots θ_1..θ_T (T × N): what the baselines average."""
        return getattr(self, name)[1:]

    def save(self, path: str | Path) -> Path:
        return save_npz(path, **{f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def load(cls, path: str | Path) -> "ReplayStats":
        with np.load(path) as z:
            return cls(**{f.name: z[f.name] for f in fields(cls)})


def growth_steps(lambda_norm: np.ndarray, factor: float) -> list[int]:
    """Snapshots t where ‖λ_t‖ > factor · ‖λ_{t+1}‖ (``lambda_norm[t-1] = ‖λ_t‖``)."""
    return [t for t in range(1, len(lambda_norm)) if lambda_norm[t - 1] > factor * lambda_norm[t] > 0]


class _Shard(DistributedSampler):
    """Rank r's examples r, r+W, r+2W, …: every example exactly once over the ranks (no padding)."""

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


class ReplayModule(pl.LightningModule):
    def __init__(
        self,
        net: nn.Module,
        snapshot_dir: str | Path,
        pool,
        downstream,
        train_set,
        curvature: str = "expm",
        horizon: str = "area",
        objective: ObjectiveFn | None = None,
        hvp_samples: int | None = 64,
        batch_size: int | None = None,
        lanczos_steps: int = 8,
        growth_warning: float = 10.0,
        seed: int = 0,
        progress_dir: str | Path | None = None,
    ):
        super().__init__()
        if curvature not in CURVATURES:
            raise ReplayConfigError(f"unknown replay.curvature {curvature!r}; choose one of {', '.join(CURVATURES)}")
        if horizon not in HORIZONS:
            raise ReplayConfigError(f"unknown replay.horizon {horizon!r}; choose one of {', '.join(HORIZONS)}")
        if len(pool) == 0:
            raise ReplayConfigError("the pool to score is empty; give data.pool_size a positive value")
        self.manifest = load_manifest(snapshot_dir)
        self.snapshot_dir = Path(snapshot_dir)
        self.net = net
        self._check_model()
        dtype = getattr(torch, self.manifest["dtype"])
        self.to(dtype)  # the replay runs in the trajectory's precision
        self.pool, self.downstream, self.train_set = pool.to(dtype), downstream.to(dtype), train_set.to(dtype)
        self.curvature, self.horizon = curvature, horizon
        self.objective = make_objective("ce") if objective is None else objective  # None: the paper's J (the pipeline always passes one)
        self.batch_size, self.lanczos_steps, self.growth_warning = batch_size, lanczos_steps, growth_warning
        if batch_size is not None and batch_size < 1:
            raise ReplayConfigError(f"replay.batch_size={batch_size}; give a positive chunk size, or null for the device's default")

        snaps = self.manifest["snapshots"]
        self.T = len(snaps) - 1
        self.eta = np.array([s["lr_sum"] for s in snaps[1:]], dtype=np.float64)
        if curvature == "exact":
            self._check_exact(hvp_samples)
        elif not self._plain_sgd():
            warnings.warn(
                f"the trajectory was trained with {self.manifest['optimizer']}; the replay treats it as plain "
                f"gradient descent with the recorded learning rates"
            )
        n_hvp = len(self.train_set) if hvp_samples is None else min(int(hvp_samples), len(self.train_set))
        gen = torch.Generator().manual_seed(seed)
        self.hvp_set = Subset(self.train_set, torch.randperm(len(self.train_set), generator=gen)[:n_hvp].tolist())

        n = len(self.pool)
        # dot: t = 0..T-1 (θ_T has no λ_{T+1}); every other statistic: t = 0..T
        self.arrays = {k: np.full((self.T if k == "dot" else self.T + 1, n), np.nan) for k in STAT_NAMES}
        self.lambda_norm = np.full(self.T, np.nan)  # index t-1: ‖λ_t‖, t = 1..T (λ_0 is never needed)
        self.participation = np.full(self.T, np.nan)  # index t-1: at θ_t, t = 1..T
        self.lam: torch.Tensor | None = None
        self.done = np.zeros(self.T + 1, dtype=bool)  # per snapshot θ_0..θ_T
        self.automatic_optimization = False
        self.progress_dir = None if progress_dir is None else Path(progress_dir)
        if self.progress_dir is not None:
            self.fingerprint = self._fingerprint(curvature, horizon, n_hvp, seed)
            self._resume()
        self._first = self.T - int(self.done.sum())  # the snapshot of epoch 0 (θ_T unless resumed)

    @property
    def chunk(self) -> int:
        """Examples per chunk: ``batch_size``, or by default 64 on a CPU and 1024 on a GPU (the fastest measured)."""
        return self.batch_size or (1024 if self.device.type == "cuda" else 64)

    @property
    def remaining(self) -> int:
        """Snapshots still to replay (all T + 1, θ_T included, unless resumed)."""
        return int((~self.done).sum())

    # ------------------------------------------------------------------ checks
    def _check_model(self) -> None:
        want = {PREFIX + k: list(v.shape) for k, v in self.net.state_dict().items()}
        have = self.manifest["param_shapes"]
        if want != have:
            missing = sorted(set(want) - set(have))
            extra = sorted(set(have) - set(want))
            shape = [k for k in set(want) & set(have) if want[k] != have[k]]
            detail = "; ".join(
                part
                for part in (
                    f"parameters the model has but the snapshots lack: {missing[:4]}" if missing else "",
                    f"parameters only in the snapshots: {extra[:4]}" if extra else "",
                    ", ".join(f"{k} is {have[k]} in the snapshots but {want[k]} in the model" for k in sorted(shape)[:4]),
                )
                if part
            )
            raise SnapshotError(
                f"the snapshots in {self.snapshot_dir} come from a different model ({self.manifest['model']}) "
                f"than the one being replayed: {detail}. Replay with the model config used for training (model=...)."
            )

    def _plain_sgd(self) -> bool:
        optimizer = self.manifest["optimizer"]
        return optimizer.get("name") == "SGD" and not optimizer.get("momentum", 0)

    def _check_exact(self, hvp_samples: int | None) -> None:
        problems = []
        if any(len(s["lrs"]) != 1 for s in self.manifest["snapshots"][1:]):
            problems.append("a snapshot after every optimizer step (snapshot=every_step)")
        if self.manifest["batches_per_epoch"] != 1:
            problems.append("full-batch gradient descent (data.batch_size >= the training set size)")
        if hvp_samples is not None and hvp_samples < len(self.train_set):
            problems.append("Hessian-vector products on the whole training set (replay.hvp_samples=null)")
        if not self._plain_sgd():
            problems.append("plain SGD without momentum")
        if problems:
            raise ReplayConfigError("replay.curvature=exact needs " + "; ".join(problems) + ". Use replay.curvature=coarse or expm otherwise.")

    def _fingerprint(self, curvature: str, horizon: str, n_hvp: int, seed: int) -> str:
        """What the statistics depend on besides θ: a resumed replay must match it exactly."""
        ident = {"snapshots": self.manifest["snapshots"], "curvature": curvature, "horizon": horizon,
                 "objective": describe(self.objective), "hvp_samples": n_hvp,
                 "seed": seed, "lanczos_steps": self.lanczos_steps, "pool_labels": self.pool.y.tolist(),
                 "downstream": len(self.downstream), "format": 2}  # 2: θ_T's statistics are a row of their own
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ resume
    def _resume(self) -> None:
        path = self.progress_dir / "costate.npz"
        if not path.is_file():
            return
        try:
            with np.load(path) as z:
                state = {k: z[k] for k in z.files}
            rows = {}
            for t in np.flatnonzero(state["done"]):
                with np.load(self.progress_dir / "rows" / f"row_{t:05d}.npz") as row:
                    rows[t] = {k: row[k] for k in row.files}
        except Exception as err:  # a damaged npz raises various errors inside numpy and zipfile
            raise SnapshotError(f"the replay progress in {self.progress_dir} cannot be read ({type(err).__name__}: {err}); "
                                f"delete it and rerun") from err
        if str(state["fingerprint"]) != self.fingerprint:
            raise ReplayConfigError(
                f"{path} is the progress of a replay with other snapshots, pool or replay settings; delete "
                f"{self.progress_dir} or point the replay at a fresh directory"
            )
        done = state["done"].astype(bool)
        for t, row in rows.items():
            for k, values in row.items():
                self.arrays[k][t] = values
        self.done = done
        self.lambda_norm = state["lambda_norm"].astype(np.float64)
        self.participation = state["participation"].astype(np.float64)
        self.lam = torch.from_numpy(state["costate"])

    def _save_progress(self, t: int) -> None:
        """Rank zero: snapshot t's rows, then (atomically, last) the costate and the done-mask."""
        save_npz(self.progress_dir / "rows" / f"row_{t:05d}.npz", **{k: self.arrays[k][t] for k in self._row_stats(t)})
        save_npz(self.progress_dir / "costate.npz", costate=self.lam.detach().cpu().numpy(), done=self.done,
                 lambda_norm=self.lambda_norm, participation=self.participation, fingerprint=np.array(self.fingerprint))

    # ------------------------------------------------------------------ lightning plumbing
    def configure_optimizers(self):
        return None

    def train_dataloader(self) -> DataLoader:
        return self._shard_loader(self.pool)

    def _shard_loader(self, dataset) -> DataLoader:
        """This rank's share of ``dataset`` (all of it in a single process), in chunks, in order."""
        world = self.trainer.world_size
        sampler = _Shard(dataset, num_replicas=world, rank=self.global_rank, shuffle=False) if world > 1 else None
        return DataLoader(dataset, batch_size=self.chunk, shuffle=False, sampler=sampler)

    def snapshot_of_epoch(self, epoch: int) -> int:
        return self._first - epoch

    def on_train_start(self) -> None:
        if self.lam is not None:  # resumed: λ of the last finished snapshot
            self.lam = self.lam.to(self.device, self.dtype)

    def on_train_epoch_start(self) -> None:
        t = self.snapshot_of_epoch(self.current_epoch)
        self._load(t)
        self._lam_dict = None if t == self.T else self._unflatten(self.lam)  # θ_T: no λ_{T+1}, no dot

    def _row_stats(self, t: int) -> list[str]:
        """The statistics snapshot t has: all of them, but no dot at θ_T."""
        return [k for k in STAT_NAMES if t < self.T or k != "dot"]

    def training_step(self, batch, batch_idx):
        x, y, i = batch
        t = self.snapshot_of_epoch(self.current_epoch)
        stats = per_example_stats(self.net, x, y, self._lam_dict)
        idx = i.cpu().numpy()
        for k, v in stats.items():
            self.arrays[k][t, idx] = v.cpu().double().numpy()

    def on_train_epoch_end(self) -> None:
        t = self.snapshot_of_epoch(self.current_epoch)
        self._gather_row(t)
        if t == self.T:  # λ_T = ∇J(θ_T)
            self.lam, share = self._downstream()
            self._record_norm(t, share)
        elif t > 0:  # λ_0 enters no score
            lam = PROPAGATORS[self.curvature](self._hvp, self.lam, float(self.eta[t]), self.lanczos_steps)
            grad_J, share = self._downstream(need_grad=self.horizon == "area")
            self.lam = lam + grad_J if self.horizon == "area" else lam
            self._record_norm(t, share)
        self.done[t] = True
        if self.progress_dir is not None and self.trainer.is_global_zero:
            self._save_progress(t)

    def on_train_end(self) -> None:
        if self.progress_dir is not None and self.trainer.is_global_zero and self.done.all():
            self.save_stats()

    def save_stats(self) -> Path:
        """Write the finished statistics to ``progress_dir/stats.npz`` (what the pipeline's cache entry holds)."""
        return self.results().save(self.progress_dir / "stats.npz")

    def _gather_row(self, t: int) -> None:
        """Give every rank snapshot t's statistics for the whole pool (each rank computed its shard)."""
        if self.trainer.world_size == 1:
            return
        names = self._row_stats(t)
        rows = torch.from_numpy(np.stack([self.arrays[k][t] for k in names]))
        have = ~torch.isnan(rows[0])
        summed = self._all_reduce(torch.cat([torch.nan_to_num(rows, nan=0.0), have[None].double()]))
        count = summed[-1]
        if not torch.equal(count, torch.ones_like(count)):
            raise RuntimeError(f"snapshot {t}: pool examples were scored {int(count.min())} to {int(count.max())} times "
                               f"across the ranks instead of once each")
        for k, row in zip(names, summed[:-1].cpu().numpy()):
            self.arrays[k][t] = row

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks (identity in a single process)."""
        if self.trainer.world_size == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor.to(self.device), reduce_op="sum")

    # ------------------------------------------------------------------ costate
    def _record_norm(self, t: int, share: float) -> None:
        norm = float(self.lam.norm())
        if not math.isfinite(norm):
            raise CostateDivergedError(
                f"the costate λ_{t} became {norm} at snapshot {t} (step {self.manifest['snapshots'][t]['step']}) with "
                f"replay.curvature={self.curvature}: η_t·λ_max(H) ≫ 2 makes the recursion explode. No scores were "
                f"written. Use replay.curvature=expm (stable) or none, or snapshot more often."
            )
        self.lambda_norm[t - 1] = norm
        self.participation[t - 1] = share
        if t in growth_steps(self.lambda_norm, self.growth_warning):
            prev = self.lambda_norm[t]
            warnings.warn(
                f"costate norm grew {norm / prev:.3g}x at snapshot {t} (‖λ_{t}‖ = {norm:.3g}, η = {self.eta[t]:.3g}, "
                f"curvature={self.curvature}); scores from an exploding recursion are unreliable: try replay.curvature=expm"
            )
        self.log("replay/lambda_norm", norm, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True)

    # ------------------------------------------------------------------ θ_t, ∇J, Hessian-vector products
    def _load(self, t: int) -> None:
        net_state = network_state(self.snapshot_dir, self.manifest["snapshots"][t])
        for k, v in net_state.items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise SnapshotError(f"snapshot {t} ({self.manifest['snapshots'][t]['file']}) holds non-finite values in {k}; training diverged, lower the learning rate")
        self.net.load_state_dict(net_state)
        self.net.eval()  # the replay differentiates the deterministic network: dropout off
        self._params = {k: p.detach() for k, p in trainable(self.net).items()}

    def _flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[k].reshape(-1) for k in self._params])

    def _unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        out, offset = {}, 0
        for k, p in self._params.items():
            out[k] = vec[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        return out

    def _summed_loss(self, params, x, y):
        return training_loss(functional_call(self.net, params, (x,)), y, reduction="sum")

    def _summed_objective(self, params, x, y, mean_pull):
        z = functional_call(self.net, params, (x,))
        return centred_values(self.objective, z, y, mean_pull).sum(), z.detach()

    def _batches(self, dataset):
        for x, y, _ in self._shard_loader(dataset):
            yield x.to(self.device), y.to(self.device)

    def _downstream(self, need_grad: bool = True) -> tuple[torch.Tensor | None, float]:
        """∇J at the loaded θ (None unless ``need_grad``) and the share of the downstream set carrying it
        (``costate.participation``), from one forward and backward per downstream chunk; a centred J first
        takes its mean logit pull w̄ in one forward."""
        mean_pull = None
        if is_centred(self.objective):
            with torch.no_grad():
                total = sum(logit_pulls(self.objective, self.net(x), y).sum(0) for x, y in self._batches(self.downstream))
            mean_pull = self._all_reduce(total) / len(self.downstream)
        total = torch.zeros(sum(p.numel() for p in self._params.values()), dtype=self.dtype, device=self.device)
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for x, y in self._batches(self.downstream):
            if need_grad:
                g, logits = grad(self._summed_objective, has_aux=True)(self._params, x, y, mean_pull)
                total += self._flatten(g)
            else:
                with torch.no_grad():
                    logits = self.net(x)
            w = logit_weights(self.objective, logits, y, mean_pull).double()
            sums += torch.stack([w.sum(), w.pow(2).sum()])
        sums = self._all_reduce(sums)
        share = participation(float(sums[0]), float(sums[1]), len(self.downstream))
        return (self._all_reduce(total) / len(self.downstream) if need_grad else None), share

    def _hvp(self, vec: torch.Tensor) -> torch.Tensor:
        """∇²L(θ_t) · vec for the mean training loss over the fixed subsample (forward-over-reverse; attention through
        the math kernel, the one with forward-mode derivatives)."""
        v = self._unflatten(vec)
        total = torch.zeros_like(vec)
        with sdpa_kernel(SDPBackend.MATH):
            for x, y in self._batches(self.hvp_set):
                g = lambda p: grad(self._summed_loss)(p, x, y)  # noqa: E731
                total += self._flatten(jvp(g, (self._params,), (v,))[1])
        return self._all_reduce(total) / len(self.hvp_set)

    # ------------------------------------------------------------------ results
    def results(self) -> ReplayStats:
        if any(np.isnan(a).any() for a in self.arrays.values()):
            raise RuntimeError("the replay did not finish: some snapshots or pool examples have no statistics")
        return ReplayStats(**self.arrays, eta=self.eta, lambda_norm=self.lambda_norm.copy(),
                           participation=self.participation.copy())

