"""The scoring policy, in one place: what turns the settings left to the run into concrete ones before any training,
and what chooses the score ``auto`` at the end, with the record of both.

Before training (``resolve``): ``scoring.canaries=auto`` and ``scoring.by_class=auto`` become numbers and flags by a
rule that sees the network, the data's sizes and where J comes from, never the pool's labels (``AUTO_CANARIES``
canaries wherever the data can spare them, and the class replays on a stacked network). After the replays (``choose``): the PMP
variant that ranks the canaries lowest becomes the score ``auto``, by a bootstrap test against the recommended
cosine (``canary_choice``); a class variant is hedged with the whole-J variant the canaries choose among those alone
(``auto_choice``, ``hedge``). Both are logged in one line and recorded in metrics.json (``scoring``, ``canaries``).

The other settings named ``auto`` resolve where their names are read: ``objective=auto`` by the pool's mode when the
config is composed (``config.recommended_objective``), ``scoring.rank_by`` (suspects.csv's order) from the resolved
canaries (``config.run_scores``).
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from sklearn.metrics import average_precision_score

from pmp_lightning.config import data_kind, score_names
from pmp_lightning.errors import DataConfigError
from pmp_lightning.scores.registry import AUTO_FAMILY, CLASS_VARIANTS, PMP_VARIANTS
from pmp_lightning.statistics.plan import stacked_blocks
from pmp_lightning.training import shaped

log = logging.getLogger(__name__)

# scoring.canaries=auto on a stacked network (two or more blocks of several layers): this many canaries and controls
AUTO_CANARIES = 40
# a trusted J of your own (data.downstream) gives its first 2k examples for k canaries and controls when it holds at
# least this many times 2k, so that J keeps 90% of it or more
TRUSTED_SHARE = 10


def resolve(cfg: DictConfig) -> DictConfig:
    """The config with ``scoring.canaries=auto`` and ``scoring.by_class=auto`` (the defaults) made concrete by a rule
    that sees the network, the data's sizes and where J comes from, never the pool's labels: wherever the data can
    spare them, ``AUTO_CANARIES`` canaries are drawn beside J, on any network, so that they choose the score ``auto``
    among the PMP family (``choose``); a *stacked* network (two or more blocks of several layers,
    ``statistics.plan.stacked_blocks``: a ResNet's residual blocks, a ViT's encoder blocks) on labelled data also
    gets the class replays, so the canaries choose among the class variants too. A trusted J of your own
    (``data.downstream``) gives its first 2k examples for them when it holds ``TRUSTED_SHARE`` × 2k or more. Data
    that cannot spare the canaries' examples, a J holding the pool and scores that hold none of the variants the
    canaries choose among get neither, and the log says why in one line. The one place that resolves them: the run
    calls it after checking every setting and before any training, and records what it resolved in metrics.json,
    which the reports that rebuild its data read (``report.compare.run_config``)."""
    canaries, by_class = cfg.scoring.get("canaries", 0), cfg.scoring.get("by_class", False)
    if "auto" not in (canaries, by_class):
        return cfg
    if canaries == 0:  # nothing would choose a class variant: no need to look at the network
        spare, stacked, why = False, [], "scoring.canaries=0"
    else:
        spare, stacked, why = _room(cfg, AUTO_CANARIES if canaries == "auto" else canaries)
    if canaries == "auto":
        canaries = AUTO_CANARIES if spare else 0
    if by_class == "auto":
        kind = data_kind(cfg.data)
        by_class = bool(stacked and canaries) and (kind is None or kind.labelled)  # a corpus's documents have no class
    if rank_zero_only.rank == 0:
        log.info(f"scoring.canaries={canaries}, scoring.by_class={str(by_class).lower()} (auto: {why})")
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.scoring.canaries, cfg.scoring.by_class = canaries, by_class
    return cfg


def _room(cfg: DictConfig, canaries: int) -> tuple[bool, list[str], str]:
    """Whether the data can spare ``canaries`` canaries, the network's stacked blocks, and why, in words. The data is
    set up once with them to see that it can (the run sets it up again: MNIST in well under a second) and the network
    built on it as the run builds it; a model that cannot be built, or data that cannot be set up at all, get no
    canaries, and the run names their problem before any training (``check_model``, the data stage). The data's
    warnings are held back here: the data stage's setup gives the same ones, so a run says each once."""
    if not any(n in AUTO_FAMILY for n in score_names(cfg.scoring)):
        return False, [], (f"scoring.scores holds none of the variants the canaries choose among "
                           f"({', '.join(AUTO_FAMILY)})")
    if cfg.data.get("downstream_includes_pool"):
        return False, [], "J holds the pool itself (data.downstream_includes_pool), and canaries would be cut from it"
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
            return False, [], "the data cannot be set up"
    else:
        return False, [], "the data cannot be set up"
    trusted = cfg.data.get("downstream") is not None
    taken = canaries * (2 if datamodule.kind.labelled else 1)  # a corpus's controls are its canaries' clean twins
    if trusted and not spare and len(datamodule.downstream) + taken < TRUSTED_SHARE * taken:
        spare = (f"; J is a trusted set of {len(datamodule.downstream) + taken} {datamodule.kind.unit}s, and it gives "
                 f"the {taken} of scoring.canaries={canaries} only from {TRUSTED_SHARE * taken} up (J keeps at least "
                 f"{1 - 1 / TRUSTED_SHARE:.0%} of it); set scoring.canaries lower to take fewer")
    try:
        with torch.random.fork_rng(devices=[]):
            net = shaped(instantiate(cfg.model, _partial_=True), datamodule.pool.x, datamodule.num_classes,
                         datamodule.vocab_size)()
    except Exception:  # noqa: BLE001 — check_model names what is wrong with it, before any training
        return False, [], "the model could not be built"
    blocks, kind = stacked_blocks(net), type(net).__name__
    shape = (f"{kind} is stacked: {len(blocks)} blocks of several layers ({', '.join(blocks)})" if len(blocks) >= 2
             else f"{kind} is not stacked: {len(blocks)} block(s) of several layers, so no class replays")
    return not spare, (blocks if len(blocks) >= 2 and not spare else []), shape + spare


