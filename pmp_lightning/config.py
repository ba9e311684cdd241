"""Hydra schema for the ``scoring`` group, generated from the score registry.

``scoring=<name>`` selects one registered score, ``scoring=all`` (the default) every score and
``scoring=baselines`` the baselines. The ``scores`` field is typed by an Enum of the registered
names, so a typo (``scoring.scores=[rwa]``) fails when Hydra composes the config, with the list of
valid names, and ``scoring=rwa`` fails with Hydra's list of the group's options. ``rank_by`` names
the score that orders ``suspects.csv`` (default: ``cosine`` when computed, else the first score).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from pmp_lightning.errors import DataConfigError, ReplayConfigError, SettingError, UnknownScoreError
from pmp_lightning.replay.settings import check_replay_settings
from pmp_lightning.scores.registry import (AUTO_FAMILY, CLASS_VARIANTS, CORPUS_BASELINES, FITTED_VARIANTS, PMP_VARIANTS,
                                           SCORER_TARGET, SCORES, pmp_names)

ScoreName = Enum("ScoreName", {name: name for name in SCORES}, type=str)


@dataclass
class ScoringConfig:
    scores: List[ScoreName] = field(default_factory=lambda: [ScoreName[n] for n in SCORES])
    rank_by: Optional[str] = None
    # downstream examples given a wrong label and held out of J (and as many controls), for rank_by=auto; auto: 40 on
    # a stacked network (policy.resolve), else 0
    canaries: Any = "auto"
    # also score each example against its own label's class's costate (one replay per class); auto: on a stacked
    # network with canaries
    by_class: Any = "auto"


def score_names(scoring) -> list[str]:
    """The configured score names as plain strings."""
    return [getattr(s, "value", s) for s in scoring.scores]


# ``objective=auto``: J by what the pool is, never by its labels. A pool the trajectory trained on left its
# damage in the model, where CE's direction (kept at unit length by unit_ce) finds it; a held-out pool did
# no damage, so every downstream example has to pull alike and the same way (logit_gap).
RECOMMENDED_OBJECTIVE = {"train": "unit_ce", "holdout": "logit_gap", "test": "logit_gap"}


def recommended_objective(pool_mode: str) -> str:
    if pool_mode not in RECOMMENDED_OBJECTIVE:
        raise ReplayConfigError(f"objective=auto knows no objective for data.pool_mode={pool_mode!r}; "
                                f"name one, e.g. objective=unit_ce")
    return RECOMMENDED_OBJECTIVE[pool_mode]


PROJECT_ROOT = Path(__file__).resolve().parents[1]  # where conf/ and run.py live

RESOLVERS = {
    "recommended_objective": recommended_objective,
    # outputs and the cache stay in the project wherever the command is started from (paths.root_dir overrides)
    "project_root": lambda: str(PROJECT_ROOT),
    # in run directory names: two jobs started in the same second still get directories of their own
    "pid": os.getpid,
}


def register_configs() -> None:
    for name, resolver in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
    store = ConfigStore.instance()
    store.store(group="scoring", name="all", node=ScoringConfig())
    store.store(group="scoring", name="baselines",
                node=ScoringConfig(scores=[ScoreName[n] for n in SCORES if n not in PMP_VARIANTS]))
    for name in SCORES:
        store.store(group="scoring", name=name, node=ScoringConfig(scores=[ScoreName[name]]))


# settings checked before any work: (key, smallest allowed, may be null, example)
_NUMBERS = (
    ("replay.lanczos_steps", 1, False, "8"),
    ("replay.hvp_samples", 1, True, "64"),
    ("replay.batch_size", 1, True, "64"),
    ("trainer.max_epochs", 1, False, "10"),
    ("data.batch_size", 1, False, "32"),
)


MAX_SEED = 2**32 - 1  # numpy's and Lightning's seeds are unsigned 32-bit


def data_kind(data):
    """The kind of task (``task.CLASSIFICATION``, ``task.LANGUAGE_MODEL``) that a ``data`` config builds, read from its
    class without building it; None where the class cannot be had (the build names that)."""
    from hydra.utils import get_class

    try:
        return get_class(data.get("_target_")).kind
    except Exception:  # noqa: BLE001 — an unknown target, or a class without a kind: the data stage names it
        return None


def check_settings(cfg) -> None:
    """Refuse a setting that cannot work before anything is loaded or trained, naming it and the fix: numbers, the
    seed, the replay's settings (before torch is loaded: ``run.py`` calls this first), the selection settings and
    every key of every node built from a ``_target_``. ``scoring.canaries`` and ``scoring.by_class`` may still be
    ``auto`` here (``policy.resolve`` makes them concrete afterwards)."""
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise SettingError(f"seed={seed!r}: it must be an integer from 0 to {MAX_SEED}, e.g. seed=0")
    for key, least, nullable, example in _NUMBERS:
        section, name = key.split(".")
        value = cfg[section].get(name)
        if value is None and nullable:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            allowed = f"an integer ≥ {least}" + (" or null" if nullable else "")
            raise ReplayConfigError(f"{key}={value!r}: it must be {allowed}, e.g. {key}={example}")
    check_replay_settings(cfg.replay.get("curvature"), cfg.replay.get("horizon"))
    growth = cfg.replay.get("growth_warning")
    if isinstance(growth, bool) or not isinstance(growth, (int, float)) or growth <= 1:
        raise ReplayConfigError(f"replay.growth_warning={growth!r}: it must be a number > 1 (a growth factor of ‖λ‖), e.g. 10")
    if cfg.baselines.cleanlab:
        check_folds(cfg.baselines.folds)
    by_class = cfg.scoring.get("by_class", False)
    kind = data_kind(cfg.data)
    corpus = kind is not None and not kind.labelled  # a corpus: its language-model baselines come with every run
    if not (isinstance(by_class, bool) or by_class == "auto") or (by_class is True and corpus):
        raise SettingError(f"scoring.by_class={by_class!r}: true scores each example against the costate of its own "
                           f"label's class, false does not, auto (the default) does on a stacked network with canaries"
                           + ("; a corpus has no labels: leave it auto or false" if by_class is True else ""))
    names = _computed(cfg)
    chosen = ["auto"] if len(pmp_names(names)) >= 2 else []  # the policy's choice, where it has one to make
    _check_selection(cfg.select, cfg.data.get("pool_mode"), [*names, *chosen, *(CORPUS_BASELINES if corpus else ())])
    if cfg.data.get("wide_size") and not corpus:
        raise SettingError("data.wide_size is the data scorer's wide slice of a corpus (data=code, +experiment=code_lm); "
                           "this data has no documents to deal it from")
    if cfg.data.get("wide_size") and SCORER_TARGET not in names:
        raise SettingError(f"data.wide_size: the data scorer learns the PMP score {SCORER_TARGET}, which this run does not "
                           f"compute; add it to scoring.scores (e.g. scoring=all)")
    canaries = cfg.scoring.get("canaries", 0)
    if canaries != "auto" and (isinstance(canaries, bool) or not isinstance(canaries, int) or canaries < 0):
        raise SettingError(f"scoring.canaries={canaries!r}: give how many downstream examples to hold out as canaries "
                           f"(an integer ≥ 0, e.g. 40; 0: none), or auto (the default: 40 on a stacked network)")
    if canaries not in ("auto", 0) and not any(n in (*AUTO_FAMILY, *CLASS_VARIANTS) for n in names):
        raise SettingError(f"scoring.canaries chooses among the PMP variants {', '.join(AUTO_FAMILY)}, and this run "
                           f"computes none; add some to scoring.scores (e.g. scoring=all)")
    run_scores(cfg)  # scoring.rank_by among them
    check_keys(cfg)  # after the checks above, whose messages say more about the settings they know


def run_scores(cfg) -> tuple[list[str], str]:
    """The names of the scores the run computes (cleanlab included when asked for, the class variants with
    ``scoring.by_class``) and the score that orders suspects.csv, once ``policy.resolve`` has made the scoring
    settings concrete."""
    names = _computed(cfg)
    return names, _rank_by(cfg.scoring.get("rank_by"), names, cfg.scoring.get("canaries", 0))


def _computed(cfg) -> list[str]:
    names = [*score_names(cfg.scoring), *(["cleanlab"] if cfg.baselines.cleanlab else []),
             *(CLASS_VARIANTS if cfg.scoring.get("by_class", False) is True else [])]
    # fitted on the canaries, where the policy has a choice to make (before policy.resolve, canaries=auto counts: a
    # run whose data cannot spare them drops it there, before any training)
    if cfg.scoring.get("canaries", 0) not in (0, None) and len(pmp_names(names)) >= 2:
        names += FITTED_VARIANTS
    return names


HYDRA_KEYS = {"_target_", "_partial_", "_args_", "_recursive_", "_convert_"}


def check_keys(node, where: str = "") -> None:
    """Every key of a node that Hydra builds from a ``_target_`` must be one of the target's arguments: a typo
    (``+data.pool_sise=300``) is named with the nearest setting and the valid ones, not left to Hydra's TypeError from
    inside the build. Targets that take ``**kwargs``, or that cannot be imported (the build names those), are left
    alone, as are the null shape settings a model of your own need not take (``training.shaped`` drops them). Nested
    nodes are checked on their own."""
    import difflib
    import inspect

    from hydra.utils import get_object
    from omegaconf import DictConfig

    from pmp_lightning.training import SHAPE_SETTINGS

    if not isinstance(node, DictConfig):
        return
    target = node.get("_target_") if "_target_" in node else None
    if isinstance(target, str):
        try:
            obj = get_object(target)
            params = inspect.signature(obj).parameters
        except Exception:  # noqa: BLE001 — an unknown target or a builtin without a signature: the build names it
            params = None
        if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            for key in node:
                if key in HYDRA_KEYS or key in params or (key in SHAPE_SETTINGS and node.get(key) is None):
                    continue
                settings = [k for k in params if k not in ("self", "args")]
                near = difflib.get_close_matches(str(key), settings, n=1)
                hint = f" (did you mean {where}{near[0]}?)" if near else ""
                raise SettingError(f"{where}{key} is not a setting of {target}{hint}; its settings: "
                                   f"{', '.join(settings)}")
    for key in node:
        if key not in HYDRA_KEYS:
            check_keys(node._get_node(key), f"{where}{key}.")


def check_folds(folds, pool_size: int | None = None) -> None:
    """cleanlab's cross-validation folds: checked with the settings, and once the pool's size is known."""
    if isinstance(folds, bool) or not isinstance(folds, int) or not 2 <= folds <= (pool_size or folds):
        size = f" ({pool_size})" if pool_size else ""
        raise DataConfigError(f"baselines.folds={folds!r}: cross-validation needs an integer from 2 to the pool size{size}, "
                              f"e.g. baselines.folds=5")


def _check_selection(select, pool_mode: str | None, names: list[str]) -> None:
    if not select.fractions:
        return
    if pool_mode != "train":
        raise DataConfigError("select.fractions removes examples from the training set, so it needs pool=train")
    for fraction in select.fractions:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise DataConfigError(f"select.fractions holds {fraction!r}; each fraction must be in (0, 1), e.g. [0.1, 0.2]")
    unknown = [s for s in select.scores if s not in names]
    if unknown:
        raise DataConfigError(f"select.scores {unknown} are not computed by this run; add them to scoring.scores "
                              f"(cleanlab: baselines.cleanlab=true) or pick from {sorted(names)}")


def _rank_by(wanted: str | None, names: list[str], canaries) -> str:
    """The score that orders suspects.csv: ``scoring.rank_by``; by default ``auto``, the variant the policy chooses
    (on the canaries where there are any, else its incumbent: ``policy.choose``) when the run computes two PMP
    variants or more, else the one it computes, else the first score."""
    pmp = pmp_names(names)
    if wanted == "auto" and len(pmp) < 2:
        raise SettingError("scoring.rank_by=auto ranks by the PMP variant the policy chooses, and this run computes "
                           f"{'only ' + pmp[0] if pmp else 'none'}; add more to scoring.scores (e.g. scoring=all)")
    if wanted is None:
        return "auto" if len(pmp) >= 2 else pmp[0] if pmp else names[0]
    if wanted == "auto":
        return wanted
    if wanted in FITTED_VARIANTS and wanted not in names:
        raise SettingError(f"scoring.rank_by={wanted}: {wanted} is fitted on the canaries, and this run has none or "
                           f"computes fewer than two PMP variants; set scoring.canaries (e.g. 40) where the data can "
                           f"spare them, or rank by auto")
    if wanted not in names:
        raise UnknownScoreError(f"scoring.rank_by={wanted} is not among the scores this run computes; pick one of "
                                f"{', '.join(names)}, or auto")
    return wanted
    if wanted not in names:
        raise UnknownScoreError(f"scoring.rank_by={wanted} is not among the scores this run computes; pick one of "
                                f"{', '.join(names)}")
    return wanted
