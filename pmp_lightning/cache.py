"""Stage caches: train once, replay once, score many times; and ``Stages``, where a run writes and what each of its
stages cost (wall time, peak memory), which every stage function takes.

A stage's entry lives in ``<cache_dir>/<stage>/<key>/`` where ``key`` hashes exactly the config
that affects the stage. ``cache_manifest.json`` records the stage, the key, that config and
``complete``; it is written last and atomically, so an entry whose stage crashed has none and is
never taken for a finished one: it is recomputed (training) or resumed (the replay keeps its progress). On reload the stored config must equal the requested one (a hash collision or
a hand-edited entry is refused, not silently used). A file lock serialises jobs that want the same
entry, so parallel sweep jobs compute it once.
"""
from __future__ import annotations

import ast
import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from pmp_lightning.errors import PMPError
from pmp_lightning.io import save_json
from pmp_lightning.memory import PeakMemory
from pmp_lightning.trajectory import FORMAT_VERSION

log = logging.getLogger(__name__)
MANIFEST = "cache_manifest.json"
FORMAT = 1
# trainer settings that change how a run looks, not what it computes
COSMETIC_TRAINER_KEYS = ("enable_progress_bar", "enable_model_summary", "log_every_n_steps")


def content_digest(*tensors: torch.Tensor) -> str:
    """A hash of the tensors' dtypes, shapes and bytes: what the caches key data by, so that changed data
    (a file rewritten in place, a dataset that now yields other images) always recomputes."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def code_digest(net: torch.nn.Module, target: str | None = None) -> str:
    """A hash of the source that the model runs, so that editing it (its ``forward``, a block it uses, a builder
    function, a helper function in another file) retrains instead of hitting a trajectory the old code produced.

    The rule (``model_modules``): the *roots* are every module (Python file) that a class in ``net`` comes from and
    the one ``target`` (its ``_target_``) names, torch's excepted (``torch.__version__`` stands for them). From the
    roots the import statements are followed, recursively: every ``import``/``from … import`` anywhere in a module's
    source (inside functions too; relative imports resolved against its package), each resolved to its file without
    importing anything. A module so found is kept, and walked in turn, when its file lies outside the standard
    library and outside every site-packages/dist-packages folder (``sysconfig``'s paths): the user's code and this
    project's own. Installed packages are neither read nor walked, and code reached only through ``importlib`` or
    ``exec`` is not seen. The walk is breadth-first in name order, visits each module once (cycles end there) and
    stops at ``MAX_CODE_MODULES``."""
    names = {type(m).__module__ for m in net.modules()}
    if target:
        from hydra.utils import get_object

        names.add(getattr(get_object(target), "__module__", None) or target.rsplit(".", 1)[0])
    h = hashlib.sha256(f"torch {torch.__version__};".encode())
    for name, path in sorted(model_modules([n for n in names if n and n.split(".")[0] != "torch"]).items()):
        source = Path(path).read_bytes() if path and Path(path).is_file() else b"<no source>"
        h.update(f"{name}:{len(source)};".encode())
        h.update(source)
    return h.hexdigest()[:16]


# the most modules the code key walks: far beyond a model's own code; a bound on a walk that went wide
MAX_CODE_MODULES = 2000


def model_modules(roots: list[str]) -> dict[str, str | None]:
    """``roots`` (module names) and every module their imports reach that is not installed code (``code_digest``'s
    rule), by name, with the path of its file (None: no file)."""
    found: dict[str, str | None] = {}
    queue, queued = sorted(set(roots)), set(roots)
    while queue and len(found) < MAX_CODE_MODULES:
        name = queue.pop(0)
        path, package = _locate(name)
        if name not in roots and (path is None or not _user_file(path)):
            continue
        found[name] = path
        following = sorted(n for n in _imports(name, path, package) if n not in queued)
        queued.update(following)
        queue += following
    if queue:
        log.warning(f"the model's code key covers the first {MAX_CODE_MODULES} modules its imports reach, of more; "
                    f"code beyond them is not in the train cache key")
    return found


def _locate(name: str) -> tuple[str | None, bool]:
    """The file of module ``name`` (None where it has none or none is found) and whether it is a package, from
    ``sys.modules`` or its import spec, without importing it or its parents."""
    module = sys.modules.get(name)
    if module is not None:
        path = getattr(module, "__file__", None)
        return (path if isinstance(path, str) else None), hasattr(module, "__path__")
    spec = _spec(name)
    if spec is None:
        return None, False
    return (spec.origin if spec.has_location else None), spec.submodule_search_locations is not None


def _spec(name: str):
    """Module ``name``'s spec; a submodule's is looked for in its parent's folders, so no parent is imported."""
    import importlib.machinery
    import importlib.util

    parent, _, _ = name.rpartition(".")
    try:
        if not parent:
            return importlib.util.find_spec(name)  # a top-level name: the finders only look
        module = sys.modules.get(parent)
        if module is not None:
            locations = getattr(module, "__path__", None)  # None: the parent is a plain module, `name` an attribute
        else:
            spec = _spec(parent)
            locations = spec.submodule_search_locations if spec is not None else None
        return importlib.machinery.PathFinder.find_spec(name, list(locations)) if locations is not None else None
    except (ImportError, ValueError, AttributeError, TypeError, OSError):  # a broken or odd finder: no file
        return None


@functools.lru_cache(maxsize=1)
def _installed_roots() -> tuple[Path, ...]:
    """The folders of installed code: the standard library and every site-packages (``sysconfig``, ``site``)."""
    import site
    import sysconfig

    paths = {sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths.update({sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix}).get(k)
                  for k in ("stdlib", "platstdlib", "purelib", "platlib")})
    with contextlib.suppress(AttributeError):  # site.getsitepackages is missing in some embedded interpreters
        paths.update(site.getsitepackages())
    paths.add(site.getusersitepackages())
    return tuple(sorted({Path(p).resolve() for p in paths if p}))