def choose(scores: dict[str, np.ndarray], canary_mask: np.ndarray | None, n: int) -> tuple[dict[str, np.ndarray], dict | None]:
    """The pool's scores (the first ``n`` of each scored column; the canaries and controls after them), with the score
    ``auto`` where there are canaries: the PMP variant that ranks them lowest (``auto_choice``), and the choice's
    record for metrics.json (None without canaries)."""
    if canary_mask is None:
        return scores, None
    # the family in its order, the cosine first, so that it wins a tie (small sets of easy canaries often tie at AP 1)
    candidates = {name: scores[name][n:] for name in (*AUTO_FAMILY, *CLASS_VARIANTS) if name in scores}
    choice = auto_choice(candidates, canary_mask)
    # the choice's inputs, every PMP variant's, so that another rule can be replayed on this run's canaries
    choice["inputs"] = {"is_canary": np.asarray(canary_mask, dtype=bool).astype(int).tolist(),
                        "scores": {name: np.asarray(s[n:], dtype=float).tolist() for name, s in scores.items()
                                   if name in PMP_VARIANTS or name in CLASS_VARIANTS}}
    scores = {name: s[:n] for name, s in scores.items()}
    scores["auto"], said = scores[choice["chosen"]], choice["chosen"]
    if "hedged_with" in choice:
        scores["auto"] = hedge(scores["auto"], scores[choice["hedged_with"]])
        said += f" hedged with {choice['hedged_with']} (the mean of their ranks)"
    first = next(iter(candidates))
    log.info(f"canaries: {said} is the score auto (AP on the {choice['canaries']} canaries among as many "
             f"controls: " + ", ".join(f"{name} {ap:.3f}" for name, ap in choice["ap"].items())
             + f"; another than {first} only where it does better in ≥ {CANARY_CONFIDENCE:.0%} of resamples)")
    return scores, choice


