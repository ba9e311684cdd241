"""The model checked against the data before any training: a model that cannot take the data's inputs, gives
outputs of the wrong shape, or whose ∇J, per-example statistics or Hessian-vector products cannot be computed is refused
here, in a second or so, in one line naming the fix (``check_model``), never inside torch halfway through training.
The statistics pass's plan is proven here on a few pool examples (``statistics/proof.py``) and logged."""
from __future__ import annotations

import logging
import warnings
from typing import Callable

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from pmp_lightning.config import CORPUS_DATAMODULE, score_names
from pmp_lightning.data.images import language_model
from pmp_lightning.errors import DataConfigError, ReplayConfigError, UnsupportedModelError
from pmp_lightning.replay.costate import downstream_gradient, hessian_vector_product, objective
from pmp_lightning.scores.registry import AUTO_FAMILY
from pmp_lightning.statistics.per_example import per_example_stats
from pmp_lightning.statistics.plan import make_plan, stacked_blocks
from pmp_lightning.training import shaped, trainable

log = logging.getLogger(__name__)

# scoring.canaries=auto on a stacked network (two or more blocks of several layers): this many canaries and controls
AUTO_CANARIES = 40

# layers whose training-mode forward differs from their eval-mode one
TRAIN_MODE_DIFFERS = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.dropout._DropoutNd,
                      torch.nn.modules.instancenorm._InstanceNorm)


def scoring_defaults(cfg: DictConfig) -> DictConfig:
    """The config with ``scoring.canaries=auto`` and ``scoring.by_class=auto`` (the defaults) made concrete by a rule
    that sees the network, the data's sizes and where J comes from, never the pool's labels: a *stacked* network (two
    or more blocks of several layers, ``statistics.plan.stacked_blocks``: a ResNet's residual blocks, a ViT's encoder
    blocks) gets ``AUTO_CANARIES`` canaries, drawn beside J from the data, and the class replays, so the canaries choose
    among the block family and the class variants (the score ``auto``); a network of single layers (the reported CNN,
    an MLP) keeps the whole-gradient cosine, with neither. Data that cannot spare the canaries' examples, a J that
    canaries would cut into (a trusted set of your own, a J holding the pool), a corpus (no labels) and scores that
    hold none of the variants the canaries choose among get neither. The one place that resolves them: the run calls
    it after checking every setting and before any training, and records what it resolved in metrics.json, which
    the reports that rebuild its data read (``report.compare.run_config``)."""
    canaries, by_class = cfg.scoring.get("canaries", 0), cfg.scoring.get("by_class", False)
    if "auto" not in (canaries, by_class):
        return cfg
    if canaries == 0:  # nothing would choose a class variant: no need to look at the network
        stacked, why = [], "scoring.canaries=0"
    else:
        stacked, why = _stacked(cfg, AUTO_CANARIES if canaries == "auto" else canaries)
    if canaries == "auto":
        canaries = AUTO_CANARIES if stacked else 0
    if by_class == "auto":
        by_class = bool(stacked and canaries)
    if rank_zero_only.rank == 0:
        log.info(f"scoring.canaries={canaries}, scoring.by_class={str(by_class).lower()} (auto: {why})")
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.scoring.canaries, cfg.scoring.by_class = canaries, by_class
    return cfg


def _stacked(cfg: DictConfig, canaries: int) -> tuple[list[str], str]:
    """The network's stacked blocks, none where canaries cannot be had, and why, in words. The data is set up once
    with ``canaries`` to see that it can spare them (the run sets it up again: MNIST in well under a second) and the
    network built on it as the run builds it; a model that cannot be built, or data that cannot be set up at all,
    count as unstacked, and the run names their problem before any training (``check_model``, the data stage). The
    data's warnings are held back here: the data stage's setup gives the same ones, so a run says each once."""
    if cfg.data.get("_target_") == CORPUS_DATAMODULE:
        return [], "a corpus has no labels"
    if not any(n in AUTO_FAMILY for n in score_names(cfg.scoring)):
        return [], (f"scoring.scores holds none of the variants the canaries choose among "
                    f"({', '.join(AUTO_FAMILY)})")
    if cfg.data.get("downstream") is not None:
        return [], ("J is a trusted set of your own, which canaries would cut into; set scoring.canaries=40 and "
                    "scoring.by_class=true to take 80 of its examples for them")
    if cfg.data.get("downstream_includes_pool"):
        return [], "J holds the pool itself (data.downstream_includes_pool), and canaries would be cut from it"
    spare = ""
    for k in dict.fromkeys((canaries, 0)):
        try:
            with warnings.catch_warnings():  # the data stage sets the data up again and says them: once a run
                warnings.simplefilter("ignore")
                datamodule = instantiate(cfg.data, noise=instantiate(cfg.noise), canaries=k)
                datamodule.setup()
            break
        except DataConfigError:
            spare = f"; the data cannot spare the {2 * canaries} examples of scoring.canaries={canaries} beside J"
        except Exception:  # noqa: BLE001 — the settings check and the data stage name what is wrong, before training
            return [], "the data cannot be set up"
    else:
        return [], "the data cannot be set up"
    try:
        with torch.random.fork_rng(devices=[]):
            net = shaped(instantiate(cfg.model, _partial_=True), datamodule.pool.x, datamodule.num_classes)()
    except Exception:  # noqa: BLE001 — check_model names what is wrong with it, before any training
        return [], "the model could not be built"
    blocks, kind = stacked_blocks(net), type(net).__name__
    if len(blocks) < 2:
        return [], f"{kind} is not stacked: {len(blocks)} block(s) of several layers"
    return ([] if spare else blocks), f"{kind} is stacked: {len(blocks)} blocks of several layers ({', '.join(blocks)}){spare}"


