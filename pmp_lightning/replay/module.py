"""The backward PMP replay as a LightningModule: one Trainer epoch per snapshot, newest first.

Epoch e handles snapshot t = T-e. The first epoch reads the trained model θ_T's outputs, which the
baselines need (loss, margin, correctness, EL2N: a forward pass, no costate yet), then λ_T = ∇J(θ_T). Every
later epoch, with λ_{t+1} known, loads θ_t, runs the per-example statistics pass over the pool (the
epoch's batches) and propagates the costate:

    λ_T = ∇J(θ_T)
    λ_t = a_t ∇J(θ_t) + P_t(λ_{t+1})          (a_t = 1 for horizon=area, 0 for terminal)

J is the mean of ``objective`` over the downstream set and P_t is picked by ``curvature``; both, and the
maths of one snapshot (∇J with its participation, the Hessian-vector products), are in
``pmp_lightning/replay/costate.py``; this module is the Lightning plumbing around them. ``curvature=exact`` is the paper's step formula plus a
check that the trajectory was full-batch with one step per snapshot (then the scores are exact).
At each snapshot the replay also records how many downstream examples carry ∇J
(``costate.participation``).

Hessian-vector products use a fixed subsample of the trajectory's training set (all of it in
exact mode). The net stays in eval mode (dropout off).

Distributed (``trainer.strategy=ddp`` / ``ddp_spawn``): rank r scores the pool examples r, r+W, …
(each exactly once), and computes its share of ∇J and of every Hessian-vector product; the shares
are all-reduced, so λ is the same on every rank. Each snapshot's statistics are all-reduced too.

Resume: with ``progress_dir`` set, global rank zero records each finished snapshot there
(``replay_store.ReplayProgress``); a new ReplayModule on the same directory continues after the last
finished snapshot; ``stats.npz`` is written there only when every snapshot is done.

``ClassReplayModule`` (``scoring.by_class``) is the same replay with λ a stack of K class costates, λ^{(k)} of
J_k = the objective over the downstream examples labelled k: the Hessian-vector products batched over the classes,
each pool example dotted with its own label's costate, one ``ReplayStats`` per class (``classes/<k>/stats.npz``).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from pmp_lightning.replay.costate import (PROPAGATORS, STACKED_PROPAGATORS, ObjectiveFn, describe, downstream_gradient,
                                          hessian_vector_product, hessian_vector_products)
from pmp_lightning.replay.dynamics import Dynamics, modelled_dynamics
from pmp_lightning.replay.costate import objective as make_objective
from pmp_lightning.errors import CostateDivergedError, ReplayConfigError, SnapshotError
from pmp_lightning.replay.settings import check_replay_settings, growth_advice
from pmp_lightning.replay.store import STATS_FORMAT, ReplayProgress, ReplayStats, growth_steps, top_share
from pmp_lightning.statistics.per_example import STAT_NAMES, STEP_STATS, default_chunk, output_stats, per_example_stats
from pmp_lightning.statistics.plan import block_matrix, plan_for
from pmp_lightning.training import trainable
from pmp_lightning.trajectory import load_manifest, load_moments, load_preconditioner, network_shapes, network_state

BLOCK_STATS = ("block_dot", "block_sq")  # per example and block: its share of dot and of grad_norm² (T × N × B)


class _Shard(DistributedSampler):
    """Rank r's examples r, r+W, r+2W, …: every example exactly once over the ranks (no padding)."""

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


