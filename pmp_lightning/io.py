"""Atomic writes: every artefact is written to a temporary file beside its target and renamed.

A crash (or a full disk) mid-write leaves at most a ``.*.tmp`` file, never a truncated file under
the final name.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and rename the result to ``path``; remove the temp file on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_json(path, obj: Any) -> Path:
    return atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n"))


def save_torch(path, obj: Any) -> Path:
    return atomic_write(path, lambda p: torch.save(obj, p))


def save_npz(path, **arrays: np.ndarray) -> Path:
    def write(p: Path) -> None:
        with open(p, "wb") as f:  # a file object keeps numpy from appending ".npz" to the temp name
            np.savez(f, **arrays)

    return atomic_write(path, write)


def save_text(path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def _jsonable(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


# what torch.load may rebuild besides tensors: numpy arrays and their dtypes (CIFAR-10N ships its labels so)
NUMPY_ARRAYS = [np.zeros(0).__reduce__()[0], np.ndarray, np.dtype,  # [0]: numpy's array rebuilder, wherever it lives
                *(getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType"))]


def load_arrays(path: Path):
    """What an array file holds: a dict of arrays (``.npz``; a ``.pt`` from ``torch.save`` of a dict) or one array
    (``.npy``, ``.pt``). A ``.pt`` may hold tensors or numpy arrays, and nothing else is unpickled. Errors are torch's
    and numpy's own: the caller names the setting and the fix."""
    if path.suffix == ".npz":
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    if path.suffix == ".npy":
        return np.load(path)
    with torch.serialization.safe_globals(NUMPY_ARRAYS):
        return torch.load(path, map_location="cpu", weights_only=True)


def why_unreadable(err: Exception) -> str:
    """Why torch or numpy could not load an array file, in one line: a pickle holding other objects than tensors and
    arrays (which ``load_arrays`` refuses to rebuild, for safety) names the first of them, not torch's paragraph about
    ``weights_only``; any other error gives its first line."""
    text = str(err)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return (f"it holds Python objects (a {found.group(1)}), and only tensors and numpy arrays are loaded from a "
                f"file, for safety")
    if isinstance(err, pickle.UnpicklingError) or "weights_only" in text:
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        return (f"it is damaged, or not a file of tensors and arrays"
                f"{f' (torch: {detail.group(1).strip()})' if detail else ''}")
    return f"{type(err).__name__}: {(text.strip().splitlines() or [''])[0]}"
