"""The replay's files: ``stats.npz`` (``ReplayStats``, what the scores read; the class replay writes one per class,
``classes/<k>/stats.npz``) and the progress a killed replay resumes from (``ReplayProgress``: ``rows/row_<t>.npz`` per finished snapshot, then ``costate.npz`` with λ, the done-mask over
the snapshots and a fingerprint of the replay's inputs). Every file is written atomically, the costate last, so a
crash between the two leaves a row that is simply redone."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from pmp_lightning.errors import ReplayConfigError, SnapshotError
from pmp_lightning.io import save_npz

# the format of stats.npz and of the replay's progress, in the replay cache key and the progress fingerprint:
# 3: θ_T's outputs are a row of their own; 4: the direction ψ the dots are taken along (momentum), direction_norm;
# 5: how much of ψ a few of its entries hold (direction_top_share, direction_top_param); 6: under Adam the dots and
# norms are taken along ψ where a training gradient reached (Dynamics.reach)
STATS_FORMAT = 6


def replay_key_config(cfg: DictConfig) -> dict[str, Any]:
    """The replay's settings and the objective J. Its cache entry adds the train entry replayed (``train_entry``: a
    retrained entry gets a new one) and the downstream set's content (``downstream_content``)."""
    return {"replay": OmegaConf.to_container(cfg.replay, resolve=True),
            "objective": OmegaConf.to_container(cfg.objective, resolve=True), "stats_format": STATS_FORMAT}