class ReplayModule(pl.LightningModule):
    propagators = PROPAGATORS  # P_t by replay.curvature, for one costate λ (flat)

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
        blocks: list[str] | None = None,
    ):
        super().__init__()
        check_replay_settings(curvature, horizon)
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

        self.T = len(self.manifest["snapshots"]) - 1
        self.dynamics, self.eta = self._read_dynamics(curvature, hvp_samples)
        n_hvp = len(self.train_set) if hvp_samples is None else min(int(hvp_samples), len(self.train_set))
        gen = torch.Generator().manual_seed(seed)
        self.hvp_set = Subset(self.train_set, torch.randperm(len(self.train_set), generator=gen)[:n_hvp].tolist())

        self.blocks, self._to_blocks, self._param_blocks = self._read_blocks(blocks)
        self._empty_statistics(len(self.pool))
        self.lam: torch.Tensor | None = None
        self.direction: torch.Tensor | None = None  # ψ_{t+1}: λ_{t+1} itself unless momentum is replayed exactly
        self.scored: torch.Tensor | None = None  # ψ_{t+1} where a training gradient reached: what the pass dots with
        self.carry: dict[str, torch.Tensor] = {}  # the dynamics' other costates (Adam's exact adjoint: of m and v)
        # the optimizer state the epoch reads, kept with snapshots t + 1 and t; the next epoch (snapshot t − 1) reuses
        # snapshot t's instead of reading it again
        self._precond: dict[int, torch.Tensor | None] = {}  # P by snapshot (a frozen preconditioner)
        self._moments, self._moments_of = None, None  # Adam's moments at snapshot t (the exact adjoint), and that t
        self.done = np.zeros(self.T + 1, dtype=bool)  # per snapshot θ_0..θ_T
        self.seconds = np.zeros(self.T + 1)  # each finished snapshot's wall time, kept across interruptions
        self.automatic_optimization = False
        self.progress = None
        if progress_dir is not None:
            self.progress = ReplayProgress(progress_dir, self._fingerprint(curvature, horizon, n_hvp, seed))
            self._resume()
        self._first = self.T - int(self.done.sum())  # the snapshot of epoch 0 (θ_T unless resumed)
        self.resumed_seconds = float(self.seconds.sum())  # the replay's time before an interruption

    def _empty_statistics(self, n: int) -> None:
        """The arrays the replay fills, NaN until computed."""
        # dot and grad_norm: t = 0..T-1 (the steps); the model's outputs (loss, margin, correct, el2n): t = 0..T
        self.arrays = {k: np.full((self.T if k in STEP_STATS else self.T + 1, n), np.nan) for k in STAT_NAMES}
        self.arrays.update({k: np.full((self.T, n, len(self.blocks)), np.nan) for k in BLOCK_STATS})
        self.lambda_norm = np.full(self.T, np.nan)  # index t-1: ‖λ_t‖, t = 1..T (λ_0 is never needed)
        self.direction_norm = np.full(self.T, np.nan)  # index t-1: ‖ψ_t‖, the direction step t-1's dots are taken along
        self.block_direction_norm = np.full((self.T, len(self.blocks)), np.nan)  # the same, block by block
        self.participation = np.full(self.T, np.nan)  # index t-1: at θ_t, t = 1..T
        self.top_share = np.full(self.T, np.nan)  # index t-1: the share of ‖ψ_t‖² in its largest entries (store.top_share)
        self.top_param = np.full(self.T, "", dtype="U256")  # index t-1: the parameter holding most of them

    def _read_dynamics(self, curvature: str, hvp_samples: int | None) -> tuple[Dynamics, np.ndarray]:
        """The optimizer that ran, as the replay models it (``replay.dynamics``; plain descent, with a warning, for
        one it does not model), and η_t of every interval as the scores use it."""
        snaps = self.manifest["snapshots"]
        dynamics, said = modelled_dynamics(self.manifest, curvature)
        if curvature == "exact":
            self._check_exact(hvp_samples, dynamics)
        elif dynamics is None:
            warnings.warn(f"the trajectory was trained with {said}")
        dynamics = dynamics or Dynamics()
        lr_sums = np.array([s["lr_sum"] for s in snaps[1:]], dtype=np.float64)
        if dynamics.heavy_ball and not (lr_sums > 0).all():
            raise ReplayConfigError(f"the momentum replay divides by each step's learning rate, but step(s) "
                                    f"{np.flatnonzero(lr_sums <= 0).tolist()[:5]} ran at a rate of 0; use replay.curvature=expm")
        if dynamics.preconditioned and not all("preconditioner" in s for s in snaps[1:]):
            raise SnapshotError(f"{self.snapshot_dir} holds an {self.manifest['optimizer']['name']} trajectory without its "
                                f"preconditioners (snapshots written before they were kept); retrain to replay it")
        return dynamics, dynamics.step_sizes(lr_sums)

    def _read_blocks(self, groups: list[str] | None) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """The network's blocks (``stats.block_of``), the parts × blocks matrix that sums the pass's parts into them,
        and each trainable parameter's block index."""
        if groups is not None and (isinstance(groups, str) or not all(isinstance(b, str) for b in groups)):
            raise ReplayConfigError(f"replay.blocks={groups!r}: give a list of module names (e.g. [stem, layers, fc]), "
                                    f"or null for the network's top-level blocks")
        plan = plan_for(self.net, self.pool.x[:8], self.pool.y[:8])
        names, matrix = block_matrix(plan, self.net, None if groups is None else list(groups))
        of_param = torch.tensor([int(matrix[next(i for i, p in enumerate(plan.parts) if k in p.params)].argmax())
                                 for k in trainable(self.net)])
        return names, matrix, of_param

    @property
    def chunk(self) -> int:
        """Examples per chunk: ``batch_size``, or by default 64 on a CPU and 1024 on a GPU (the fastest measured)."""
        return self.batch_size or default_chunk(self.device.type)

    @property
    def remaining(self) -> int:
        """Snapshots still to replay (all T + 1, θ_T included, unless resumed)."""
        return int((~self.done).sum())

    # ------------------------------------------------------------------ checks
    def _check_model(self) -> None:
        want = network_shapes(self.net)
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

    def _check_exact(self, hvp_samples: int | None, dynamics: Dynamics | None) -> None:
        problems = []
        if any(len(s["lrs"]) != 1 for s in self.manifest["snapshots"][1:]):
            problems.append("a snapshot after every optimizer step (snapshot=every_step)")
        if self.manifest["batches_per_epoch"] != 1:
            problems.append("full-batch gradient descent (data.batch_size >= the training set size)")
        if hvp_samples is not None and hvp_samples < len(self.train_set):
            problems.append("Hessian-vector products on the whole training set (replay.hvp_samples=null)")
        if dynamics is None or dynamics.preconditioned:
            problems.append("SGD (with or without momentum or Nesterov momentum, and weight decay; no dampening), or Adam "
                            "with its moments kept at every snapshot (snapshot=every_step; otherwise its replay holds "
                            "the preconditioner fixed, an approximation)")
        if problems:
            raise ReplayConfigError("replay.curvature=exact needs " + "; ".join(problems) + ". Use replay.curvature=coarse or expm otherwise.")

    def _fingerprint(self, curvature: str, horizon: str, n_hvp: int, seed: int) -> str:
        """What the statistics depend on besides θ: a resumed replay must match it exactly."""
        ident = {"snapshots": self.manifest["snapshots"], "curvature": curvature, "horizon": horizon,
                 "objective": describe(self.objective), "hvp_samples": n_hvp,
                 "seed": seed, "lanczos_steps": self.lanczos_steps, "pool_labels": self.pool.y.tolist(),
                 "downstream": len(self.downstream), "dynamics": repr(self.dynamics), "blocks": self.blocks,
                 "format": STATS_FORMAT, **self._identity()}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def _identity(self) -> dict:
        """What a subclass adds to the fingerprint (nothing here, so the whole replay's fingerprint is unchanged)."""
        return {}

    # ------------------------------------------------------------------ resume
    def _resume(self) -> None:
        state = self.progress.load()
        if state is None:
            return
        for t, row in state["rows"].items():
            for k, values in row.items():
                self.arrays[k][t] = values
        self.done = state["done"]
        self.lambda_norm, self.participation = state["lambda_norm"], state["participation"]
        self.direction_norm, self.block_direction_norm = state["direction_norm"], state["block_direction_norm"]
        self.top_share, self.top_param = state["top_share"], state["top_param"]
        self.lam, self.direction = torch.from_numpy(state["costate"]), torch.from_numpy(state["direction"])
        self.seconds = state.get("seconds", self.seconds)
        self.carry = {k[len("carry_"):]: torch.from_numpy(v) for k, v in state.items() if k.startswith("carry_")}

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
        if self.lam is not None:  # resumed: λ and ψ of the last finished snapshot
            self.lam = self.lam.to(self.device, self.dtype)
            self.direction = self.direction.to(self.device, self.dtype)
            self.carry = {k: v.to(self.device, self.dtype) for k, v in self.carry.items()}

    def on_train_epoch_start(self) -> None:
        self._epoch_start = time.perf_counter()
        t = self.snapshot_of_epoch(self.current_epoch)
        self._load(t)
        # Adam: P_t of interval t (θ_t → θ_{t+1}), kept with snapshot t+1, carries λ_{t+1} back; P_{t−1}, kept with
        # snapshot t, turns λ_t into the direction ψ_t = P_{t−1} λ_t of interval t − 1
        before = self._precond  # the epoch before's, of snapshots t + 2 and t + 1 (none on a resume)
        self._precond = ({k: before[k] if k in before else self._preconditioner(k) for k in (t + 1, t)}
                         if self.dynamics.preconditioned else {})
        # Adam's exact adjoint: m_{t−1}, m_t, v_t and the step count at t turn λ_t into ψ_t (no moments before θ_1)
        later = self._moments if self._moments_of == t + 1 else None  # the epoch before's: snapshot t + 1's
        self._moments = self._read_moments(t) if self.dynamics.needs_moments and t > 0 else None
        self._moments_of = t
        self.scored = None if t == self.T else self._reached(self.direction, t + 1, later)
        self._lam_dict = None if t == self.T else self._directions()  # θ_T: no λ_{T+1}, no dot

    def _propagator(self):
        """P_t of ``replay.curvature``."""
        return self.propagators[self.curvature]

    def _directions(self):
        """ψ_{t+1} by parameter name where the optimizer's step reached (``_reached``), what the statistics pass of
        this epoch dots with."""
        return self._unflatten(self.scored)

    def _reached(self, direction: torch.Tensor, s: int, moments=None) -> torch.Tensor:
        """ψ_s (``direction``) on the coordinates the dynamics say a training gradient has reached by snapshot s
        (``Dynamics.reach``: under Adam, where √v̂ > ε/1000), zero elsewhere: what the dots and every norm that scores
        read are taken along. The recursion keeps the whole ψ. ``moments``: Adam's at snapshot s, where the caller
        has them."""
        # the state kept with snapshot s: its P (loaded for this epoch), else Adam's moments
        if not self.dynamics.needs_moments or self.dynamics.preconditioned:
            moments = None
        elif moments is None:
            moments = self._moments if s == self.snapshot_of_epoch(self.current_epoch) else self._read_moments(s)
        reach = self.dynamics.reach(self._precond.get(s), moments)
        return direction if reach is None else direction * reach

    def _direction_for(self, y: torch.Tensor):
        """The direction the chunk with labels ``y`` is dotted with: ψ_{t+1} for every chunk here."""
        return self._lam_dict

    def _row_stats(self, t: int) -> list[str]:
        """The statistics snapshot t has: all of them, but at θ_T only the model's outputs (a forward pass)."""
        return [k for k in STAT_NAMES if t < self.T or k not in STEP_STATS] + (list(BLOCK_STATS) if t < self.T else [])

    def training_step(self, batch, batch_idx):
        x, y, i = batch
        t = self.snapshot_of_epoch(self.current_epoch)
        if t < self.T:
            stats = per_example_stats(self.net, x, y, self._direction_for(y), by_layer=True)
            to_blocks = self._to_blocks.to(stats["layer_sq"].device, stats["layer_sq"].dtype)
            stats["block_dot"], stats["block_sq"] = stats.pop("layer_dot") @ to_blocks, stats.pop("layer_sq") @ to_blocks
        else:
            stats = output_stats(self.net, x, y)
        idx = i.cpu().numpy()
        for k, v in stats.items():
            self.arrays[k][t, idx] = v.cpu().double().numpy()

    def on_train_epoch_end(self) -> None:
        t = self.snapshot_of_epoch(self.current_epoch)
        self._gather_row(t)
        if t == self.T:  # λ_T = ψ_T = ∇J(θ_T)
            self.lam, share = self._downstream()
            self.direction = self.dynamics.direction(self.lam, None, 0.0, float(self.eta[t - 1]), self._precond.get(t),
                                                     moments=self._moments, carry=self.carry)
            self._record_norm(t, share)
        elif t > 0:  # λ_0 enters no score
            later = self.lam  # λ_{t+1}
            lam = self.dynamics.propagate(self._propagator(), self._hvp, later, self.direction,
                                          float(self.eta[t]), self.lanczos_steps, self._precond.get(t + 1))
            grad_J, share = self._downstream(need_grad=self.horizon == "area")
            self.lam = lam + grad_J if self.horizon == "area" else lam
            self.direction = self.dynamics.direction(self.lam, self.direction, float(self.eta[t]), float(self.eta[t - 1]),
                                                     self._precond.get(t), later, self._moments, self.carry)
            self._record_norm(t, share)
        self.done[t] = True
        self.seconds[t] = time.perf_counter() - self._epoch_start
        if self.progress is not None and self.trainer.is_global_zero:
            self.progress.save(t, {k: self.arrays[k][t] for k in self._row_stats(t)}, costate=self.lam.detach().cpu().numpy(),
                               direction=self.direction.detach().cpu().numpy(), done=self.done, lambda_norm=self.lambda_norm,
                               direction_norm=self.direction_norm, block_direction_norm=self.block_direction_norm,
                               participation=self.participation, seconds=self.seconds, top_share=self.top_share,
                               top_param=self.top_param,
                               **{f"carry_{k}": v.detach().cpu().numpy() for k, v in self.carry.items()})

    def on_train_end(self) -> None:
        if self.progress is not None and self.trainer.is_global_zero and self.done.all():
            self.save_stats()

    def save_stats(self) -> Path:
        """Write the finished statistics to ``progress_dir/stats.npz`` (what the pipeline's cache entry holds)."""
        return self.results().save(self.progress.stats_path)

    def _gather_row(self, t: int) -> None:
        """Give every rank snapshot t's statistics for the whole pool (each rank computed its shard)."""
        if self.trainer.world_size == 1:
            return
        names = self._row_stats(t)
        widths = [1 if self.arrays[k][t].ndim == 1 else self.arrays[k][t].shape[1] for k in names]
        rows = torch.from_numpy(np.concatenate([self.arrays[k][t].reshape(len(self.pool), -1).T for k in names]))
        have = ~torch.isnan(rows[0])
        summed = self._all_reduce(torch.cat([torch.nan_to_num(rows, nan=0.0), have[None].double()]))
        count = summed[-1]
        if not torch.equal(count, torch.ones_like(count)):
            raise RuntimeError(f"snapshot {t}: pool examples were scored {int(count.min())} to {int(count.max())} times "
                               f"across the ranks instead of once each")
        rows = summed[:-1].cpu().numpy()
        for k, start, width in zip(names, np.cumsum([0, *widths[:-1]]), widths):
            self.arrays[k][t] = rows[start] if self.arrays[k][t].ndim == 1 else rows[start:start + width].T

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks (identity in a single process)."""
        if self.trainer.world_size == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor.to(self.device), reduce_op="sum")

    # ------------------------------------------------------------------ costate
    def _record_norm(self, t: int, share: float) -> None:
        norm = float(self.lam.norm())
        self._check_finite(t, norm)
        self.lambda_norm[t - 1] = norm
        scored = self._reached(self.direction, t)
        self.direction_norm[t - 1] = float(scored.norm())
        self.block_direction_norm[t - 1] = self._block_norms(scored)
        self.top_share[t - 1], self.top_param[t - 1] = top_share(scored, {k: tuple(p.shape) for k, p in self._params.items()})
        self.participation[t - 1] = share
        self._warn_growth(t, self.lambda_norm, "costate norm")
        self.log("replay/lambda_norm", norm, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True)

    def _check_finite(self, t: int, norm: float, of: str = "") -> None:
        """Stop, writing no scores, where the costate λ_t (``of``: which one) became inf or NaN."""
        if not math.isfinite(norm):
            raise CostateDivergedError(
                f"the costate λ_{t}{of} became {norm} at snapshot {t} (step {self.manifest['snapshots'][t]['step']}) "
                f"with replay.curvature={self.curvature}: η_t·λ_max(H) ≫ 2 makes the recursion explode. No scores were "
                f"written. Use replay.curvature=expm (stable) or none, or snapshot more often."
            )

    def _block_norms(self, direction: torch.Tensor) -> np.ndarray:
        """A flat direction's norm within each block of the network."""
        by_block = torch.zeros(len(self.blocks), dtype=torch.float64, device=direction.device)
        by_block.index_add_(0, self._param_blocks.to(direction.device), self._flat_sq(direction))
        return by_block.sqrt().cpu().numpy()

    def _warn_growth(self, t: int, lambda_norm: np.ndarray, what: str) -> None:
        """Warn where ‖λ_t‖ (``lambda_norm``: one costate's norms over the snapshots) grew past ``growth_warning``."""
        if t in growth_steps(lambda_norm, self.growth_warning):
            norm, prev = lambda_norm[t - 1], lambda_norm[t]
            warnings.warn(f"{what} grew {norm / prev:.3g}x at snapshot {t} (‖λ_{t}‖ = {norm:.3g}, η = "
                          f"{self.eta[t]:.3g}, curvature={self.curvature}); scores from an exploding recursion are "
                          f"unreliable: {growth_advice(self.curvature)}")

    # ------------------------------------------------------------------ θ_t, ∇J, Hessian-vector products
    def _load(self, t: int) -> None:
        net_state = network_state(self.snapshot_dir, self.manifest["snapshots"][t])
        for k, v in net_state.items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise SnapshotError(f"snapshot {t} ({self.manifest['snapshots'][t]['file']}) holds non-finite values in {k}; training diverged, lower the learning rate")
        self.net.load_state_dict(net_state)
        self.net.eval()  # the replay differentiates the deterministic network: dropout off
        self._params = {k: p.detach() for k, p in trainable(self.net).items()}

    def _read_moments(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
        """Adam's m_{t−1}, m_t and v_t, flat like λ, on the device, its step count at snapshot t and the steps it took
        from snapshot t − 1 to t."""
        m_before, _, k_before = load_moments(self.snapshot_dir, self.manifest["snapshots"][t - 1])
        m, v, k = load_moments(self.snapshot_dir, self.manifest["snapshots"][t])
        flat = lambda d: self._flatten(d).to(self.device, self.dtype)  # noqa: E731
        return flat(m_before), flat(m), flat(v), k, k - k_before

    def _preconditioner(self, t: int) -> torch.Tensor | None:
        """The flat preconditioner kept with snapshot t (the optimizer's last step before it), on the device."""
        if not 1 <= t <= self.T:
            return None
        state = load_preconditioner(self.snapshot_dir, self.manifest["snapshots"][t])
        return self._flatten(state).to(self.device, self.dtype)

    def _flat_sq(self, vec: torch.Tensor) -> torch.Tensor:
        """The squared norm of ``vec`` (flattened like the parameters) per trainable parameter, in float64."""
        return torch.stack([t.double().pow(2).sum() for t in self._unflatten(vec).values()])

    def _flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[k].reshape(-1) for k in self._params])

    def _unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        out, offset = {}, 0
        for k, p in self._params.items():
            out[k] = vec[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        return out

    def _batches(self, dataset):
        """This rank's share of ``dataset`` on the device, chunk by chunk: a fresh iterator per call."""
        return lambda: ((x.to(self.device), y.to(self.device)) for x, y, _ in self._shard_loader(dataset))

    def _downstream(self, need_grad: bool = True) -> tuple[torch.Tensor | None, float]:
        """∇J at the loaded θ, flattened (None unless ``need_grad``), and the share of the downstream set carrying it."""
        grads, _, share = downstream_gradient(self.net, self._params, self.objective, self._batches(self.downstream),
                                              len(self.downstream), need_grad, self._all_reduce)
        return (self._all_reduce(self._flatten(grads)) / len(self.downstream) if need_grad else None), share

    def _hvp(self, vec: torch.Tensor) -> torch.Tensor:
        """∇²L(θ_t) · vec for the mean training loss over the fixed subsample."""
        total = hessian_vector_product(self.net, self._params, self._unflatten(vec), self._batches(self.hvp_set))
        return self._all_reduce(self._flatten(total)) / len(self.hvp_set)

    # ------------------------------------------------------------------ results
    def results(self) -> ReplayStats:
        if any(np.isnan(a).any() for a in self.arrays.values()):
            raise RuntimeError("the replay did not finish: some snapshots or pool examples have no statistics")
        return ReplayStats(**self.arrays, eta=self.eta, lambda_norm=self.lambda_norm.copy(),
                           direction_norm=self.direction_norm.copy(), participation=self.participation.copy(),
                           block_direction_norm=self.block_direction_norm.copy(), blocks=np.array(self.blocks),
                           direction_top_share=self.top_share.copy(), direction_top_param=self.top_param.copy())


# ====================================================================== all the class costates in one replay
class _ClassChunks(Dataset):
    """The pool in chunks of one label each: each class's examples in their order, ``size`` at a time, the classes in
    order. Item c is chunk c as a whole batch (x, y, positions in the pool), so a loader takes it with
    ``batch_size=None`` and a distributed replay shards whole chunks (every example still scored exactly once)."""

    def __init__(self, pool, classes: list[int], size: int):
        self.pool = pool
        self.chunks = []
        for k in classes:
            where = torch.nonzero(pool.y == k).flatten()
            self.chunks += [where[s:s + size] for s in range(0, len(where), size)]

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, c: int):
        where = self.chunks[c]
        return self.pool.x[where], self.pool.y[where], where


