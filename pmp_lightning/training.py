"""Training, in one place: the loss, the LightningModule that descends it, and ``Training.fit``, the one training
loop that the run's own trajectory, the selection retrains and cleanlab's cross-validation folds all use."""
from __future__ import annotations

import functools
import inspect
import logging
import math
import shutil
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from pmp_lightning.cache import COSMETIC_TRAINER_KEYS, StageCache, code_digest, content_digest
from pmp_lightning.data.base import IndexedDataset
from pmp_lightning.errors import DataConfigError
from pmp_lightning.io import save_npz
from pmp_lightning.resume import LastEpochCheckpoint, RandomState
from pmp_lightning.task import kind_of, training_loss

log = logging.getLogger(__name__)


def trainable(net: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters training moves (``requires_grad``), by name: what λ, ∇J and the statistics cover."""
    return {k: p for k, p in net.named_parameters() if p.requires_grad}


@torch.no_grad()
def predict_proba(net: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> np.ndarray:
    """Softmax probabilities of ``net`` (switched to eval mode) for the inputs ``x``, as float64 (N, K)."""
    net.eval()
    first = next(net.parameters())
    dtype = first.dtype if x.is_floating_point() and first.is_floating_point() else None  # a float64 model: float64 inputs
    return torch.cat([net(chunk.to(first.device, dtype)).double().softmax(1).cpu() for chunk in x.split(batch_size)]).numpy()


SHAPE_SETTINGS = ("num_classes", "in_channels", "in_features", "image_size", "vocab_size")  # what shaped() takes from the data


def shaped(make_net: Callable[[], nn.Module], x: torch.Tensor, num_classes: int,
           vocab_size: int | None = None) -> Callable[[], nn.Module]:
    """The model's builder with what the data knows filled in where the model's config leaves it null: ``num_classes``
    (the data's class count), ``in_channels`` and ``image_size`` (images (N, C, H, W)), ``in_features`` (the
    flattened input size), ``vocab_size`` (a corpus's tokenizer's vocabulary, when the data has one). A model config
    does not repeat the input shape, so one config serves MNIST and CIFAR-10;
    a value set in the config is kept (and a wrong one is named before training). A null setting that the model does
    not take at all (a model of your own behind ``model._target_``) is dropped, so it need not be deleted."""
    if not isinstance(make_net, functools.partial):
        return make_net
    known = {"num_classes": num_classes, "in_features": int(math.prod(x.shape[1:])), "vocab_size": vocab_size}
    if x.is_floating_point() and x.dim() == 4:
        known.update(in_channels=int(x.shape[1]), image_size=int(x.shape[-1]))
    try:
        accepted = inspect.signature(make_net.func).parameters
        takes_any = any(p.kind == p.VAR_KEYWORD for p in accepted.values())
    except (TypeError, ValueError):  # no signature to read: pass everything on
        accepted, takes_any = {}, True
    keywords = {}
    for key, value in make_net.keywords.items():
        if value is None and key in SHAPE_SETTINGS and not (takes_any or key in accepted):
            continue
        keywords[key] = known.get(key, value) if value is None and key in SHAPE_SETTINGS else value
    return functools.partial(make_net.func, *make_net.args, **keywords)


class Classifier(pl.LightningModule):
    """Trains ``net`` with ``training_loss``; the optimizer and learning-rate schedule are Hydra partials."""

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_schedule: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
    ):
        super().__init__()
        self.net, self.optimizer_factory, self.lr_schedule = net, optimizer, lr_schedule
        self.batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
        self.said_lone_batch = False  # the skipped batch of one is said once per fit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        if len(y) == 1 and self.batch_norm:  # BatchNorm cannot normalise a batch of one in training mode
            if not self.said_lone_batch:
                log.info("the last batch of each epoch holds one example, which BatchNorm cannot train on: it is skipped "
                         "(a different example each epoch, as the batches are shuffled)")
                self.said_lone_batch = True
            return None
        loss = training_loss(self.net(x), y)
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def test_step(self, batch, batch_idx):
        x, y, _ = batch
        logits = self.net(x)
        acc, count = kind_of(logits, y).accuracy(logits, y)  # a language model's: next-token accuracy over its targets
        self.log("test/accuracy", acc, on_step=False, on_epoch=True, batch_size=count, sync_dist=True)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.lr_schedule is None:
            return optimizer
        if getattr(getattr(self.lr_schedule, "func", self.lr_schedule), "interval", "epoch") == "step":
            steps = int(self.trainer.estimated_stepping_batches)
            scheduler = self.lr_schedule(optimizer, total_steps=steps, steps_per_epoch=steps / max(1, self.trainer.max_epochs))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_schedule(optimizer), "interval": "epoch"}}


class WarmupCosine(torch.optim.lr_scheduler.LambdaLR):
    """The learning rate of the recipes people train ResNets and ViTs with, set every optimizer step: a linear warm-up
    from ``lr / (warm-up steps)`` to ``lr`` over ``warmup_epochs``, then a cosine decay to ``final_ratio × lr`` at the
    last step. The snapshots record each step's rate, so the replay reads the schedule that ran."""

    interval = "step"

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: float,
                 warmup_epochs: float = 1.0, final_ratio: float = 0.0):
        warmup = min(int(round(warmup_epochs * steps_per_epoch)), max(0, total_steps - 1))
        decay = max(1, total_steps - warmup)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / decay)
            return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        super().__init__(optimizer, factor)


