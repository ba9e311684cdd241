"""The per-epoch replay of Adam against the per-step exact adjoint (issue 40, item 2), on a small code LM, 3 seeds.

Three replays of each seed's training:
  step    a snapshot after every optimizer step, the exact adjoint of (θ, m, v) (``ExactAdam``): the reference;
  folded  a snapshot per epoch, m and v kept with each, the exact adjoint folded over each interval (``FoldedAdam``);
  frozen  a snapshot per epoch, the preconditioner held over each interval (``Adam``, the replay before).
For raw, cosine, block_cosine and late_fisher: each per-epoch replay's Spearman correlation with the per-step scores,
and every replay's detection AP (the pool's corrupted documents; chance 0.20). The loss filter's AP beside them.

    python docs/explorations/adam_per_epoch.py [--out DIR]
"""
import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
SETTING = ["+experiment=code_lm", "data.source.packages=[email,json,logging,http]", "data.length=32",
           "data.pool_size=200", "data.downstream_size=60", "data.test_size=40", "model.depth=1",
           "trainer.max_epochs=3", "scoring.scores=[raw,cosine,block_cosine,late_fisher,loss]", "scoring.canaries=0",
           "logger=none"]
MODES = {"step": ["snapshot=every_step", "replay.curvature=coarse"], "folded": [], "frozen": []}
SCORES = ["raw", "cosine", "block_cosine", "late_fisher"]


def run(mode: str, seed: int, out: Path) -> tuple[dict, dict]:
    from hydra import compose, initialize_config_dir

    from pmp_lightning.config import register_configs
    from pmp_lightning.pipeline import run as pipeline_run
    from pmp_lightning.replay import dynamics

    register_configs()
    run_dir = out / mode / f"seed{seed}"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*SETTING, *MODES[mode], f"seed={seed}", f"paths.root_dir={ROOT}",
                                           f"paths.output_dir={run_dir}", f"paths.cache_dir={out / 'cache' / mode}"])
    build = dynamics.Adam.build
    if mode == "frozen":  # the replay before: the moments ignored, P held over each interval
        dynamics.Adam.build = classmethod(lambda cls, opt, one, curv, rec: build.__func__(cls, opt, one, curv, rec - {"moments"}))
    try:
        metrics = pipeline_run(cfg)
    finally:
        dynamics.Adam.build = build
    with open(run_dir / "scores.csv") as f:
        header = f.readline().strip().split(",")
    table = np.genfromtxt(run_dir / "scores.csv", delimiter=",", skip_header=1, dtype=float)
    scores = {name: table[:, header.index(name)] for name in SCORES}
    return metrics, scores


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("/tmp/adam_per_epoch"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for seed in args.seeds:
        results = {mode: run(mode, seed, args.out) for mode in MODES}
        row = {"seed": seed, "loss_ap": results["step"][0]["detection"]["loss"]["ap"],
               "dynamics": {mode: m["costate"]["dynamics"] for mode, (m, _) in results.items()}}
        for name in SCORES:
            row[name] = {"ap": {mode: m["detection"][name]["ap"] for mode, (m, _) in results.items()},
                         "spearman": {mode: float(spearmanr(results["step"][1][name], s[name])[0])
                                      for mode, (_, s) in results.items() if mode != "step"}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (args.out / "summary.json").write_text(json.dumps(rows, indent=1))
    print("| seed | score | AP step / folded / frozen | Spearman vs step: folded / frozen | loss AP |")
    print("| ---: | --- | --- | --- | ---: |")
    for row in rows:
        for name in SCORES:
            ap, rho = row[name]["ap"], row[name]["spearman"]
            print(f"| {row['seed']} | {name} | {ap['step']:.3f} / {ap['folded']:.3f} / {ap['frozen']:.3f} | "
                  f"{rho['folded']:.2f} / {rho['frozen']:.2f} | {row['loss_ap']:.3f} |")


if __name__ == "__main__":
    main()