class ClassReplayModule(ReplayModule):
    """The class costates of ``scoring.by_class`` in one replay: for each class k of ``classes`` (by default the pool's
    labels), J_k = the mean of ``objective`` over the downstream examples labelled k, and each pool example scored
    along the costate of its own label only. It gives, class by class, what a ``ReplayModule`` on the pool examples
    labelled k with the downstream examples labelled k gives (``results()``: one ``ReplayStats`` per class), at the
    cost of about one replay instead of K:

    - λ and ψ are stacks, K × P (row r: class ``classes[r]``), and every dynamics' formula applies to them row-wise;
    - the Hessian-vector products of a snapshot take all K rows at once (``costate.hessian_vector_products``:
      ``torch.func.vmap`` over the forward-over-reverse ``jvp``, so the training loss's forward and backward run once
      per batch of the HVP subsample and only the tangents carry K; one ``jvp`` per row where vmap fails), and
      ``curvature=expm`` runs the K Lanczos iterations in lockstep (``costate.lanczos_expm_stack``);
    - ∇J_k of every k comes from one pass over the downstream set, each class's examples in their own batches;
    - the statistics pass goes over the pool once, in chunks of one label each (``_ClassChunks``), each chunk dotted
      with its label's ψ^{(k)}; grad_norm and the model's outputs do not depend on the costate at all.

    Memory grows with K: λ and ψ (and Adam's exact costates of m and v) are K × P throughout; ``curvature=expm``'s
    Lanczos basis is lanczos_steps × (rows at once) × P during a snapshot's propagation, and the vmapped tangents are
    (rows at once) × an HVP batch's activations. ``class_batch`` sets the rows at once (by default all K on a CPU,
    and on a GPU what fits a quarter of the free memory, halved whenever a product runs out of it: ``_rows_at_once``).
    The per-step vectors (``lambda_norm``, ``participation``, ``direction_norm``, …) have one column per class; the
    progress files hold the stacks, so an interrupted replay resumes them as the whole replay does."""

    propagators = STACKED_PROPAGATORS

    def __init__(self, net: nn.Module, snapshot_dir: str | Path, pool, downstream, train_set,
                 classes: list[int] | None = None, class_batch: int | None = None, vectorised: bool = True, **settings):
        labels = sorted(set(pool.y.tolist()))
        classes = labels if classes is None else sorted({int(k) for k in classes})
        if not classes:
            raise ReplayConfigError("the class replay needs at least one class")
        unscored = sorted(set(labels) - set(classes))
        if unscored:
            raise ReplayConfigError(f"pool examples are labelled with class(es) {unscored[:10]}, which the class replay "
                                    f"was not given; each example is scored against its own label's costate")
        lacking = [k for k in classes if not bool((downstream.y == k).any())]
        if lacking:
            raise ReplayConfigError(f"the downstream set has no example of class(es) {lacking[:10]}, so J_k is "
                                    f"undefined there; give a downstream set with every class of the pool")
        if class_batch is not None and int(class_batch) < 1:
            raise ReplayConfigError(f"class_batch={class_batch!r}: give a positive number of classes, or None for all")
        self.classes = classes  # before ReplayModule.__init__: the statistics' shapes and the fingerprint read it
        self.class_batch, self.vectorised = class_batch, vectorised
        super().__init__(net, snapshot_dir, pool, downstream, train_set, **settings)
        self._class_downstream = [self.downstream.where(self.downstream.y == k) for k in classes]

    def _identity(self) -> dict:
        return {"classes": self.classes, "class_downstream": [int((self.downstream.y == k).sum()) for k in self.classes]}

    def _empty_statistics(self, n: int) -> None:
        super()._empty_statistics(n)
        K = len(self.classes)
        self.lambda_norm, self.direction_norm = np.full((self.T, K), np.nan), np.full((self.T, K), np.nan)
        self.block_direction_norm = np.full((self.T, K, len(self.blocks)), np.nan)
        self.participation, self.top_share = np.full((self.T, K), np.nan), np.full((self.T, K), np.nan)
        self.top_param = np.full((self.T, K), "", dtype="U256")

    # ------------------------------------------------------------------ the pool, chunk by chunk of one label
    def train_dataloader(self) -> DataLoader:
        chunks = _ClassChunks(self.pool, self.classes, self.chunk)
        world = self.trainer.world_size
        sampler = _Shard(chunks, num_replicas=world, rank=self.global_rank, shuffle=False) if world > 1 else None
        return DataLoader(chunks, batch_size=None, shuffle=False, sampler=sampler)

    def _directions(self) -> dict[int, dict[str, torch.Tensor]]:
        return {k: self._unflatten(self.scored[r]) for r, k in enumerate(self.classes)}

    def _direction_for(self, y: torch.Tensor):
        return self._lam_dict[int(y[0])]  # a chunk holds one label (_ClassChunks)

    # ------------------------------------------------------------------ ∇J_k and the stacked Hessian-vector products
    def _downstream(self, need_grad: bool = True) -> tuple[torch.Tensor | None, np.ndarray]:
        """∇J_k at the loaded θ for every class (K × P; None unless ``need_grad``) and each J_k's participation: one
        pass over the downstream set, each class's examples in batches of their own."""
        grads, shares = [], []
        for ds in self._class_downstream:
            g, _, share = downstream_gradient(self.net, self._params, self.objective, self._batches(ds), len(ds),
                                              need_grad, self._all_reduce)
            if need_grad:
                grads.append(self._all_reduce(self._flatten(g)) / len(ds))
            shares.append(share)
        return (torch.stack(grads) if need_grad else None), np.array(shares)

    def _rows_at_once(self) -> int:
        """Classes one Hessian-vector product (and one Lanczos group) carries: ``class_batch``, or by default all of
        them on a CPU, and on a GPU as many as keep the Lanczos basis, λ and ψ of the group within a quarter of the
        free memory (the tangents' share is bounded by halving on running out, ``_hvp``)."""
        if self.class_batch is not None:
            return int(self.class_batch)
        K = len(self.classes)
        if self.device.type != "cuda":
            return K
        free, _ = torch.cuda.mem_get_info(self.device)
        per_class = (self.lanczos_steps + 4) * sum(p.numel() for p in self._params.values()) * self.dtype.itemsize
        return max(1, min(K, int(0.25 * free // per_class)))

    def _propagator(self):
        propagate = self.propagators[self.curvature]
        if self.curvature != "expm":
            return propagate  # λ − η H λ and λ: one stacked HVP call, which _hvp groups itself
        group = self._rows_at_once()  # exp(−η H⁺) λ: each group of rows holds its own Lanczos basis (steps × rows × P)
        return lambda hvp, lam, eta, steps: torch.cat([propagate(hvp, lam[s:s + group], eta, steps)
                                                       for s in range(0, len(lam), group)])

    def _hvp(self, vec: torch.Tensor) -> torch.Tensor:
        """∇²L(θ_t) · v for each row of ``vec`` (R × P), ``_rows_at_once`` rows per pass, halved while the device runs
        out of memory (a flat ``vec``: the plain product)."""
        if vec.dim() == 1:
            return super()._hvp(vec)
        group = min(len(vec), self._rows_at_once())
        while True:
            try:
                return torch.cat([self._stacked_hvp(vec[start:start + group]) for start in range(0, len(vec), group)])
            except torch.OutOfMemoryError:
                if group == 1:
                    raise
                group = max(1, group // 2)
                self.class_batch = group
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                warnings.warn(f"the class replay's stacked Hessian-vector products ran out of memory; {group} classes "
                              f"at a time from now on")

    def _stacked_hvp(self, rows: torch.Tensor) -> torch.Tensor:
        vs = {k: rows[:, offset:offset + p.numel()].reshape(len(rows), *p.shape)
              for (k, p), offset in zip(self._params.items(), self._offsets())}
        batches = self._batches(self.hvp_set)
        if self.vectorised:
            try:
                total = hessian_vector_products(self.net, self._params, vs, batches, vectorised=True)
            except torch.OutOfMemoryError:
                raise  # fewer classes at a time (_hvp), not the loop
            except Exception as err:  # a layer without a vmap rule surfaces as one of several types deep inside torch
                warnings.warn(f"the class replay's Hessian-vector products cannot be vectorised over the classes with "
                              f"torch.func.vmap ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                              f"taking them one class at a time")
                self.vectorised = False
        if not self.vectorised:
            total = hessian_vector_products(self.net, self._params, vs, batches, vectorised=False)
        flat = torch.cat([total[k].reshape(len(rows), -1) for k in self._params], dim=1)
        return self._all_reduce(flat) / len(self.hvp_set)

    def _offsets(self) -> list[int]:
        return np.cumsum([0] + [p.numel() for p in self._params.values()])[:-1].tolist()

    # ------------------------------------------------------------------ per-class records
    def _record_norm(self, t: int, share: np.ndarray) -> None:
        norms = self.lam.norm(dim=1).double().cpu().numpy()
        for r, k in enumerate(self.classes):
            self._check_finite(t, norms[r], f" of class {k}")
        self.lambda_norm[t - 1] = norms
        scored = self._reached(self.direction, t)
        self.direction_norm[t - 1] = scored.norm(dim=1).double().cpu().numpy()
        shapes = {k: tuple(p.shape) for k, p in self._params.items()}
        for r in range(len(self.classes)):
            self.block_direction_norm[t - 1, r] = self._block_norms(scored[r])
            self.top_share[t - 1, r], self.top_param[t - 1, r] = top_share(scored[r], shapes)
        self.participation[t - 1] = share
        for r, k in enumerate(self.classes):
            self._warn_growth(t, self.lambda_norm[:, r], f"the costate norm of class {k}")
        self.log("replay/lambda_norm", float(norms.max()), prog_bar=True, on_step=False, on_epoch=True, sync_dist=True)

    # ------------------------------------------------------------------ results
    def results(self) -> dict[int, ReplayStats]:
        """One ``ReplayStats`` per class k: the columns of the pool examples labelled k (in their order) and class k's
        per-step vectors, as a ``ReplayModule`` scoring only them with J_k gives."""
        if any(np.isnan(a).any() for a in self.arrays.values()):
            raise RuntimeError("the replay did not finish: some snapshots or pool examples have no statistics")
        labels = self.pool.y.numpy()
        out = {}
        for r, k in enumerate(self.classes):
            own = labels == k
            out[k] = ReplayStats(**{name: a[:, own] for name, a in self.arrays.items()}, eta=self.eta,
                                 lambda_norm=self.lambda_norm[:, r].copy(), direction_norm=self.direction_norm[:, r].copy(),
                                 participation=self.participation[:, r].copy(),
                                 block_direction_norm=self.block_direction_norm[:, r].copy(), blocks=np.array(self.blocks),
                                 direction_top_share=self.top_share[:, r].copy(),
                                 direction_top_param=self.top_param[:, r].copy())
        return out

    def save_stats(self) -> Path:
        """Each class's statistics to ``progress_dir/classes/<k>/stats.npz`` (``ReplayProgress.class_stats_path``)."""
        for k, stats in self.results().items():
            stats.save(self.progress.class_stats_path(k))
        return self.progress.directory