@dataclass
class Training:
    """How a run trains a classifier, built once from its config: the network and the optimizer and learning-rate
    schedule (factories), the Trainer's settings, the seed and the callbacks every fit gets (``conf/callbacks``:
    factories, each called afresh for each fit, that may give None)."""

    net: Callable[[], nn.Module]
    optimizer: Callable[..., torch.optim.Optimizer]
    lr_schedule: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None
    trainer: Callable[..., pl.Trainer]
    seed: int
    callbacks: tuple[Callable[[], pl.Callback | None], ...] = ()

    @property
    def epochs(self) -> int:
        """The Trainer's ``max_epochs``."""
        return self.trainer.keywords["max_epochs"]

    def for_data(self, x: torch.Tensor, num_classes: int, vocab_size: int | None = None) -> "Training":
        """This training with the model's null shape settings taken from inputs like ``x`` (``shaped``)."""
        return dataclasses.replace(self, net=shaped(self.net, x, num_classes, vocab_size))

    @classmethod
    def from_config(cls, cfg) -> "Training":
        """The training a run's config describes: ``model``, ``optimizer``, ``lr_schedule``, ``trainer``, ``seed``."""
        return cls(net=instantiate(cfg.model, _partial_=True), optimizer=instantiate(cfg.optimizer),
                   lr_schedule=instantiate(cfg.lr_schedule) if cfg.get("lr_schedule") else None,
                   trainer=instantiate(cfg.trainer, _partial_=True), seed=cfg.seed,
                   callbacks=tuple(instantiate(c) for c in cfg.get("callbacks", {}).values()))

    def fit_callbacks(self) -> list[pl.Callback]:
        """Fresh instances of the callbacks every fit gets."""
        return [c for c in (make() for make in self.callbacks) if c is not None]

    def fit(self, train, test=None, callbacks=(), logger=False, root_dir=None, one_process: bool = False,
            checkpoints: Path | None = None, max_steps: int | None = None) -> tuple[Classifier, float | None]:
        """A classifier trained from scratch (seeded with the run's seed) on ``train`` (a datamodule or a loader), and
        its accuracy on ``test`` (a datamodule or a loader; None: not measured). ``one_process``: a single-process
        fit even when the run's Trainer uses several (the small retrains, on global rank zero only).

        ``checkpoints``: a directory where every finished epoch leaves ``last.ckpt`` (the weights, the optimizer, the
        schedule, the callbacks' state and the random generators'); a fit that finds one there resumes from it, so a
        killed training continues from its last finished epoch and ends as the uninterrupted one would have. A fit
        that finishes removes the directory: a finished training needs no checkpoint, and a later fit into the same
        place (an entry recomputed because a file went missing) must train, not resume at its end.

        ``max_steps``: train for that many optimizer steps instead of the configured epochs (a budget of tokens)."""
        pl.seed_everything(self.seed, workers=True)
        classifier = Classifier(self.net(), self.optimizer, self.lr_schedule)
        single = {"strategy": "auto", "devices": 1, "enable_checkpointing": False} if one_process else {}
        if max_steps is not None:
            single.update(max_steps=max_steps, max_epochs=-1)
        resume = {}
        if checkpoints is not None:
            callbacks = [*callbacks, RandomState(), LastEpochCheckpoint(checkpoints)]
            last = Path(checkpoints) / "last.ckpt"
            if last.is_file():
                log.info(f"training: resuming from its last finished epoch ({last})")
                resume = {"ckpt_path": str(last)}
        trainer = self.trainer(callbacks=[*callbacks, *self.fit_callbacks()], logger=logger, default_root_dir=root_dir,
                               **single)
        trainer.fit(classifier, **_data("train_dataloaders", train), **resume)
        if checkpoints is not None and trainer.is_global_zero:
            shutil.rmtree(checkpoints, ignore_errors=True)
        if test is None:
            return classifier, None
        return classifier, float(trainer.test(classifier, verbose=False, **_data("dataloaders", test))[0]["test/accuracy"])


