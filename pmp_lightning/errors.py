"""Errors that describe bad input; each message names the problem and the fix.

``run.py`` prints these as one line instead of a traceback.
"""


class PMPError(Exception):
    """Base class of the project's user-facing errors."""


class SettingError(PMPError, ValueError):
    """A run setting that cannot work (the seed, say), refused before any work."""


class DataConfigError(PMPError, ValueError):
    """A data, noise or split setting that cannot work."""


class SnapshotError(PMPError, RuntimeError):
    """A snapshot directory that cannot be replayed."""


class ReplayConfigError(PMPError, ValueError):
    """A replay setting that does not fit the trajectory or the model."""


class CostateDivergedError(PMPError, FloatingPointError):
    """The costate recursion produced inf or NaN."""


class UnknownScoreError(PMPError, KeyError):
    """A score name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class UnsupportedModelError(PMPError, TypeError):
    """A network whose per-example gradients are not defined (its examples interact in eval mode)."""


class OutputError(PMPError, OSError):
    """An output or cache directory that cannot be written."""
