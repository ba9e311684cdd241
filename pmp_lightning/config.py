"""Hydra schema for the ``scoring`` group, generated from the score registry.

``scoring=<name>`` selects one registered score, ``scoring=all`` (the default) every score and
``scoring=baselines`` the baselines. The ``scores`` field is typed by an Enum of the registered
names, so a typo (``scoring.scores=[rwa]``) fails when Hydra composes the config, with the list of
valid names, and ``scoring=rwa`` fails with Hydra's list of the group's options.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import List

from hydra.core.config_store import ConfigStore

from pmp_lightning.scores import PMP_VARIANTS, SCORES

ScoreName = Enum("ScoreName", {name: name for name in SCORES}, type=str)


@dataclass
class ScoringConfig:
    scores: List[ScoreName] = field(default_factory=lambda: [ScoreName[n] for n in SCORES])


def score_names(scoring) -> list[str]:
    """The configured score names as plain strings."""
    return [getattr(s, "value", s) for s in scoring.scores]


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(group="scoring", name="all", node=ScoringConfig())
    store.store(group="scoring", name="baselines",
                node=ScoringConfig(scores=[ScoreName[n] for n in SCORES if n not in PMP_VARIANTS]))
    for name in SCORES:
        store.store(group="scoring", name=name, node=ScoringConfig(scores=[ScoreName[name]]))