def _user_file(path: str) -> bool:
    """Whether ``path`` is code of one's own: outside the standard library and every installed-packages folder."""
    resolved = Path(path).resolve()
    if {"site-packages", "dist-packages"} & set(resolved.parts):
        return False
    return not any(resolved.is_relative_to(root) for root in _installed_roots())


def _imports(name: str, path: str | None, package: bool) -> set[str]:
    """The modules that the import statements in ``path`` (module ``name``'s source) name: ``import a.b`` gives
    ``a.b``; ``from a import b`` gives ``a`` and ``a.b`` (b may be a submodule); relative ones resolved."""
    if path is None or not path.endswith(".py") or not Path(path).is_file():
        return set()
    try:
        tree = ast.parse(Path(path).read_bytes(), filename=path)
    except (SyntaxError, ValueError):  # not parseable here: its bytes are in the key all the same
        return set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = (name if package else name.rpartition(".")[0]).split(".")
                if node.level - 1 >= len(parts) or not parts[0]:
                    continue  # beyond the top-level package: Python would refuse it too
                anchor = ".".join(parts[: len(parts) - (node.level - 1)])
                base = f"{anchor}.{base}" if base else anchor
            if base:
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


class CacheError(PMPError, RuntimeError):
    """A cache entry that does not match what it claims to hold."""


# data settings the content key covers better (they decide what is in the pool, the training and test sets, whose
# bytes the key holds) or that belong to the replay (the downstream set) or to no stage (the known errors)
NOT_TRAIN_KEYS = ("known_errors", "downstream_size", "downstream_includes_pool", "downstream", "labels_file", "labels_key",
                  "wide_size")  # the data scorer's wide slice is dealt after the splits the training reads


def train_key_config(cfg: DictConfig) -> dict[str, Any]:
    """The settings that determine the trajectory (and so the snapshots and test accuracy). Its cache entry adds what
    the data and the model are, not only where they came from (``StageCache``'s ``identity``): the content of the
    training set, the pool and the test set (``data_content``, ``PoolDataModule.content_key``) and the model's code
    (``model_code``, ``code_digest``), not only its ``_target_``."""
    trainer = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items() if k not in COSMETIC_TRAINER_KEYS}
    keys = ("data", "noise", "model", "optimizer", "lr_schedule", "snapshot")
    config = {"seed": cfg.seed, "trainer": trainer, **{k: OmegaConf.to_container(cfg[k], resolve=True) for k in keys},
              "trajectory_format": FORMAT_VERSION}
    for key in NOT_TRAIN_KEYS:
        config["data"].pop(key, None)
    if "reference" in config["noise"]:
        config["noise"]["reference"].pop("cache_dir", None)  # where noise=confusion keeps its reference, not what it is
        trainer = config["noise"]["reference"]["trainer"]
        config["noise"]["reference"]["trainer"] = {k: v for k, v in trainer.items() if k not in COSMETIC_TRAINER_KEYS}
    return config


