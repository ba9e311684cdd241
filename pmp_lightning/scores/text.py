"""The language-model baselines a corpus run scores its documents with beside the replay's scores, each as its paper
defines it (high = keep, low = suspect, as every score here):

- ``dsir``: DSIR's importance weight (Xie et al. 2023, as its code computes it): the lowercased text split into words
  and punctuation runs, their unigrams and bigrams hashed into 10,000 buckets, a bag-of-n-grams model of the target set
  and one of the pool (add-one smoothed), a document's weight the log-ratio of its likelihood under the two. It reads
  the text only, no model.
- ``rho_loss``: RHO-LOSS's reducible loss (Mindermann et al. 2022): the document's loss under the trained model θ_T
  minus its loss under a model of the same recipe trained on the target set alone (the irreducible loss). Noise is
  hard for both models, so its reducible loss is small.
- ``influence``: the IF-Score baseline of PDS (Gu et al. 2025): a document's influence on J at the converged model,
  ⟨∇J(θ_T), ∇l_n(θ_T)⟩, with the Hessian taken as the identity (the gradient-similarity form of influence at θ_T).
"""
from __future__ import annotations

import re
import zlib

import numpy as np
import torch
from torch.utils.data import DataLoader

from pmp_lightning.cache import Stages
from pmp_lightning.data.corpus import Document
from pmp_lightning.replay.costate import downstream_gradient
from pmp_lightning.statistics.per_example import output_stats, per_example_stats
from pmp_lightning.task import IGNORE
from pmp_lightning.training import Training, trainable

DSIR_BUCKETS = 10_000  # DSIR's hashed feature space


def _ngram_counts(doc: Document, buckets: int) -> np.ndarray:
    words = re.findall(rb"\w+|[^\w\s]+", doc.text.lower())  # DSIR's tokenizer: NLTK's WordPunct, on lowercased text
    grams = words + [a + b" " + b for a, b in zip(words, words[1:])]
    return np.bincount([zlib.crc32(g) % buckets for g in grams], minlength=buckets).astype(np.float64)


def dsir(pool: list[Document], target: list[Document], buckets: int = DSIR_BUCKETS) -> np.ndarray:
    """log p_target(doc) − log p_pool(doc) under the two hashed bag-of-n-grams models (crc32: the same in every process)."""
    counts = np.stack([_ngram_counts(d, buckets) for d in pool])
    target_counts = sum(_ngram_counts(d, buckets) for d in target)
    log_target = np.log((target_counts + 1) / (target_counts.sum() + buckets))
    pool_total = counts.sum(0)
    log_pool = np.log((pool_total + 1) / (pool_total.sum() + buckets))
    return counts @ (log_target - log_pool)


@torch.no_grad()
def document_losses(net: torch.nn.Module, dataset, batch_size: int = 64) -> np.ndarray:
    """Each document's loss (mean next-token cross-entropy) under ``net`` in eval mode."""
    net.eval()
    return torch.cat([output_stats(net, x, y)["loss"] for x, y in zip(dataset.x.split(batch_size), dataset.y.split(batch_size))]
                     ).double().numpy()


def token_loss(net: torch.nn.Module, dataset, batch_size: int = 64) -> float:
    """The language model's loss on ``dataset``: mean next-token cross-entropy over all its targets (padding left out)."""
    counts = (dataset.y != IGNORE).sum(1).double().numpy()
    return float((document_losses(net, dataset, batch_size) * counts).sum() / counts.sum())


def reference_model(training, datamodule) -> torch.nn.Module:
    """RHO-LOSS's irreducible-loss model: one trained by ``training`` (the run's recipe and seed) on the target set."""
    loader = DataLoader(datamodule.downstream, batch_size=datamodule.batch_size, shuffle=True)
    return training.fit(loader, None, one_process=True)[0].net


def rho_loss(final_net: torch.nn.Module, reference: torch.nn.Module, dataset,
             final_losses: np.ndarray | None = None) -> np.ndarray:
    """The reducible loss of each document of ``dataset``: under θ_T minus under the ``reference`` model
    (``final_losses``: the documents' losses under θ_T, where the caller has them)."""
    if final_losses is None:
        final_losses = document_losses(final_net, dataset)
    return final_losses - document_losses(reference, dataset)


def influence(final_net: torch.nn.Module, objective, datamodule, batch_size: int = 64) -> np.ndarray:
    """⟨∇J(θ_T), ∇l_n(θ_T)⟩ for every pool document: J's gradient once, then one statistics pass."""
    final_net.eval()
    params = {k: p.detach() for k, p in trainable(final_net).items()}
    ds = datamodule.downstream
    batches = lambda: zip(ds.x.split(batch_size), ds.y.split(batch_size))  # noqa: E731
    grad_j, _, _ = downstream_gradient(final_net, params, objective, batches, len(ds))
    pool = datamodule.pool
    return torch.cat([per_example_stats(final_net, x, y, grad_j)["dot"]
                      for x, y in zip(pool.x.split(batch_size), pool.y.split(batch_size))]).double().numpy() / len(ds)


def corpus_baselines_stage(stages: Stages, net: torch.nn.Module, training: Training, objective,
                           datamodule) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A corpus's language-model baselines (``text_scores``): DSIR, RHO-LOSS (one small training more, on the target
    set) and the IF-score at θ_T (``net``); and with a wide slice (``data.wide_size``), the slice's loss filter and
    its RHO-LOSS from the same reference model and one pass of θ_T over it, for the data scorer's comparison
    (``scores/scorer.py``)."""
    with stages.stage("corpus_baselines"):
        reference = reference_model(training, datamodule)
        pool = {"dsir": dsir(datamodule.pool_documents, datamodule.target_documents),
                "rho_loss": rho_loss(net, reference, datamodule.pool), "influence": influence(net, objective, datamodule)}
        if datamodule.wide is None:
            return pool, {}
        final = document_losses(net, datamodule.wide)
        return pool, {"loss": -final, "rho_loss": rho_loss(net, reference, datamodule.wide, final)}
