"""The scoring policy, in one place: what turns the settings left to the run into concrete ones before any training,
and what chooses the score ``auto`` at the end, with the record of both.

Before training (``resolve``): ``scoring.canaries=auto`` and ``scoring.by_class=auto`` become a number and a flag by
a rule that sees the data's sizes and where J comes from, never the pool's labels (``AUTO_CANARIES`` canaries
wherever the data can spare them; no class replays). After the replays (``choose``): the rule ``RULE`` of the
registry ``RULES`` makes the score ``auto`` of what the canaries say; without canaries, its incumbent ``FALLBACK``.
The rule and the fallback were fitted on a suite of settings drawn before any rule was (``report/suite.py``: the
development suite, then the validation suite once), the rule was settled between the two best there by a third
suite drawn before it ran, and ``block_fit`` joined its candidates by a fourth (docs/design-notes.md). Both steps
are logged in one line each and recorded in metrics.json (``scoring``, ``canaries``, the latter with the choice's
inputs).

The other settings named ``auto`` resolve where their names are read: ``objective=auto`` by the pool's mode when the
config is composed (``config.recommended_objective``), ``scoring.rank_by`` (suspects.csv's order) to ``auto`` where
the run computes a PMP variant (``config.run_scores``).
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from pmp_lightning.errors import DataConfigError
from pmp_lightning.scores.registry import AUTO_FAMILY, CLASS_VARIANTS, FITTED_VARIANTS, PMP_VARIANTS, pmp_names

log = logging.getLogger(__name__)

# scoring.canaries=auto on a stacked network (two or more blocks of several layers): this many canaries and controls
AUTO_CANARIES = 40
# a trusted J of your own (data.downstream) gives its first 2k examples for k canaries and controls when it holds at
# least this many times 2k, so that J keeps 90% of it or more
TRUSTED_SHARE = 10


def resolve(cfg: DictConfig) -> DictConfig:
    """The config with ``scoring.canaries=auto`` and ``scoring.by_class=auto`` (the defaults) made concrete by a rule
    that sees the data's sizes and where J comes from, never the pool's labels: wherever the data can spare them,
    ``AUTO_CANARIES`` canaries are drawn beside J, on any network, so that they choose the score ``auto`` among the
    PMP family (``choose``). A trusted J of your own (``data.downstream``) gives its first 2k examples for them when
    it holds ``TRUSTED_SHARE`` × 2k or more. Data that cannot spare the canaries' examples and a J holding the pool
    get none, and the log says why in one line. The scores asked for play no part, so that changing them retrains
    nothing (the canaries train with a training pool).
    ``by_class=auto`` is off: on the development suite the class replays lowered the chosen rule's mean regret by
    0.001 AP, less than the 0.005 fixed beforehand as their worth, at 2.5-19× a replay (docs/suites/development.md);
    ``scoring.by_class=true`` adds them, and the canaries choose among them too. The one place that resolves them:
    the run calls it after checking every setting and before any training, and records what it resolved in
    metrics.json, which the reports that rebuild its data read (``report.compare.run_config``)."""
    canaries, by_class = cfg.scoring.get("canaries", 0), cfg.scoring.get("by_class", False)
    if "auto" not in (canaries, by_class):
        return cfg
    why = []
    if canaries == "auto":
        spare, reason = _room(cfg, AUTO_CANARIES)
        canaries = AUTO_CANARIES if spare else 0
        why.append(reason)
    if by_class == "auto":
        by_class = False
        why.append("no class replays: they did not earn their cost on the development suite; scoring.by_class=true "
                   "adds them")
    if rank_zero_only.rank == 0:
        log.info(f"scoring.canaries={canaries}, scoring.by_class={str(by_class).lower()} (auto: {'; '.join(why)})")
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.scoring.canaries, cfg.scoring.by_class = canaries, by_class
    return cfg


def _room(cfg: DictConfig, canaries: int) -> tuple[bool, str]:
    """Whether the data can spare ``canaries`` canaries, and why, in words. The data is set up once with them to see
    that it can (the run sets it up again: MNIST in well under a second); data that cannot be set up at all gets
    none, and the data stage names its problem before any training. The data's warnings are held back here: the data
    stage's setup gives the same ones, so a run says each once."""
    if cfg.data.get("downstream_includes_pool"):
        return False, "J holds the pool itself (data.downstream_includes_pool), and canaries would be cut from it"
    try:
        with warnings.catch_warnings():  # the data stage sets the data up again and says them: once a run
            warnings.simplefilter("ignore")
            datamodule = instantiate(cfg.data, noise=instantiate(cfg.noise), canaries=canaries)
            datamodule.setup()
    except DataConfigError:
        return False, f"the data cannot spare the {2 * canaries} examples of scoring.canaries={canaries} beside J"
    except Exception:  # noqa: BLE001 — the settings check and the data stage name what is wrong, before training
        return False, "the data cannot be set up"
    taken = canaries * (2 if datamodule.kind.labelled else 1)  # a corpus's controls are its canaries' clean twins
    if cfg.data.get("downstream") is not None and len(datamodule.downstream) + taken < TRUSTED_SHARE * taken:
        return False, (f"J is a trusted set of {len(datamodule.downstream) + taken} {datamodule.kind.unit}s, and it "
                       f"gives the {taken} of scoring.canaries={canaries} only from {TRUSTED_SHARE * taken} up (J keeps "
                       f"at least {1 - 1 / TRUSTED_SHARE:.0%} of it); set scoring.canaries lower to take fewer")
    return True, f"the data spares {taken} {datamodule.kind.unit}s for them beside J"