class StageCache:
    def __init__(self, root: str | Path, stage: str, config: dict[str, Any], **identity: Any):
        """The entry of ``stage`` for ``config`` (settings) and ``identity`` (what they were applied to: the data's
        content, the model's code, the entry a stage continues), which together make the key."""
        self.stage = stage
        self.config = json.loads(json.dumps({**config, **identity}, default=str))  # as the manifest will hold it
        self.key = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(root) / stage / self.key

    @contextmanager
    def locked(self):
        """Hold this entry's lock: the first job computes it, the others wait and then hit."""
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        path = self.dir.parent / f".{self.key}.lock"
        with open(path, "a+") as lock:  # "a+": opening must not erase the holder's name
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "another job"
                log.info(f"{self.stage} cache: waiting for {holder}, which is computing {self.dir} (lock {path})")
                fcntl.flock(lock, fcntl.LOCK_EX)
                log.info(f"{self.stage} cache: {path.name} released, going on")
            lock.seek(0)
            lock.truncate()
            lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            lock.flush()
            try:
                yield self
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def load(self, missing: Callable[[Path], list[str]] | None = None) -> dict[str, Any] | None:
        """The entry's recorded results if it is complete, matches and (``missing``) lacks no file, else None.

        ``missing(dir)`` lists the files a complete entry must hold but does not: such an entry (a file
        deleted by hand, a disk cleaned up) is recomputed rather than hit.
        """
        path = self.dir / MANIFEST
        if not path.is_file():  # the manifest is written last: without it the stage never finished
            return None
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise CacheError(f"{path} is not valid JSON ({err}); delete {self.dir} and rerun") from err
        if not isinstance(manifest, dict):
            raise CacheError(f"{path} holds a JSON {type(manifest).__name__}, not a cache manifest; delete {self.dir} and rerun")
        if (manifest.get("format"), manifest.get("stage"), manifest.get("key"), manifest.get("complete")) != (
            FORMAT, self.stage, self.key, True
        ):
            raise CacheError(f"{path} describes another entry (format/stage/key/complete differ); delete {self.dir} and rerun")
        if manifest.get("config") != self.config:
            raise CacheError(f"{path} was written for a different config than its key says; delete {self.dir} and rerun")
        lost = missing(self.dir) if missing else []
        if lost:
            log.warning(f"{self.stage} cache entry {self.dir} is complete but lacks {', '.join(lost[:3])}"
                        f"{' …' if len(lost) > 3 else ''}; recomputing it")
            (self.dir / MANIFEST).unlink()
            return None
        log.info(f"{self.stage} cache hit: {self.dir}")
        return manifest["results"]

    def start(self, resume: bool = False) -> Path:
        """The directory to compute into: a partial entry is cleared, or kept when the stage can ``resume`` it."""
        if self.dir.exists() and not resume:
            log.info(f"{self.stage} cache: {self.dir} is a partial entry (no manifest); recomputing")
            shutil.rmtree(self.dir)
        log.info(f"{self.stage} cache miss: computing into {self.dir}")
        self.dir.mkdir(parents=True, exist_ok=True)
        return self.dir

    def load_or_compute(self, compute: Callable[[Path], dict[str, Any]], missing: Callable[[Path], list[str]] | None = None,
                        resume: bool = False, lead: bool = True, agree: Callable[[str, Any], Any] = lambda name, v: v
                        ) -> dict[str, Any]:
        """The entry's results: loaded when complete (``load``), else computed by ``compute(directory)`` into it and
        committed, all under the entry's lock. ``resume`` keeps a partial entry for ``compute`` to continue. In a
        process that is not the ``lead`` (another rank of a distributed run), nothing is locked, loaded or written:
        ``agree(name, value)`` hands it the lead's decisions (the identity in a single process)."""
        with self.locked() if lead else contextlib.nullcontext():
            done = agree(self.stage, self.load(missing=missing) if lead else None)
            if done is None:
                results = compute(self.start(resume=resume) if lead else self.dir)
                done = agree(f"{self.stage}_done", self.commit(results) if lead else None)
        return done

    def commit(self, results: dict[str, Any]) -> dict[str, Any]:
        """Mark the entry complete; ``results`` gains an ``entry_id`` unique to this computation."""
        results = {**results, "entry_id": uuid.uuid4().hex}
        save_json(self.dir / MANIFEST, {"format": FORMAT, "stage": self.stage, "key": self.key, "complete": True,
                                        "config": self.config, "results": results})
        return results


AFTER_INTERRUPT = {
    "train": "the same command resumes training from its last finished epoch",
    "replay": "the same command resumes the replay after its last finished snapshot",
    "class_replay": "the same command resumes the class costates' replay after its last finished snapshot",
}


@dataclass
class Stages:
    """Where a run writes and what it measures of itself: the output and cache directories, whether this process is
    global rank zero, and each stage's wall time and peak memory."""

    out: Path
    cache_dir: Path
    lead: bool
    timings: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        """Record the stage's wall time and the process's peak memory during it; say so when it is interrupted."""
        start = time.perf_counter()
        try:
            with PeakMemory("cuda" if torch.cuda.is_available() else "cpu") as peak:
                yield
        except (KeyboardInterrupt, SystemExit) as err:  # Lightning turns Ctrl-C into a graceful shutdown and exit(1)
            if isinstance(err, KeyboardInterrupt) or err.code not in (0, None):
                log.error(f"interrupted during {name} after {time.perf_counter() - start:.0f} s; no results were written; "
                          f"{AFTER_INTERRUPT.get(name, 'run the same command again')}")
            raise
        self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 3)  # a repeated name adds up
        if peak.peak_mib is not None:
            self.memory[name] = max(self.memory.get(name, 0.0), round(peak.peak_mib, 1))
