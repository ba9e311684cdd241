"""Why a run's PMP scores do or do not find its mislabeled examples: ⟨∇J, ∇l_n⟩ at one snapshot, layer by layer.

    python -m pmp_lightning.report.diagnose outputs/runs/<run> [--snapshot T]

For the run's objective, plain and centred, at θ_t (default: the last snapshot θ_T) it prints the
norm of the downstream set's mean logit pull w̄ and, per layer with parameters: the layer's share of
Σ_n |⟨∇J, ∇l_n⟩|, the norm of ∇J restricted to the layer, and the detection AUROC of the layer's part
of the dot product alone (low = suspect); then the whole vector's AUROC and the AP of the cosine.
A layer that carries most of the dot product at an AUROC near 0.5 drowns the others: that is what a
mean logit pull does through the output layer's bias and uncentred features (README, "The answer to
the report"). The ground truth (synthetic noise or ``data.known_errors``; a corpus's corrupted documents) is needed
for the AUROCs. A language model is rebuilt with the run's tokenizer's vocabulary, as the run built it.

It also draws ``diagnose.png`` in the run directory from the statistics the replay kept (no recomputation): per block
of the network, its share of Σ|⟨ψ_{t+1}, ∇l_n(θ_t)⟩| over all snapshots, and how well the block's cosine alone
separates the mislabeled examples (AUROC), so that a block that carries the dot product without separating shows.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from sklearn.metrics import average_precision_score, roc_auc_score

from pmp_lightning.report.compare import _save, run_config
from pmp_lightning.config import register_configs
from pmp_lightning.data.base import datamodule_from_config
from pmp_lightning.replay.store import ReplayStats
from pmp_lightning.replay.costate import describe, downstream_gradient, objective
from pmp_lightning.statistics.per_example import per_example_stats
from pmp_lightning.statistics.plan import plan_for
from pmp_lightning.training import shaped, trainable
from pmp_lightning.trajectory import load_manifest, network_state

CHUNK = 256


def diagnose(run_dir: str | Path, snapshot: int = -1) -> dict[str, dict]:
    """Per objective variant (plain, centred): the mean pull's norm, the per-layer rows and the whole-vector metrics."""
    run_dir = Path(run_dir)
    register_configs()
    cfg = run_config(run_dir)
    datamodule = datamodule_from_config(cfg)
    datamodule.setup()
    mask = datamodule.is_mislabeled
    if not mask.any() or mask.all():
        raise SystemExit(f"diagnose: {run_dir} has no ground truth to measure against (noise=none and no data.known_errors)")
    net = shaped(instantiate(cfg.model, _partial_=True), datamodule.pool.x, datamodule.num_classes,
                 datamodule.vocab_size)()  # a corpus's tokenizer gives a language model its vocabulary
    manifest = load_manifest(run_dir / "snapshots")
    entry = manifest["snapshots"][snapshot]
    net.load_state_dict(network_state(run_dir / "snapshots", entry))
    net.eval()
    plan = plan_for(net, datamodule.pool.x[:8], datamodule.pool.y[:8])
    run_objective = instantiate(cfg.objective)
    report = {"snapshot": entry["t"]}
    for centred in (False, True):
        obj = objective(run_objective.name, centred=centred, **run_objective.params)
        ds = datamodule.downstream
        grads, pull, _ = downstream_gradient(net, {k: p.detach() for k, p in trainable(net).items()}, obj,
                                             lambda: zip(ds.x.split(CHUNK), ds.y.split(CHUNK)), len(ds), with_pull=True)
        grad_j = {k: g / len(ds) for k, g in grads.items()}
        parts = [per_example_stats(net, x, y, grad_j, by_layer=True) for x, y in
                 zip(datamodule.pool.x.split(CHUNK), datamodule.pool.y.split(CHUNK))]
        layer_dot = torch.cat([p["layer_dot"] for p in parts]).double().numpy()
        dot = torch.cat([p["dot"] for p in parts]).double().numpy()
        norm = torch.cat([p["grad_norm"] for p in parts]).double().numpy()
        share = np.abs(layer_dot).sum(0) / np.abs(layer_dot).sum()
        rows = [{"layer": f"{part.label} ({plan.kinds[part.module]})", "share": float(share[k]),
                 "grad_J_norm": float(torch.sqrt(sum(grad_j[n].pow(2).sum() for n in part.params))),
                 "auroc": float(roc_auc_score(mask, -layer_dot[:, k]))} for k, part in enumerate(plan.parts)]
        cosine = dot / np.maximum(norm, 1e-30)
        report[describe(obj)] = {"mean_pull_norm": float(pull.norm()), "centred": centred, "layers": rows,
                                 "auroc": float(roc_auc_score(mask, -dot)),
                                 "cosine_ap": float(average_precision_score(mask, -cosine))}
    return report


