"""The trajectory on disk: the snapshot format, in one place. ``ThetaSnapshot`` (callbacks/) writes it; the replay,
the pipeline and ``diagnose`` read it.

Layout of a snapshot directory::

    theta_0000.pt ... theta_T.pt    the training module's state_dict at each snapshot
    precond_0001.pt ...             Adam / AdamW only: the preconditioner P = 1/(√v̂ + ε) that the optimizer's last
                                    step before snapshot t used, per trainable parameter (entry "preconditioner")
    moments_0000.pt ...             Adam / AdamW only: m and v and the step count at snapshot t (entry "moments"),
                                    what the adjoint of (θ, m, v) replays (since format 2)
    manifest.json                   one entry per snapshot (t, file, step, epoch, lr_sum, lrs) plus the
                                    parameter shapes, dtype, optimizer and batches per epoch; "complete"
                                    turns true when training ends

``lr_sum`` of snapshot t is the summed learning rate of the optimizer steps between snapshots t-1 and t (η_{t-1}
of the replay); ``lrs`` lists each of those steps' learning rates. The training module keeps its network as
``self.net``, so the network's own parameters carry the prefix ``net.`` in a snapshot.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from pmp_lightning.errors import SnapshotError
from pmp_lightning.io import save_json, save_torch

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: Adam's moments with every snapshot, not only with a snapshot per step (in the train cache key)
PREFIX = "net."  # the training module's attribute holding the network


def snapshot_file(t: int) -> str:
    return f"theta_{t:04d}.pt"


def preconditioner_file(t: int) -> str:
    return f"precond_{t:04d}.pt"


def adam_preconditioner(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor] | None:
    """Adam's (and AdamW's) diagonal preconditioner P = 1/(√v̂ + ε) as its latest step used it, v̂ the bias-corrected
    second moment (its running maximum with amsgrad), keyed like ``module.state_dict()``; a parameter the optimizer has
    not stepped yet gets 0 (it did not move). None for other optimizers."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return None
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = {}
    for name, p in module.named_parameters():
        if not p.requires_grad or id(p) not in groups:
            continue
        group, state = groups[id(p)], optimizer.state.get(p, {})
        if "exp_avg_sq" not in state:
            out[name] = torch.zeros_like(p, device="cpu")
            continue
        v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        step = float(state["step"])
        v_hat = v.detach().double() / (1 - group["betas"][1] ** step)
        out[name] = (1.0 / (v_hat.sqrt() + group["eps"])).to(p.dtype).cpu()
    return out


def moments_file(t: int) -> str:
    return f"moments_{t:04d}.pt"


def adam_moments(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor] | None:
    """Adam's (and AdamW's) first and second moments m and v after its latest step, keyed ``m.<name>`` and ``v.<name>``
    like ``module.state_dict()`` (zeros before a parameter's first step), and ``step``, the optimizer's step count: what
    the exact adjoint of (θ, m, v) replays (``replay.dynamics.ExactAdam``). None for other optimizers and for amsgrad,
    whose running maximum the adjoint does not model."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return None
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    if any(g.get("amsgrad") for g in optimizer.param_groups):
        return None
    out, steps = {}, {0.0}
    for name, p in module.named_parameters():
        if not p.requires_grad or id(p) not in groups:
            continue
        state = optimizer.state.get(p, {})
        for key, moment in (("m", "exp_avg"), ("v", "exp_avg_sq")):
            out[f"{key}.{name}"] = (state[moment].detach().clone() if moment in state else torch.zeros_like(p)).cpu()
        steps.add(float(state.get("step", 0.0)))
    out["step"] = torch.tensor(max(steps), dtype=torch.float64)
    return out


def load_moments(dirpath: str | Path, entry: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """Adam's m and v kept with the snapshot ``entry``, by parameter name without the training module's prefix, and the
    optimizer's step count there."""
    path = Path(dirpath) / entry["moments"]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # missing, truncated or corrupted: torch.load raises various errors
        raise SnapshotError(f"Adam's moments {path} listed in the manifest cannot be read ({type(err).__name__}); "
                            f"retrain") from err
    moments = {key: {k[len(key) + 1 + len(PREFIX):]: v for k, v in state.items() if k.startswith(f"{key}.")}
               for key in ("m", "v")}
    return moments["m"], moments["v"], int(state["step"])


