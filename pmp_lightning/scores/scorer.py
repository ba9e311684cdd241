"""The data scorer, the step that lets PMP scale (PDS, Gu et al. 2025): the exact scores γ are computed on a small
proxy pool only; a small model learns γ from the documents and scores a larger corpus the proxy never saw.

Here the scorer is the proxy language model itself, frozen at θ_T, with a linear head: a document's features are the
mean over its positions of the model's last hidden states (after the final norm), as the paper's scorer mean-pools
its LM's; the head is a ridge regression on the standardised features, its penalty chosen by cross-validation on the
proxy pool (``RidgeCV``). Out-of-fold predictions on the pool say how well γ is learned (Spearman ρ, and the
detection AP of the predictions beside the exact γ's); the fit on the whole pool then scores the wide slice
(``data.wide_size``), where its detection and its selection are compared with the baselines computed there.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import KFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pmp_lightning.errors import SettingError
from pmp_lightning.scores.registry import SCORER_TARGET
from pmp_lightning.scores.text import dsir
from pmp_lightning.task import IGNORE

FOLDS = 5
ALPHAS = np.logspace(-3, 4, 15)


@torch.no_grad()
def document_features(net: torch.nn.Module, dataset, batch_size: int = 64) -> np.ndarray:
    """Each document's mean last hidden state under ``net`` (``net.hidden``: (N, T, D)), padding left out."""
    if not callable(getattr(net, "hidden", None)):
        raise SettingError(f"data.wide_size needs the proxy's hidden states for the data scorer, and "
                           f"{type(net).__name__} has no hidden(ids) method; use model=gpt")
    net.eval()
    out = []
    for x, y in zip(dataset.x.split(batch_size), dataset.y.split(batch_size)):
        mask = (y != IGNORE).unsqueeze(-1).to(torch.float32)
        out.append((net.hidden(x) * mask).sum(1) / mask.sum(1).clamp(min=1))
    return torch.cat(out).double().numpy()


def fit_scorer(features: np.ndarray, gamma: np.ndarray, seed: int):
    """The ridge head fitted on the whole pool, and its out-of-fold predictions there (``FOLDS`` folds)."""
    head = make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHAS))
    oof = cross_val_predict(head, features, gamma, cv=KFold(FOLDS, shuffle=True, random_state=seed))
    return head.fit(features, gamma), oof


def data_scorer(net: torch.nn.Module, datamodule, gamma: np.ndarray, seed: int, baselines: dict[str, np.ndarray]):
    """What metrics.json says of the scorer, the out-of-fold predictions on the pool, and the wide slice's scores: the
    scorer's, the proxy's loss (perplexity filtering), DSIR toward the target set, the other ``baselines`` computed
    on the slice where the pool's are (the loss and RHO-LOSS, from one pass of θ_T: ``scores/text.py``), and random."""
    head, oof = fit_scorer(document_features(net, datamodule.pool), gamma, seed)
    wide = {"scorer": head.predict(document_features(net, datamodule.wide)), "loss": baselines["loss"],
            "dsir": dsir(datamodule.wide_documents, datamodule.target_documents), **baselines,
            "random": np.random.default_rng(0).random(len(datamodule.wide))}
    report = {"target": SCORER_TARGET, "features": "proxy θ_T, mean last hidden state", "alpha": float(head[-1].alpha_),
              "pool": {"spearman_out_of_fold": float(spearmanr(gamma, oof)[0])}, "wide": {"size": len(datamodule.wide)}}
    return report, oof, wide