# ----------------------------------------------------------------------------- the score auto
@dataclass(frozen=True)
class Rule:
    """How the canaries choose the score ``auto``:

    - ``variants``: among which scores: ``family`` (``AUTO_FAMILY``, then the class variants), ``fitted`` (the
      family, ``block_fit``, then the class variants) or ``all`` (every PMP variant of the registry, then the class
      variants); only those the run computed take part;
    - ``incumbent``: what holds without a confident reason to move: ``cosine`` or ``fallback`` (``FALLBACK``, the
      variant best on average over the development suite);
    - ``decide``: ``none`` (the incumbent, whatever the canaries say), ``test`` (another replaces the incumbent only
      where it ranks the canaries better in at least ``CANARY_CONFIDENCE`` of the bootstrap resamples; of those that
      do, the best AP on the canaries), ``best`` (the best AP on the canaries, the incumbent on a tie) or ``tied`` (the
      mean rank of the best and of every variant that the best does not beat in ``CANARY_CONFIDENCE`` of the
      resamples: no difference that 2k examples cannot tell from chance decides);
    - ``hedge``: a class variant chosen by ``test`` is ranked together with the whole-J variant that the same test
      chooses among those alone (the rule of issue 24, kept to be measured against).

    A run without canaries takes the incumbent."""

    variants: str
    incumbent: str
    decide: str
    hedge: bool = False


# every rule the development suite weighs (python -m pmp_lightning.report.suite fit); RULE names the one the run uses
RULES = {
    "cosine": Rule("family", "cosine", "none"),
    "fallback": Rule("family", "fallback", "none"),
    "test_cosine_hedged": Rule("family", "cosine", "test", hedge=True),
    "test_cosine": Rule("family", "cosine", "test"),
    "test_fallback": Rule("family", "fallback", "test"),
    "best": Rule("family", "fallback", "best"),
    "tied": Rule("family", "fallback", "tied"),
    "all_test_fallback": Rule("all", "fallback", "test"),
    "all_best": Rule("all", "fallback", "best"),
    "all_tied": Rule("all", "fallback", "tied"),
    "best_fit": Rule("fitted", "fallback", "best"),
}
# the canaries' best AP, block_fit among the candidates (on its out-of-fold AP): on the fourth drawn suite
# (docs/suites/fourth.yaml, seed 4) it had the lower mean regret of the two rules it was drawn to decide between, fixed
# before it ran: 0.016 against "best"'s 0.029 (docs/suites/fourth_fit.md; "best" had won the third suite over "tied")
RULE = "best_fit"
FALLBACK = "block_cosine"  # the whole-J variant best on average over the development suite
# an alternative replaces the incumbent only if it ranks the canaries better in this share of resamples
CANARY_CONFIDENCE = 0.95
CANARY_RESAMPLES = 1000