def block_rows(stats: ReplayStats, truth: np.ndarray) -> list[dict]:
    """Per block: its share of Σ_t,n |block dot| and the AUROC of its cosine summed over the snapshots (low = suspect)."""
    share = np.abs(stats.block_dot).sum((0, 1))
    share = share / max(share.sum(), 1e-300)
    denominator = stats.block_direction_norm[:, None, :] * np.sqrt(stats.block_sq)
    cosine = np.divide(stats.block_dot, denominator, out=np.zeros_like(stats.block_dot), where=denominator > 0).sum(0)
    return [{"block": str(name), "share": float(share[b]), "auroc": float(roc_auc_score(truth, -cosine[:, b]))}
            for b, name in enumerate(stats.blocks)]


def block_picture(run_dir: Path) -> tuple[list[dict], Path]:
    """``diagnose.png``: per block, its share of |dot| and the AUROC of its cosine alone, from ``replay/stats.npz``."""
    truth = np.load(run_dir / "ground_truth.npz")["is_mislabeled"]
    rows = block_rows(ReplayStats.load(run_dir / "replay" / "stats.npz").first(len(truth)), truth)
    import matplotlib.pyplot as plt

    names = [r["block"] for r in rows][::-1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 0.35 * len(rows) + 1.6), sharey=True)
    left.barh(names, [r["share"] for r in rows][::-1], color="tab:blue")
    left.set_xlabel("share of Σ |⟨ψ, ∇l_n⟩| over the snapshots")
    right.barh(names, [r["auroc"] for r in rows][::-1], color="tab:orange")
    right.axvline(0.5, color="grey", linestyle=":")
    right.set_xlim(0, 1)
    right.set_xlabel("AUROC of the block's cosine alone")
    fig.suptitle(f"where the score lives: {run_dir.resolve().parent.name}/{run_dir.resolve().name}")
    path = run_dir / "diagnose.png"
    _save(fig, path)
    return rows, path


def format_report(report: dict) -> str:
    lines = []
    for name, r in report.items():
        if name == "snapshot":
            continue
        width = max([16, *(len(row["layer"]) for row in r["layers"])])  # a language model's layer names run long
        lines += ["", f"J = {name} at θ_{report['snapshot']}: mean logit pull ‖w̄‖ = {r['mean_pull_norm']:.3g}, "
                      + ("removed" if r["centred"] else "left in"),
                  f"  {'layer':<{width}} {'share of |dot|':>15} {'‖∇J‖ there':>11} {'AUROC alone':>12}"]
        lines += [f"  {row['layer']:<{width}} {row['share']:>15.2f} {row['grad_J_norm']:>11.3g} {row['auroc']:>12.3f}"
                  for row in r["layers"]]
        lines += [f"  whole vector: AUROC {r['auroc']:.3f}, cosine AP {r['cosine_ap']:.3f}"]
    return "\n".join(lines[1:])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pmp_lightning.report.diagnose", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (outputs/runs/<run>, or a sweep's job directory)")
    parser.add_argument("--snapshot", type=int, default=-1, help="snapshot index t (default: the last, θ_T)")
    args = parser.parse_args(argv)
    snapshots = args.run_dir / "snapshots"
    if snapshots.is_symlink() and not snapshots.exists():
        parser.exit(2, f"diagnose: {snapshots} points at the train cache entry {snapshots.readlink()}, which no longer "
                       f"exists (deleted?); run the run's command again (its config: {args.run_dir / '.hydra'}) to recompute it\n")
    if not (args.run_dir / ".hydra" / "config.yaml").is_file() or not snapshots.exists():
        parser.exit(2, f"diagnose: {args.run_dir} is not a finished run directory (it needs .hydra/config.yaml and snapshots/)\n")
    count = len(load_manifest(snapshots)["snapshots"])
    if not -count <= args.snapshot < count:
        parser.exit(2, f"diagnose: --snapshot {args.snapshot} is not a snapshot of this run, which has θ_0 … θ_{count - 1}; "
                       f"give 0 to {count - 1}, or -1 for the last\n")
    print(format_report(diagnose(args.run_dir, args.snapshot)))
    rows, path = block_picture(args.run_dir)
    print("\nper block, over every snapshot the replay kept:")
    width = max([16, *(len(r["block"]) for r in rows)])
    print("\n".join(f"  {r['block']:<{width}} share of |dot| {r['share']:5.2f}   AUROC alone {r['auroc']:.3f}" for r in rows))
    print(f"picture: {path}")


if __name__ == "__main__":
    main()
