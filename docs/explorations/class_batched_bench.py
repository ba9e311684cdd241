"""Exploration, not part of the package: what the class costates of ``scoring.by_class`` cost, side by side in one
process, on one trajectory per setting (issue 39, item 3):

- ``whole``: the run's replay (one costate, the run's J, every scored example);
- ``per_class``: the old way, one ``ReplayModule`` per class k (J_k on the downstream examples labelled k, scoring
  the pool examples labelled k), K replays in all;
- ``batched``: ``ClassReplayModule``, the K costates as one stack, Hessian-vector products vmapped over the classes;
- ``batched_loop`` (with ``--loop``): the same with one ``jvp`` per class inside each snapshot (the fallback where
  vmap fails).

Beside them, one snapshot's stacked Hessian-vector product over the HVP subsample, vmapped and looped, at 1 and K rows.

The batched statistics are checked against the per-class ones (largest relative difference over every field, in the
trajectory's float32). Settings: ``mnist10``, the embedded MNIST (10 classes) with a tiny ResNet; ``pairs100``, MNIST
digit pairs (100 classes; ``--data-root`` holds MNIST's raw files) with a small MLP. Each trains once into
``--work`` (reused when present). ``--memory`` adds the peak resident memory each replay adds (whole, per-class,
batched), each in a fresh process; ``state_mib_per_stack`` is the size of one K × P stack (λ, ψ) in float32.

    .venv/bin/python docs/explorations/class_batched_bench.py --work /tmp/class_bench [--memory] [--loop] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

COMMON = ["trainer.enable_progress_bar=false", "logger=none", "scoring.by_class=false", "scoring.canaries=0",
          "scoring.scores=[loss]", "baselines.cleanlab=false", "select.fractions=[]", "trainer.accelerator=cpu"]
SETTINGS = {
    "mnist10": ["model=resnet", "model.width=4", "data.pool_size=300", "data.downstream_size=200", "data.test_size=200",
                "trainer.max_epochs=2", "replay.hvp_samples=32"],
    "pairs100": ["data=mnist_pairs", "data.source.size=3000", "data.source.test_size=200", "data.test_size=200",
                 "data.downstream_size=1000", "data.pool_size=500", "model=mlp", "model.hidden=64",
                 "trainer.max_epochs=2", "replay.hvp_samples=32"],
}
VARIANTS = ("whole", "per_class", "batched")


def compose(name: str, work: Path, data_root: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    from pmp_lightning.config import register_configs

    register_configs()
    extra = [f"data.source.root={data_root}"] if name == "pairs100" else []
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=[*COMMON, *SETTINGS[name], *extra, f"paths.root_dir={ROOT}",
                                                  f"paths.output_dir={work / name}", f"paths.cache_dir={work / 'cache'}"])


def prepare(name: str, work: Path, data_root: str):
    """The trajectory (trained through the pipeline once, cached in ``work``), the data and the replay's builders."""
    from hydra.utils import instantiate

    from pmp_lightning.data.base import datamodule_from_config
    from pmp_lightning.pipeline import run
    from pmp_lightning.policy import resolve
    from pmp_lightning.replay.costate import objective as make_objective
    from pmp_lightning.training import shaped

    cfg = compose(name, work, data_root)
    if not (work / name / "snapshots").exists():
        run(cfg)  # trains, and runs the whole replay once (not timed here)
    cfg = resolve(cfg)
    dm = datamodule_from_config(cfg)
    dm.setup()
    run_objective = instantiate(cfg.objective)
    net = shaped(instantiate(cfg.model, _partial_=True), dm.pool.x, dm.num_classes)
    settings = instantiate(cfg.replay, _partial_=True)
    own = make_objective(run_objective.name, **run_objective.params)  # J_k: the run's objective, not centred
    return cfg, dm, net, settings, run_objective, own


def fit(module):
    pl.Trainer(max_epochs=module.remaining, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, accelerator="cpu", devices=1).fit(module)
    return module


def replay(variant: str, name: str, work: Path, data_root: str, prepared=None):
    """(seconds, results) of one variant."""
    from pmp_lightning.replay.module import ClassReplayModule

    cfg, dm, net, settings, run_objective, own = prepared or prepare(name, work, data_root)
    snaps = work / name / "snapshots"
    classes = sorted(set(dm.scored.y.tolist()))
    start = time.perf_counter()
    if variant == "whole":
        out = fit(settings(net=net(), snapshot_dir=snaps, pool=dm.scored, downstream=dm.downstream,
                           train_set=dm.train_set, objective=run_objective)).results()
    elif variant == "per_class":
        out = {k: fit(settings(net=net(), snapshot_dir=snaps, pool=dm.scored.where(dm.scored.y == k),
                               downstream=dm.downstream.where(dm.downstream.y == k), train_set=dm.train_set,
                               objective=own)).results() for k in classes}
    else:
        build = ClassReplayModule(net=net(), snapshot_dir=snaps, pool=dm.scored, downstream=dm.downstream,
                                  train_set=dm.train_set, objective=own, classes=classes,
                                  vectorised=variant == "batched", **settings.keywords)
        out = fit(build).results()
    return time.perf_counter() - start, out