def check_model(make_net: Callable[[], torch.nn.Module], datamodule, target: str, curvature: str,
                precision: str = "32-true") -> torch.nn.Module:
    """A model that cannot take the data's inputs, has fewer outputs than the data has classes, or whose ∇J (through
    torch.func), per-example statistics or Hessian-vector products cannot be computed fails here, in a second or so,
    in one line naming the fix: not inside torch halfway through training, and never after it. The statistics pass's plan (which layers by
    rule, which by the fallback) is proven here on a few pool examples and logged. Returns the probe network (for the
    cache's code key)."""
    _check_same_inputs(datamodule)
    with torch.random.fork_rng(devices=[]):  # the trained model's initialisation must not depend on this probe
        net = make_net().eval()
    x, y = _probe_inputs(net, datamodule.pool.x[:8], target, precision), datamodule.pool.y[:8]
    _check_outputs(net, x, datamodule, target)
    with torch.random.fork_rng(devices=[]):
        plan = make_plan(net, x, y)
        _check_replay_maths(net, plan, x, y, curvature, target)
    if rank_zero_only.rank == 0:
        log.info(f"statistics pass for {type(net).__name__}: {plan.summary()}")
        _say_what_eval_mode_changes(net)
    return net


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
    if language_model(datamodule):
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


def _check_replay_maths(net: torch.nn.Module, plan, x: torch.Tensor, y: torch.Tensor, curvature: str, target: str) -> None:
    """What the plan's float64 proof does not try, on the probe examples, with the replay's own functions: ∇J through
    ``torch.func.grad`` (``downstream_gradient``, which every ``replay.curvature`` uses, and which a custom
    ``torch.autograd.Function`` without ``setup_context`` fails), Hessian-vector products for the curvature modes
    (forward-mode derivatives, which some layers, e.g. torch's fused LSTM on the CPU, do not have), and the statistics
    pass in the network's own precision, which must give finite values."""
    params = {k: p.detach() for k, p in trainable(net).items()}
    direction = {k: torch.ones_like(p) for k, p in params.items()}
    try:
        downstream_gradient(net, params, objective("ce"), lambda: [(x[:2], y[:2])], 2)
    except Exception as err:  # functorch's refusals surface as several types deep inside torch
        raise UnsupportedModelError(f"model ({target}): the replay takes ∇J through torch.func.grad (under every "
                                    f"replay.curvature), which fails for it: {_first_line(err)}. "
                                    f"{_func_advice(err)}") from err
    if curvature != "none":
        try:
            hessian_vector_product(net, params, direction, lambda: [(x[:2], y[:2])])
        except Exception as err:  # a missing forward-mode derivative surfaces as one of several types deep inside torch
            raise ReplayConfigError(f"model ({target}): replay.curvature={curvature} needs Hessian-vector products "
                                    f"(forward-mode derivatives), which fail for it: {str(err).splitlines()[0]}. Use "
                                    f"replay.curvature=none (the Hessian term left out), or a layer with forward-mode "
                                    f"derivatives") from err
    stats = per_example_stats(net, x, y, direction, plan=plan, by_layer=True)
    bad = [part.label for k, part in enumerate(plan.parts)
           if not (torch.isfinite(stats["layer_dot"][:, k]).all() and torch.isfinite(stats["layer_sq"][:, k]).all())]
    if bad:
        dtype = str(next(iter(params.values())).dtype).replace("torch.", "")
        raise UnsupportedModelError(f"model ({target}): the per-example statistics of {', '.join(bad)} are not finite in "
                                    f"{dtype} for some examples (they are in float64, where the plan was proven); train "
                                    f"in float64 (trainer.precision=64-true) or replace that layer")


def _first_line(err: Exception, limit: int = 240) -> str:
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _func_advice(err: Exception) -> str:
    """The fix for a network that torch.func cannot differentiate: a custom autograd.Function's, or any other's."""
    if "autograd.Function" in str(err) or "setup_context" in str(err):
        return ("Give each custom torch.autograd.Function a setup_context staticmethod (forward without ctx) and "
                "generate_vmap_rule = True (or a vmap staticmethod; see torch's 'Extending torch.func with "
                "autograd.Function'), or replace it with standard layers")
    return ("Make its forward work under torch.func (no .item(), .numpy() or in-place changes of tensors it was given), "
            "or replace that part with standard layers")


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
