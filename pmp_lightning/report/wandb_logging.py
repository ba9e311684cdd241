"""What a run logs to Weights & Biases (``logger=wandb``; offline unless ``logger.mode=online``)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from sklearn.metrics import precision_recall_curve

from pmp_lightning.report.compare import N_SUSPECTS
from pmp_lightning.task import LANGUAGE_MODEL


PR_POINTS = 200  # points per precision-recall curve, enough to draw it


_USER_DATA_DIR = os.environ.get("WANDB_DATA_DIR")  # a data directory the user chose wins


def keep_staging_in(run_dir: Path) -> None:
    """Stage W&B artefacts (the tables with images) under the run directory instead of ~/.local/share/wandb,
    so a run directory copied to another machine syncs whole (``wandb sync``)."""
    os.environ["WANDB_DATA_DIR"] = _USER_DATA_DIR or str(Path(run_dir) / "wandb" / "data")


def run_identity() -> dict[str, str]:
    """W&B run name (the job's overrides) and group (the sweep), when Hydra is running the job."""
    if not HydraConfig.initialized():
        return {}
    hydra = HydraConfig.get()
    identity = {"name": hydra.job.override_dirname or hydra.job.name}
    if hydra.mode == RunMode.MULTIRUN:
        identity["group"] = Path(hydra.sweep.dir).name
    return identity


def log_results(experiment, metrics: dict, scores: dict[str, np.ndarray], datamodule) -> None:
    """Summary metrics, ‖λ_t‖, PR curves, score histograms and a table of the top suspects."""
    import wandb

    summary = {f"detection/{name}/{m}": v for name, row in metrics["detection"].items() for m, v in row.items()}
    summary["test_accuracy"] = metrics["test_accuracy"]
    summary.update({f"timings/{k}": v for k, v in metrics["timings"].items()})
    experiment.summary.update(summary)
    costate = metrics["costate"]
    for t, (norm, share) in enumerate(zip(costate["lambda_norms"], costate["participation"]), start=1):
        experiment.log({"costate/lambda_norm": norm, "costate/participation": share, "costate/lambda_t": t})
    for t, auroc in enumerate(costate["contribution_auroc"]):  # c_t uses θ_t and λ_{t+1}
        experiment.log({"costate/contribution_auroc": auroc, "costate/snapshot_t": t})

    mask = datamodule.is_mislabeled
    if not mask.any():
        return
    pr_rows, suspects, plots = [], [], {}
    x = datamodule.pool.x
    pictures = x.is_floating_point() and x.dim() == 4 and x.shape[1] in (1, 3)  # images; token ids are not drawn
    for name, s in scores.items():
        precision, recall, _ = precision_recall_curve(mask, -s)
        keep = np.unique(np.linspace(0, len(recall) - 1, PR_POINTS).astype(int))
        pr_rows += [[name, float(r), float(p)] for r, p in zip(recall[keep], precision[keep])]
        plots[f"histogram/{name}/clean"] = wandb.Histogram(s[~mask])
        plots[f"histogram/{name}/mislabeled"] = wandb.Histogram(s[mask])
        for rank, i in enumerate(np.argsort(s, kind="stable")[:N_SUSPECTS]):
            picture = wandb.Image(x[i].permute(1, 2, 0).squeeze(-1).clamp(0, 1).numpy()) if pictures else None
            said = ([datamodule.pool_documents[i].name, datamodule.corruption_kind[i]] if datamodule.kind is LANGUAGE_MODEL else
                    [int(datamodule.observed_labels[i]), int(datamodule.true_labels[i])])
            suspects.append([name, rank, picture, int(datamodule.pool_index[i]), *said, bool(mask[i])])
    pr_table = wandb.Table(columns=["score", "recall", "precision"], data=pr_rows)
    plots["pr_curves"] = wandb.plot.line(pr_table, "recall", "precision", stroke="score", title="Precision-recall (low score = suspect)")
    said = ["document", "corruption"] if datamodule.kind is LANGUAGE_MODEL else ["observed", "true"]
    plots["top_suspects"] = wandb.Table(columns=["score", "rank", "image", "index", *said, "mislabeled"], data=suspects)
    experiment.log(plots)