def _data(loader_key: str, data) -> dict:
    return {"datamodule": data} if isinstance(data, pl.LightningDataModule) else {loader_key: data}


class ReferenceClassifier:
    """``noise=confusion``'s reference (``data.noise.ConfusionNoise``): a classifier of the run's model, optimizer and
    trainer settings, trained from scratch with clean labels on a set disjoint from the pool (the run's test set)
    through ``Training.fit``, then read on the pool's images. Its probabilities are cached (``cache_dir``) by the
    settings, the seed, and the content of its training data, of the pool and of the model's code."""

    def __init__(self, model, optimizer, trainer, batch_size: int = 32, seed: int = 0, cache_dir: str | None = None):
        if cache_dir is None:
            raise DataConfigError("noise.reference.cache_dir is not set; start from conf/noise/confusion.yaml")
        self.settings = OmegaConf.create({"model": model, "optimizer": optimizer, "trainer": trainer,
                                          "batch_size": batch_size})
        self.seed, self.cache_dir = int(seed), Path(cache_dir)

    def __call__(self, images: torch.Tensor, reference, num_classes: int) -> np.ndarray:
        """The class probabilities for ``images`` (N, K) of the classifier trained on ``reference`` (x, y: clean,
        disjoint from the pool), or read from the cache."""
        config = OmegaConf.to_container(self.settings, resolve=True)
        keyed = {**config, "trainer": {k: v for k, v in config["trainer"].items() if k not in COSMETIC_TRAINER_KEYS}}
        training = Training.from_config(OmegaConf.create({**config, "seed": self.seed})).for_data(images, num_classes)
        cache = StageCache(self.cache_dir, "noise", {"reference": keyed, "seed": self.seed,
                                                      "trained_on": content_digest(reference.x, reference.y),
                                                      "pool": content_digest(images),
                                                      "model_code": code_digest(training.net(), config["model"].get("_target_"))})

        def train_reference(directory: Path) -> dict:
            log.info(f"noise=confusion: training the reference classifier on {len(reference.y)} clean examples")
            data = IndexedDataset(reference.x, reference.y)
            classifier, _ = training.fit(DataLoader(data, batch_size=int(config.get("batch_size", 32)), shuffle=True),
                                         one_process=True)
            save_npz(directory / "probs.npz", probs=predict_proba(classifier.net, images))
            return {}

        cache.load_or_compute(train_reference, lambda d: [] if (d / "probs.npz").is_file() else ["probs.npz"])
        with np.load(cache.dir / "probs.npz") as z:
            probs = z["probs"]
        if probs.shape[1] < num_classes:
            raise DataConfigError(f"noise=confusion: the reference model gives {probs.shape[1]} classes, the data has "
                                  f"{num_classes}; set model.num_classes={num_classes}")
        return probs[:, :num_classes]