# an alternative replaces the recommended variant only if it ranks the canaries better in this share of resamples
CANARY_CONFIDENCE = 0.95
CANARY_RESAMPLES = 1000


def canary_choice(scores: dict[str, np.ndarray], is_canary: np.ndarray, confidence: float = CANARY_CONFIDENCE,
                  resamples: int = CANARY_RESAMPLES) -> dict:
    """The variant that ranks the canaries (examples given a wrong label on purpose) lowest among them and the
    controls (as many with their own label), by average precision; only the run's downstream set decides, the pool's
    labels play no part. The first of ``scores`` (the recommended cosine) stays unless another beats its AP in at least
    ``confidence`` of the bootstrap resamples of canaries and controls (each resampled with replacement, the same
    resample for every variant): a difference that 2k examples cannot tell from chance does not move the choice. Of
    those that pass, the best AP on the whole set wins (the earlier on a tie)."""
    is_canary = np.asarray(is_canary, dtype=bool)
    ap = {name: float(average_precision_score(is_canary, -s)) for name, s in scores.items()}
    first, *others = scores
    rng = np.random.default_rng(0)
    canaries, controls = np.flatnonzero(is_canary), np.flatnonzero(~is_canary)
    wins = dict.fromkeys(others, 0)
    for _ in range(resamples if others else 0):
        idx = np.concatenate([rng.choice(canaries, len(canaries)), rng.choice(controls, len(controls))])
        base = average_precision_score(is_canary[idx], -scores[first][idx])
        for name in others:
            wins[name] += average_precision_score(is_canary[idx], -scores[name][idx]) > base
    beats = {name: wins[name] / resamples for name in others}
    return {"canaries": int(is_canary.sum()), "controls": int((~is_canary).sum()), "ap": ap,
            f"beats_{first}": beats, "chosen": _pick(others, first, ap, beats, confidence)}


def _pick(names, first: str, ap: dict[str, float], beats: dict[str, float], confidence: float) -> str:
    """Of ``names``, those that beat ``first`` in at least ``confidence`` of the resamples; the best AP of them wins
    (the earlier on a tie), else ``first``."""
    passed = [name for name in names if beats[name] >= confidence]
    return max(passed, key=lambda name: ap[name]) if passed else first


def auto_choice(candidates: dict[str, np.ndarray], is_canary: np.ndarray) -> dict:
    """The canaries' choice (``canary_choice``) over ``candidates``, the family ``AUTO_FAMILY`` and the class variants,
    in that order. Where it is a class variant, also ``hedged_with``: the whole-J variant the canaries choose among
    those alone, which the score ``auto`` ranks together with it (``registry.hedge``). Random wrong labels are the
    class variants' easiest case (a random image far from its label's class) and need not be the pool's errors: a
    wrong label the model learned as a systematic confusion sits close to its label's class, where only the costate
    of every class sees the harm it does to the class it came from (docs/design-notes.md, "The hedge")."""
    choice = canary_choice(candidates, is_canary)
    first, *others = candidates  # the whole-J variants come first: among them alone, the same resamples decide
    whole = [name for name in others if name in AUTO_FAMILY]
    if choice["chosen"] in CLASS_VARIANTS and first in AUTO_FAMILY:
        choice["hedged_with"] = _pick(whole, first, choice["ap"], choice[f"beats_{first}"], CANARY_CONFIDENCE)
    return choice


def hedge(*scores: np.ndarray) -> np.ndarray:
    """The mean of the scores' ranks over the same examples (each scaled to (0, 1], ties averaged): an example is a
    suspect as far as every one of them finds it one. The canaries' choice hedges a class variant with a whole-J
    variant (``choose``)."""
    from scipy.stats import rankdata

    return np.mean([rankdata(s) / len(s) for s in scores], axis=0)
