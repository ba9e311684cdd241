"""The replay's named settings and what the run says about them, with no heavy import: ``config.check_settings``
checks them with every other setting before torch or Lightning is loaded, so a typo is named in about a second."""
from __future__ import annotations

from pmp_lightning.errors import ReplayConfigError

CURVATURES = ("exact", "coarse", "none", "expm")  # the propagators of replay/costate.py (PROPAGATORS; tested)
HORIZONS = ("area", "terminal")


def check_replay_settings(curvature: str, horizon: str) -> None:
    """The replay's named settings, checked with every other setting before any work (``config.check_settings``) and
    again by a ReplayModule built directly; its numbers are checked with the other numbers (``config._NUMBERS``)."""
    if curvature not in CURVATURES:
        raise ReplayConfigError(f"unknown replay.curvature {curvature!r}; choose one of {', '.join(CURVATURES)}")
    if horizon not in HORIZONS:
        raise ReplayConfigError(f"unknown replay.horizon {horizon!r}; choose one of {', '.join(HORIZONS)}")


def growth_advice(curvature: str) -> str:
    """What to do about a costate that grew between snapshots: expm for the curvature modes that can explode; under
    expm, which cannot, the growth comes from ∇J itself or Adam's preconditioner."""
    if curvature == "expm":
        return ("expm cannot grow λ through the curvature, so the growth comes from ∇J(θ_t) (the data's scale, the "
                "objective) or Adam's preconditioner: check the inputs' scale (8-bit images: data.source.scale=255)")
    return "try replay.curvature=expm (stable)"