def choose(scores: dict[str, np.ndarray], canary_mask: np.ndarray | None, n: int,
           rule: str | None = None) -> tuple[dict[str, np.ndarray], dict | None]:
    """The pool's scores (the first ``n`` of each scored column; the canaries and controls after them) with the score
    ``auto``: what ``rule`` decides on the canaries (``decide``), or its incumbent where there are none; and the
    decision's record for metrics.json, its inputs included (every PMP variant's scores on the canaries), so that
    another rule can be replayed on the run. No ``auto`` and None where the run computes fewer than two PMP variants
    (nothing to choose between: ``config.run_scores`` ranks by the one there is)."""
    rule = rule or RULE
    pool = {name: s[:n] for name, s in scores.items()}
    if len(pmp_names(scores)) < 2:
        return pool, None
    variants = candidates(RULES[rule], scores)
    if canary_mask is None:
        choice = {"rule": rule, "canaries": 0, "combined": [variants[0]]}
        said = f"{variants[0]} is the score auto (no canaries: the incumbent of rule {rule})"
    else:
        inputs = {name: np.asarray(scores[name][n:], dtype=float) for name in pmp_names(scores)}
        choice = decide(RULES[rule], inputs, canary_mask, variants)
        choice = {"rule": rule, **choice,
                  "inputs": {"is_canary": np.asarray(canary_mask, dtype=bool).astype(int).tolist(),
                             "scores": {name: s.tolist() for name, s in inputs.items()}}}
        said = (" and ".join(choice["combined"]) + " is the score auto" + (" (the mean of their ranks)" if
                len(choice["combined"]) > 1 else "") + f" (rule {rule}; AP on the {choice['canaries']} canaries among "
                f"as many controls: " + ", ".join(f"{name} {ap:.3f}" for name, ap in choice["ap"].items()) + ")")
    pool["auto"] = combine([pool[name] for name in choice["combined"]])
    log.info(f"canaries: {said}")
    return pool, choice


def candidates(rule: Rule, scores, fallback: str | None = None) -> list[str]:
    """The variants ``rule`` chooses among, of those in ``scores``, its incumbent first (``fallback``: the incumbent
    ``fallback`` stands for, by default ``FALLBACK``); where the run computes none of them (scores of your own), the
    PMP variants it does compute."""
    names = {"family": AUTO_FAMILY, "fitted": (*AUTO_FAMILY, *FITTED_VARIANTS)}.get(rule.variants, PMP_VARIANTS)
    names = [name for name in (*names, *CLASS_VARIANTS) if name in scores] or [
        name for name in (*PMP_VARIANTS, *CLASS_VARIANTS) if name in scores]
    incumbent = (fallback or FALLBACK) if rule.incumbent == "fallback" else rule.incumbent
    if incumbent in names:
        names.remove(incumbent)
        names.insert(0, incumbent)
    return names