def load_preconditioner(dirpath: str | Path, entry: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The preconditioner stored with the snapshot ``entry`` (None when the optimizer kept none), by parameter name
    without the training module's prefix."""
    if "preconditioner" not in entry:
        return None
    path = Path(dirpath) / entry["preconditioner"]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise SnapshotError(f"the preconditioner {path} listed in the manifest is missing; retrain") from err
    except Exception as err:  # a truncated or corrupted file raises various errors inside torch.load
        raise SnapshotError(f"the preconditioner {path} cannot be read ({type(err).__name__}: {err}); retrain") from err
    return {k[len(PREFIX):]: v for k, v in state.items()}


def write_snapshot(dirpath: str | Path, t: int, state: dict[str, torch.Tensor]) -> Path:
    """θ_t (a module's state_dict, on the CPU), atomically."""
    return save_torch(Path(dirpath) / snapshot_file(t), state)


def write_manifest(dirpath: str | Path, manifest: dict[str, Any]) -> Path:
    return save_json(Path(dirpath) / MANIFEST, {"format": FORMAT_VERSION, **manifest})


def load_manifest(dirpath: str | Path) -> dict[str, Any]:
    """Read and check a snapshot directory's manifest; raises ``SnapshotError`` with the fix."""
    dirpath = Path(dirpath)
    if not dirpath.is_dir():
        raise SnapshotError(
            f"snapshot directory {dirpath} does not exist; train first (python run.py ...) so the "
            f"ThetaSnapshot callback writes it, or point replay.snapshot_dir at an existing run's snapshots/"
        )
    path = dirpath / MANIFEST
    if not path.is_file():
        raise SnapshotError(f"{dirpath} has no {MANIFEST}: it was not written by ThetaSnapshot, or training never started")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SnapshotError(f"{path} is not valid JSON ({err}); the snapshot directory is damaged, retrain") from err
    if not manifest.get("complete"):
        raise SnapshotError(
            f"{dirpath} holds a partial trajectory (training did not finish: {len(manifest['snapshots'])} "
            f"snapshots written); resume or rerun training before replaying"
        )
    snaps = manifest["snapshots"]
    if len(snaps) < 2:
        raise SnapshotError(f"{dirpath} has {len(snaps)} snapshot(s); the replay needs θ_0 and at least one more")
    for t, (before, after) in enumerate(zip(snaps, snaps[1:]), start=1):
        if after["t"] != t or after["step"] - before["step"] != len(after["lrs"]):
            raise SnapshotError(
                f"{dirpath} has a gap: snapshot {after['file']} is at step {after['step']} after step {before['step']} "
                f"but records {len(after['lrs'])} learning rate(s) in between; the trajectory is incomplete, retrain"
            )
    return manifest


def load_snapshot(dirpath: str | Path, entry: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The training module's state_dict at the snapshot the manifest ``entry`` describes."""
    path = Path(dirpath) / entry["file"]
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise SnapshotError(f"snapshot {path} listed in the manifest is missing; retrain") from err
    except Exception as err:  # a truncated or corrupted file raises various errors inside torch.load
        raise SnapshotError(f"snapshot {path} cannot be read ({type(err).__name__}: {err}); it is damaged, retrain") from err


def network_state(dirpath: str | Path, entry: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The network's own state_dict at one snapshot (the manifest ``entry``): the training module's prefix removed."""
    return {k[len(PREFIX):]: v for k, v in load_snapshot(dirpath, entry).items()}


def network_shapes(net: torch.nn.Module) -> dict[str, list[int]]:
    """The shapes a snapshot of ``net`` records (``param_shapes`` in the manifest), with the training module's prefix."""
    return {PREFIX + k: list(v.shape) for k, v in net.state_dict().items()}


def final_network(make_net: Callable[[], torch.nn.Module], snapshot_dir: Path) -> torch.nn.Module:
    """The trained model θ_T, the trajectory's last snapshot."""
    net = make_net()
    net.load_state_dict(network_state(snapshot_dir, load_manifest(snapshot_dir)["snapshots"][-1]))
    return net