@dataclass
class ReplayStats:
    """Everything the scores need: per-example arrays over the snapshots and per-step vectors.

    ``dot[t, n] = ⟨ψ_{t+1}, ∇l_n(θ_t)⟩`` and ``grad_norm[t, n] = ‖∇l_n(θ_t)‖`` for t = 0..T-1 (T × N), the snapshots
    each step starts from; the PMP contribution is ``c[t, n] = eta[t] * dot[t, n]``. ``loss``, ``margin``,
    ``correct`` and ``el2n`` hold one row per snapshot θ_0..θ_T ((T+1) × N): the baselines that read the model's
    verdict use the trained snapshots θ_1..θ_T (``trained``), so the final model counts and the initialisation
    does not.
    ``lambda_norm[t] = ‖λ_{t+1}‖`` and ``direction_norm[t] = ‖ψ_{t+1}‖``, the vector ``dot`` is taken along (λ itself
    unless momentum is replayed exactly: ``replay.dynamics``; under Adam, only where a training gradient reached,
    ``Dynamics.reach``). Per block of the network (``blocks``, names;
    ``stats.block_of``): ``block_dot[t, n, b]`` and ``block_sq[t, n, b]``, block b's share of ``dot`` and of
    ``grad_norm²`` (they add up to the whole), and ``block_direction_norm[t, b]``, ψ_{t+1}'s norm there.
    ``participation[t]`` is the fraction of downstream examples carrying
    ∇J(θ_{t+1}) (``costate.participation``). ``direction_top_share[t]`` is the share of ‖ψ_{t+1}‖² that its largest
    ``TOP_FRACTION`` of entries hold, and ``direction_top_param[t]`` the parameter that holds most of them: a share
    near 1 means a few parameters carry the whole direction (``concentration``). Columns follow the pool's positions.
    """

    dot: np.ndarray
    grad_norm: np.ndarray
    loss: np.ndarray
    margin: np.ndarray
    correct: np.ndarray
    el2n: np.ndarray
    eta: np.ndarray
    lambda_norm: np.ndarray
    direction_norm: np.ndarray
    participation: np.ndarray
    block_dot: np.ndarray
    block_sq: np.ndarray
    block_direction_norm: np.ndarray
    blocks: np.ndarray
    direction_top_share: np.ndarray = field(default_factory=lambda: np.zeros(0))
    direction_top_param: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=str))

    @property
    def contribution(self) -> np.ndarray:
        return self.eta[:, None] * self.dot

    def first(self, n: int) -> "ReplayStats":
        """The statistics of the first ``n`` scored examples (the pool, without the canaries scored after it)."""
        per_example = {"dot", "grad_norm", "loss", "margin", "correct", "el2n", "block_dot", "block_sq"}
        return ReplayStats(**{f.name: getattr(self, f.name)[:, :n] if f.name in per_example else getattr(self, f.name)
                              for f in fields(self)})

    def trained(self, name: str) -> np.ndarray:
        """The per-example statistic ``name`` at the trained snapshots θ_1..θ_T (T × N): what the baselines average."""
        return getattr(self, name)[1:]

    def save(self, path: str | Path) -> Path:
        return save_npz(path, **{f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def load(cls, path: str | Path) -> "ReplayStats":
        with np.load(path) as z:
            return cls(**{f.name: z[f.name] for f in fields(cls)})


CLASS_STATS = "classes"  # the class replay's entry: classes/<k>/stats.npz, one ReplayStats per class k


def class_stats_path(directory: str | Path, k: int) -> Path:
    """Where the class replay in ``directory`` keeps class k's statistics (a ``stats.npz`` of its own, as a replay of
    that class alone keeps it)."""
    return Path(directory) / CLASS_STATS / str(int(k)) / "stats.npz"


class ReplayProgress:
    """Rank zero's record of a replay in progress in ``directory``, bound to the ``fingerprint`` of its inputs."""

    def __init__(self, directory: str | Path, fingerprint: str):
        self.directory, self.fingerprint = Path(directory), fingerprint

    @property
    def stats_path(self) -> Path:
        return self.directory / "stats.npz"

    def class_stats_path(self, k: int) -> Path:
        """Class k's statistics, written by the replay of every class costate at once (``ClassReplayModule``)."""
        return class_stats_path(self.directory, k)

    def load(self) -> dict | None:
        """The finished snapshots' rows (``{t: {statistic: row}}``) and the state ``save`` was given (``done``, the
        last ``costate``, …); None when nothing was saved yet. Progress of other inputs, or damaged, is refused with the fix."""
        path = self.directory / "costate.npz"
        if not path.is_file():
            return None
        try:
            with np.load(path) as z:
                state = {k: z[k] for k in z.files}
            rows = {}
            for t in np.flatnonzero(state["done"]):
                with np.load(self._row(t)) as row:
                    rows[int(t)] = {k: row[k] for k in row.files}
        except Exception as err:  # a damaged npz raises various errors inside numpy and zipfile
            raise SnapshotError(f"the replay progress in {self.directory} cannot be read ({type(err).__name__}: {err}); "
                                f"delete it and rerun") from err
        if str(state["fingerprint"]) != self.fingerprint:
            raise ReplayConfigError(
                f"{path} is the progress of a replay with other snapshots, pool or replay settings; delete "
                f"{self.directory} or point the replay at a fresh directory"
            )
        state.pop("fingerprint")
        return {**state, "rows": rows, "done": state["done"].astype(bool)}

    def save(self, t: int, row: dict[str, np.ndarray], **state: np.ndarray) -> None:
        """Snapshot t's rows, then (atomically, last) the replay's state: the costate λ, the direction ψ, the done-mask
        and the per-step norms (what ``load`` gives back)."""
        save_npz(self._row(t), **row)
        save_npz(self.directory / "costate.npz", **state, fingerprint=np.array(self.fingerprint))

    def _row(self, t: int) -> Path:
        return self.directory / "rows" / f"row_{t:05d}.npz"


# the "few parameters" of ``concentration``: the largest 1% of the direction's entries (at least one), and the share
# of ‖ψ‖² they may hold before the run warns (with collapsed cosines). A direction spread over the network's parameters
# gives them less (0.30–0.44 on a GPT trained with AdamW on 171 JSONL lines of code; 0.73–0.86 on the reported CNN,
# whose dense layer holds most of its parameters); Adam's
# frozen preconditioner 1/(√v̂+ε) on rows that have barely been seen (v̂ ≈ 0) gives them nearly all (0.993 once one
# line of non-ASCII text joined those 171: the byte tokens 195, 227, … that only it holds), and every whole-gradient
# cosine then reads only those rows, which no other document's gradient touches (cosines of order 1e-5).
TOP_FRACTION, TOP_SHARE_WARNING = 0.01, 0.9
COSINE_COLLAPSE = 1e-2  # the largest |cosine| of any pool example below which the cosine has collapsed


def top_share(direction, shapes: dict[str, tuple[int, ...]]) -> tuple[float, str]:
    """The share of ‖direction‖² (a flat torch tensor over the parameters ``shapes``, in order) held by its largest
    ``TOP_FRACTION`` of entries, and where most of that part lies: the parameter, and for a matrix its heaviest rows."""
    import torch

    sq = direction.detach().double().pow(2).cpu()
    total = float(sq.sum())
    if not total > 0:
        return 0.0, ""
    top = sq.topk(max(1, int(np.ceil(TOP_FRACTION * sq.numel()))))
    sizes = [int(np.prod(shape)) for shape in shapes.values()]
    ends = torch.tensor(np.cumsum(sizes))
    owner = torch.bucketize(top.indices, ends, right=True)
    mass = torch.zeros(len(sizes), dtype=torch.float64).index_add_(0, owner, top.values)
    k = int(mass.argmax())
    name, shape = list(shapes.items())[k]
    if len(shape) < 2:
        return float(top.values.sum()) / total, name
    start = int(ends[k]) - sizes[k]
    rows = sq[start:start + sizes[k]].reshape(shape[0], -1).sum(1)
    heavy = [int(r) for r in rows.argsort(descending=True)[:5] if rows[r] > 0.01 * total]
    return float(top.values.sum()) / total, f"{name} rows {heavy}" if heavy else name


def concentration(stats: ReplayStats) -> dict | None:
    """Snapshots where a few parameters hold most of the direction the dots are taken along *and* every example's
    whole-gradient cosine with it has collapsed (all below ``COSINE_COLLAPSE`` in size): what share, where, and a
    warning that says what it does to the scores. None where that never happens, or the stats predate the check.
    Both are needed: a healthy direction can be concentrated too (the reported CNN's wide dense layer: 0.73–0.86 of
    ‖ψ‖² in its largest 1% of entries, cosines up to order 1), but only one that lives where no example's gradient
    goes leaves every cosine near 0."""
    share = stats.direction_top_share
    if not len(share):
        return None
    cosine = np.abs(np.divide(stats.dot, stats.direction_norm[:, None] * stats.grad_norm,
                              out=np.zeros_like(stats.dot), where=stats.grad_norm > 0)).max(1)
    hit = np.flatnonzero((share > TOP_SHARE_WARNING) & (cosine < COSINE_COLLAPSE))
    if not len(hit):
        return None
    t = int(hit[np.argmax(share[hit])])
    param = str(stats.direction_top_param[t])
    steps = [i + 1 for i in hit.tolist()]
    warning = (f"a few parameters dominate the replayed direction ψ: at snapshot {t + 1}, {share[t]:.1%} of ‖ψ‖² lies in "
               f"its largest {TOP_FRACTION:.0%} of entries, mostly in {param}, and no pool example's whole-gradient "
               f"cosine with it exceeds {cosine[t]:.1e} (snapshots {steps}). The cosine reads almost only those entries, "
               f"which no pool example's gradient touches; raw and the block variants are less affected. Under Adam "
               f"this is its preconditioner 1/(√v̂+ε) on rows that training has barely updated (a rare token; rows "
               f"it never updated are left out of every score).")
    return {"top_fraction": TOP_FRACTION, "share": [round(float(v), 6) for v in share], "parameter": param,
            "largest_cosine": [float(f"{v:.3g}") for v in cosine], "snapshots": steps, "warning": warning}


def growth_steps(lambda_norm: np.ndarray, factor: float) -> list[int]:
    """Snapshots t where ‖λ_t‖ > factor · ‖λ_{t+1}‖ (``lambda_norm[t-1] = ‖λ_t‖``)."""
    return [t for t in range(1, len(lambda_norm)) if lambda_norm[t - 1] > factor * lambda_norm[t] > 0]