def decide(rule: Rule, scores: dict[str, np.ndarray], is_canary: np.ndarray, variants: list[str]) -> dict:
    """What ``rule`` makes of ``variants``' scores on the canaries (``is_canary``: which of the scored are canaries,
    the rest their controls): ``combined``, the variants whose mean rank is the score auto, with the AP of each variant
    on the canaries and, for the bootstrap rules, how often each beats the incumbent (``beats``) and how often the
    best beats each (``beaten_by_best``). The resamples are the same for every variant and every rule (canaries and
    controls each resampled with replacement, ``CANARY_RESAMPLES`` times, seeded)."""
    is_canary = np.asarray(is_canary, dtype=bool)
    ap = {name: float(average_precision(is_canary, -np.asarray(scores[name]))[0]) for name in variants}
    first, *others = variants
    record = {"canaries": int(is_canary.sum()), "controls": int((~is_canary).sum()), "ap": ap}
    if rule.decide == "none" or not others:
        return {**record, "combined": [first]}
    best = max(variants, key=lambda name: ap[name])  # the earlier on a tie: the incumbent first
    if rule.decide == "best":
        return {**record, "combined": [best]}
    boot = resampled_ap(scores, is_canary, variants)
    if rule.decide == "tied":
        beaten = {name: float(np.mean(boot[best] > boot[name])) for name in variants if name != best}
        tied = [name for name in variants if name == best or beaten[name] < CANARY_CONFIDENCE]
        return {**record, "beaten_by_best": beaten, "combined": tied}
    beats = {name: float(np.mean(boot[name] > boot[first])) for name in others}
    chosen = _pick(others, first, ap, beats)
    combined = [chosen]
    if rule.hedge and chosen in CLASS_VARIANTS and first in AUTO_FAMILY:
        combined.append(_pick([name for name in others if name in AUTO_FAMILY], first, ap, beats))
    return {**record, "beats": beats, "combined": combined}


def resampled_ap(scores: dict[str, np.ndarray], is_canary: np.ndarray, names: list[str],
                 resamples: int = CANARY_RESAMPLES) -> dict[str, np.ndarray]:
    """Each variant's AP on ``resamples`` bootstrap resamples of the canaries and controls (each group resampled with
    replacement, the same resample for every variant, seeded)."""
    rng = np.random.default_rng(0)
    canaries, controls = np.flatnonzero(is_canary), np.flatnonzero(~is_canary)
    idx = np.stack([np.concatenate([rng.choice(canaries, len(canaries)), rng.choice(controls, len(controls))])
                    for _ in range(resamples)])
    return {name: average_precision(is_canary[idx], -np.asarray(scores[name])[idx]) for name in names}


def average_precision(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """scikit-learn's ``average_precision_score`` (tied scores share one threshold) along the last axis, for many
    rows at once: the mean over the positives of the precision at the end of each one's group of tied scores."""
    labels, scores = np.atleast_2d(labels).astype(float), np.atleast_2d(scores)
    order = np.argsort(-scores, axis=-1, kind="stable")
    labels, scores = np.take_along_axis(labels, order, -1), np.take_along_axis(scores, order, -1)
    m = scores.shape[-1]
    precision = np.cumsum(labels, -1) / np.arange(1, m + 1)
    ends = np.ones_like(scores, dtype=bool)
    ends[..., :-1] = scores[..., 1:] != scores[..., :-1]
    last = np.minimum.accumulate(np.where(ends, np.arange(m), m)[..., ::-1], axis=-1)[..., ::-1]  # each group's end
    return (labels * np.take_along_axis(precision, last, -1)).sum(-1) / labels.sum(-1)


def _pick(names, first: str, ap: dict[str, float], beats: dict[str, float]) -> str:
    """Of ``names``, those that beat ``first`` in at least ``CANARY_CONFIDENCE`` of the resamples; the best AP of them
    wins (the earlier on a tie), else ``first``."""
    passed = [name for name in names if beats[name] >= CANARY_CONFIDENCE]
    return max(passed, key=lambda name: ap[name]) if passed else first


def combine(scores: list[np.ndarray]) -> np.ndarray:
    """One score as it is; several, the mean of their ranks (``hedge``)."""
    return scores[0] if len(scores) == 1 else hedge(*scores)


def hedge(*scores: np.ndarray) -> np.ndarray:
    """The mean of the scores' ranks over the same examples (each scaled to (0, 1], ties averaged): an example is a
    suspect as far as every one of them finds it one (``combine``)."""
    from scipy.stats import rankdata

    return np.mean([rankdata(s) / len(s) for s in scores], axis=0)
