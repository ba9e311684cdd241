"""The model checked against the data before any training: a model that cannot take the data's inputs or gives
outputs of the wrong shape is refused here, in a second or so, in one line naming the fix (``check_model``), never
inside torch halfway through training. The statistics pass's plan is proven here on a few pool examples
(``statistics/proof.py``) and logged; the replay's maths is tried on the same examples by ``replay/probe.py``."""
from __future__ import annotations

import logging
from typing import Callable, NamedTuple

import numpy as np
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from pmp_lightning.errors import DataConfigError
from pmp_lightning.statistics.plan import make_plan
from pmp_lightning.task import LANGUAGE_MODEL

log = logging.getLogger(__name__)

# layers whose training-mode forward differs from their eval-mode one
TRAIN_MODE_DIFFERS = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.dropout._DropoutNd,
                      torch.nn.modules.instancenorm._InstanceNorm)


class Probe(NamedTuple):
    """The checked model on a few pool examples: the network (for the cache's code key), the inputs in the precision
    training gives them, their labels, and the statistics pass's proven plan (for ``replay.probe``'s check)."""

    net: torch.nn.Module
    x: torch.Tensor
    y: torch.Tensor
    plan: object


def check_model(make_net: Callable[[], torch.nn.Module], datamodule, target: str, precision: str = "32-true") -> Probe:
    """A model that cannot take the data's inputs or has fewer outputs than the data has classes fails here, in a
    second or so, in one line naming the fix: not inside torch halfway through training, and never after it. The
    statistics pass's plan (which layers by rule, which by the fallback) is proven here on a few pool examples and
    logged; the replay's own maths on them (∇J, Hessian-vector products) is ``replay.probe.check_replay_maths``'s."""
    _check_same_inputs(datamodule)
    with torch.random.fork_rng(devices=[]):  # the trained model's initialisation must not depend on this probe
        net = make_net().eval()
    x, y = _probe_inputs(net, datamodule.pool.x[:8], target, precision), datamodule.pool.y[:8]
    _check_outputs(net, x, datamodule, target)
    with torch.random.fork_rng(devices=[]):
        plan = make_plan(net, x, y)
    if rank_zero_only.rank == 0:
        log.info(f"statistics pass for {type(net).__name__}: {plan.summary()}")
        _say_what_eval_mode_changes(net)
    return Probe(net, x, y, plan)


def _probe_inputs(net: torch.nn.Module, x: torch.Tensor, target: str, precision: str) -> torch.Tensor:
    """A few pool inputs in the precision training will give the model: a float64 model trains on float64 inputs
    under trainer.precision=64-true (Lightning converts both), and is refused, with that fix, otherwise."""
    dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), None)
    if not x.is_floating_point() or dtype is None or dtype == x.dtype:
        return x
    if dtype == torch.float64 and precision.startswith("64"):
        return x.double()
    raise DataConfigError(f"model ({target}) holds {str(dtype).replace('torch.', '')} parameters but the data is "
                          f"{str(x.dtype).replace('torch.', '')}: train in float64 with trainer.precision=64-true "
                          f"(Lightning then converts the data), or build the model in float32 (no .double())")


def _check_same_inputs(datamodule) -> None:
    """The downstream and test sets hold inputs like the pool's: a trusted set of another image size or channel count
    is named here, not in the replay after training."""
    pool = datamodule.pool.x
    for what, ds, setting in (("downstream set", datamodule.downstream, "data.downstream"),
                              ("test set", datamodule.test_set, "data.source")):
        if tuple(ds.x.shape[1:]) != tuple(pool.shape[1:]) or ds.x.is_floating_point() != pool.is_floating_point():
            raise DataConfigError(f"the {what} ({setting}) holds inputs of shape {tuple(ds.x.shape[1:])} ({ds.x.dtype}) but "
                                  f"the pool {tuple(pool.shape[1:])} ({pool.dtype}); give it inputs of the pool's size, "
                                  f"channels and kind (e.g. a transform that resizes or converts them)")