def hvp_times(prepared, snaps: Path) -> dict:
    """Seconds of one snapshot's stacked Hessian-vector product over the HVP subsample: vmapped at 1 and K rows,
    looped at K rows (each the best of two)."""
    from pmp_lightning.replay.module import ClassReplayModule

    _, dm, net, settings, _, own = prepared
    module = ClassReplayModule(net=net(), snapshot_dir=snaps, pool=dm.scored, downstream=dm.downstream,
                               train_set=dm.train_set, objective=own, **settings.keywords)
    module._load(1)
    module._batches = lambda ds: (lambda: ((x, y) for x, y, _ in torch.utils.data.DataLoader(ds, batch_size=64)))
    module._all_reduce = lambda t: t
    P, K = sum(p.numel() for p in module._params.values()), len(module.classes)
    gen = torch.Generator().manual_seed(0)

    def best(rows: int, vectorised: bool) -> float:
        module.vectorised = vectorised
        vec = torch.randn(rows, P, generator=gen)
        times = []
        for _ in range(2):
            start = time.perf_counter()
            module._hvp(vec)
            times.append(time.perf_counter() - start)
        return min(times)

    one, vmapped, looped = best(1, True), best(K, True), best(K, False)
    return {"hvp_1_s": round(one, 3), "hvp_vmap_K_s": round(vmapped, 3), "hvp_loop_K_s": round(looped, 3),
            "hvp_loop/vmap": round(looped / vmapped, 2), "hvp_vmap_K/1": round(vmapped / one, 2)}


def largest_difference(a: dict, b: dict) -> float:
    worst = 0.0
    for k in b:
        for f in fields(b[k]):
            x, y = getattr(a[k], f.name), getattr(b[k], f.name)
            if y.dtype.kind in "US":
                continue
            worst = max(worst, float(np.abs(x - y).max(initial=0.0) / max(np.abs(y).max(initial=0.0), 1e-30)))
    return worst


class ResidentPeak:
    """The largest resident memory (MiB) of this process above what it held at the start, sampled every 2 ms."""

    def __enter__(self):
        import threading

        self.start, self.peak, self.stop = self.now(), 0.0, threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    @staticmethod
    def now() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20

    def watch(self) -> None:
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, self.now() - self.start)


def peak_memory(variant: str, name: str, work: Path, data_root: str) -> float:
    """The peak resident memory (MiB) that ``variant``'s replay adds, in a fresh process that prepares the setting."""
    out = subprocess.run([sys.executable, __file__, "--work", str(work), "--data-root", data_root, "--child", name,
                          variant, "--threads", str(torch.get_num_threads())], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["added_peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/class_bench"))
    parser.add_argument("--data-root", default=str((ROOT / ".." / "shared" / "data").resolve()))
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS))
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--loop", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared CPU, more threads than "
                        "free cores make every small operation orders of magnitude slower)")
    parser.add_argument("--child", nargs=2, metavar=("SETTING", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_fabric").setLevel(logging.ERROR)
    if args.child:
        name, variant = args.child
        prepared = prepare(name, args.work, args.data_root)
        with ResidentPeak() as peak:
            replay(variant, name, args.work, args.data_root, prepared)
        print(json.dumps({"added_peak_mib": round(peak.peak, 1)}))
        return
    rows = []
    for name in args.settings:
        prepared = prepare(name, args.work, args.data_root)
        _, dm, net, *_ = prepared
        params = sum(p.numel() for p in net().parameters())
        K = len(set(dm.scored.y.tolist()))
        hvp = hvp_times(prepared, args.work / name / "snapshots")
        seconds, results = {}, {}
        for variant in VARIANTS + (("batched_loop",) if args.loop else ()):
            seconds[variant], results[variant] = replay(variant, name, args.work, args.data_root, prepared)
        diff = {v: largest_difference(results[v], results["per_class"]) for v in results if v.startswith("batched")}
        row = {"setting": name, "classes": K, "params": params, "pool": len(dm.scored), "downstream": len(dm.downstream),
               "snapshots": len(results["whole"].eta) + 1, **{f"{v}_s": round(s, 2) for v, s in seconds.items()},
               "per_class/whole": round(seconds["per_class"] / seconds["whole"], 2),
               "batched/whole": round(seconds["batched"] / seconds["whole"], 2),
               "per_class/batched": round(seconds["per_class"] / seconds["batched"], 2),
               **({"batched_loop/batched": round(seconds["batched_loop"] / seconds["batched"], 2)} if args.loop else {}),
               **{f"max_rel_diff_{v}": float(f"{d:.2e}") for v, d in diff.items()}, **hvp,
               "state_mib_per_stack": round(K * params * 4 / 2**20, 2)}
        if args.memory:
            row.update({f"{v}_added_peak_mib": peak_memory(v, name, args.work, args.data_root) for v in VARIANTS})
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print("| setting | K | params | pool | whole s | per-class s | batched s | per-class/whole | batched/whole | "
          "per-class/batched | HVP K rows: loop/vmap | HVP vmap: K rows/1 row | max rel diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['classes']} | {r['params']} | {r['pool']} | {r['whole_s']} | {r['per_class_s']} | "
              f"{r['batched_s']} | {r['per_class/whole']} | {r['batched/whole']} | {r['per_class/batched']} | "
              f"{r['hvp_loop/vmap']} | {r['hvp_vmap_K/1']} | {r['max_rel_diff_batched']:.1e} |")
    if any("batched_added_peak_mib" in r for r in rows):
        print()
        print("| setting | K | params | one K × P stack MiB | added peak MiB: whole | per-class | batched |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['setting']} | {r['classes']} | {r['params']} | {r['state_mib_per_stack']} | "
                  f"{r['whole_added_peak_mib']} | {r['per_class_added_peak_mib']} | {r['batched_added_peak_mib']} |")


if __name__ == "__main__":
    main()
