"""The exceptions popup_adapter raises, by name, so callers can catch exactly what went wrong.

Every one subclasses ``ValueError`` (bad input, not a bug) and carries a message that names the
problem and the fix.
"""

from __future__ import annotations


class PopupError(ValueError):
    """Base class of every error popup_adapter raises on bad input."""


class TargetModulesError(PopupError):
    """``target_modules`` / ``exclude_modules`` match nothing, or match a module we cannot mask."""


class AlreadyAdaptedError(PopupError):
    """The model already carries popup layers; add a further mask with ``add_adapter`` instead."""


class BaseMismatchError(PopupError):
    """The regenerated random base differs from the one the mask was trained on.

    A mask only means something on the exact weights it was learned over, so loading it onto any
    other base is refused rather than producing a silently wrong network.
    """


class ArtifactError(PopupError):
    """An artifact on disk or on the Hub is missing, truncated, corrupted or of unknown format."""


class AdapterError(PopupError):
    """An adapter is named that does not exist, exists already, or cannot share this backbone
    (another base, other targets); or the last adapter would be deleted."""


class ConfigError(PopupError):
    """A [`PopupConfig`][popup_adapter.PopupConfig] field (or ``base_kwargs``) has a value that
    cannot work: k outside (0, 1], an unknown init, a negative seed, ..."""