def _check_outputs(net: torch.nn.Module, x: torch.Tensor, datamodule, target: str) -> None:
    try:
        with torch.no_grad():
            logits = net(x)
    except Exception as err:  # shape errors come from deep inside torch, in many types
        raise DataConfigError(f"model ({target}) cannot take the data's inputs of shape {tuple(x.shape[1:])} ({x.dtype}): "
                              f"{str(err).splitlines()[0]}. {_input_advice(net, datamodule.pool.x)}") from err
    if not isinstance(logits, torch.Tensor):
        kind = type(logits).__name__
        raise DataConfigError(f"model ({target}) returns a {kind}, not a tensor of logits: its forward must return one "
                              f"tensor (batch × classes); return the logits alone (e.g. `return out[0]` or "
                              f"`return out['logits']`), or wrap the model in a module that does")
    if datamodule.kind is LANGUAGE_MODEL:
        if logits.shape[:2] != x.shape[:2] or logits.dim() != 3 or logits.shape[2] < datamodule.num_classes:
            raise DataConfigError(f"model ({target}) gives outputs of shape {tuple(logits.shape[1:])} per document of "
                                  f"{x.shape[1]} tokens; a language model gives next-token logits (tokens × vocabulary "
                                  f"of {datamodule.num_classes}): set model.vocab_size={datamodule.num_classes}")
        return
    if logits.dim() != 2 or logits.shape[1] < datamodule.num_classes:
        raise DataConfigError(f"model ({target}) gives outputs of shape {tuple(logits.shape[1:])} per example, but the labels "
                              f"have {datamodule.num_classes} classes; set model.num_classes={datamodule.num_classes}")
    if logits.shape[1] > datamodule.num_classes:
        log.warning(f"model ({target}) has {logits.shape[1]} outputs but the data {datamodule.num_classes} classes: the "
                    f"extra outputs are trained towards probability 0; set model.num_classes={datamodule.num_classes} "
                    f"unless the data lacks classes on purpose")


def _say_what_eval_mode_changes(net: torch.nn.Module) -> None:
    differs = [m for m in net.modules() if isinstance(m, TRAIN_MODE_DIFFERS)]
    if differs:
        how = [text for kind, text in ((torch.nn.modules.batchnorm._BatchNorm, "BatchNorm on its running statistics"),
                                       (torch.nn.modules.instancenorm._InstanceNorm,
                                        "InstanceNorm on its running statistics where it keeps them"),
                                       (torch.nn.modules.dropout._DropoutNd, "dropout off"))
               if any(isinstance(m, kind) for m in differs)]
        log.info(f"the replay differentiates the network in eval mode, where "
                 f"{', '.join(sorted({type(m).__name__ for m in differs}))} act otherwise than in training "
                 f"({', '.join(how)}): the exact identity of the scores holds for that eval-mode network")


def _input_advice(net: torch.nn.Module, x: torch.Tensor) -> str:
    """What to change when ``net`` cannot take inputs like ``x``, read from its first layer with parameters."""
    first = next(((name, m) for name, m in net.named_modules() if list(m.parameters(recurse=False))), (None, None))
    name, layer = first
    if not x.is_floating_point() and not isinstance(layer, torch.nn.Embedding):
        return (f"The inputs are integers (values {int(x.min())} to {int(x.max())}): if they are 8-bit images, set "
                f"data.source.scale=255 to make them floats in [0, 1]; integer inputs are token ids, for a model whose "
                f"first layer is an nn.Embedding")
    if isinstance(layer, torch.nn.modules.conv._ConvNd):
        spatial = len(layer.kernel_size)
        if x.dim() - 1 == spatial:
            return (f"Its first layer {name!r} is a {type(layer).__name__}, which takes (channels, {', '.join('HWD'[:spatial])}) "
                    f"per example, but each input is {tuple(x.shape[1:])}: add a channel axis (x[:, None] before saving, "
                    f"or x.unsqueeze(1))")
        return f"Its first layer {name!r} is a {type(layer).__name__} with in_channels={layer.in_channels}; build it for the data"
    return (f"Build the model for that input size (e.g. model.in_features={int(np.prod(x.shape[1:]))} for an MLP) "
            f"or pick another model=...")
