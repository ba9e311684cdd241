"""cleanlab in the same harness (``baselines.cleanlab=true``): the label-issue finder people already use.

cleanlab ranks label issues from *out-of-sample* predicted probabilities:

- ``pool=train``: K-fold cross-validation on the pool (``baselines.folds``, default 5), stratified by
  the observed labels. Each fold's model is trained through the same Lightning code, config and seed
  as the run's own training, on the other K-1 folds, and predicts its held-out fold. The folds are a
  cache stage like training (``<cache_dir>/crossval/<key>/``, one file per finished fold), so sweeping
  scores or replay settings never retrains them, and a killed run resumes at the next fold.
- ``pool=holdout`` / ``pool=test``: the run's own model never saw the pool, so its final probabilities
  already are out of sample; no extra training.

From them: ``cleanlab.rank.get_label_quality_scores`` (self-confidence, high = the label looks right)
becomes the ``cleanlab`` score column, and ``cleanlab.filter.find_label_issues``' set is compared with
the ground truth (precision, recall) when the pool has one.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pmp_lightning.cache import Stages, StageCache
from pmp_lightning.io import save_npz
from pmp_lightning.scores.select import train_without
from pmp_lightning.training import Training, predict_proba

log = logging.getLogger(__name__)


def cross_validated_probs(training: Training, datamodule, folds: int, directory: Path) -> np.ndarray:
    """Out-of-sample probabilities (N, K) of the pool the run trains on, from K-fold cross-validation.

    Each finished fold is kept as ``directory/fold_<k>.npz``; folds already there are not retrained.
    """
    from sklearn.model_selection import KFold, StratifiedKFold

    labels = datamodule.observed_labels.numpy()
    counts = np.bincount(labels)
    stratify = counts[counts > 0].min() >= folds  # a class with fewer examples than folds cannot be stratified
    splitter = (StratifiedKFold if stratify else KFold)(n_splits=folds, shuffle=True, random_state=training.seed)
    probs = np.full((len(labels), datamodule.num_classes), np.nan)
    for k, (train_idx, held_idx) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        path = directory / f"fold_{k}.npz"
        if path.is_file():
            with np.load(path) as done:
                probs[done["held"]] = done["probs"]
            continue
        log.info(f"cleanlab: fold {k + 1}/{folds}, training on {len(train_idx)} pool examples, predicting {len(held_idx)}")
        keep = np.zeros(len(labels), dtype=bool)
        keep[train_idx] = True
        classifier, _ = train_without(training, datamodule, keep, test=False)
        fold_probs = predict_proba(classifier.net, datamodule.pool.x[held_idx])
        save_npz(path, held=held_idx, probs=fold_probs)
        probs[held_idx] = fold_probs
    return probs


def cleanlab_baseline(labels: np.ndarray, pred_probs: np.ndarray, is_mislabeled: np.ndarray) -> tuple[np.ndarray, dict]:
    """cleanlab's label quality per example (high = keep) and a summary of its ``find_label_issues`` set."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    quality = get_label_quality_scores(labels, pred_probs)
    issues = find_label_issues(labels, pred_probs, n_jobs=1)
    summary: dict = {"issues_found": int(issues.sum())}
    if is_mislabeled.any():
        hits = int((issues & is_mislabeled).sum())
        summary["precision"] = hits / max(int(issues.sum()), 1)
        summary["recall"] = hits / int(is_mislabeled.sum())
    return np.asarray(quality, dtype=np.float64), summary


def cleanlab_stage(stages: Stages, cache: StageCache, training: Training, datamodule, folds: int,
                   final_probs: np.ndarray) -> tuple[np.ndarray, dict]:
    """cleanlab's score from out-of-sample probabilities: K-fold cross-validation (cached) for pool=train,
    the final model's for a held-out pool. Returns the score and what goes under ``cleanlab`` in metrics.json."""
    if datamodule.pool_mode == "train":
        def cross_validate(directory: Path) -> dict:
            with stages.stage("cleanlab"):
                probs = cross_validated_probs(training, datamodule, folds, directory)
                save_npz(directory / "pred_probs.npz", probs=probs)
            return {"seconds": stages.timings["cleanlab"]}

        done = cache.load_or_compute(cross_validate, _missing_probs, resume=True)
        with np.load(cache.dir / "pred_probs.npz") as z:
            probs = z["probs"]
        source, seconds = f"{folds}-fold cross-validation", done["seconds"]
    else:
        probs, source, seconds = final_probs, "the trained model (the pool is held out)", 0.0
    score, summary = cleanlab_baseline(datamodule.observed_labels.numpy(), probs, datamodule.is_mislabeled)
    return score, {"probabilities": source, "seconds": seconds, **summary}


def _missing_probs(entry: Path) -> list[str]:
    return [] if (entry / "pred_probs.npz").is_file() else ["pred_probs.npz"]
