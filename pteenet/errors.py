"""pteenet's own exceptions.

Every failure a user can cause (a bad name, a bad file, a bad option) is raised as a subclass of
:class:`PteenetError` whose message is one line that names the problem and the fix. The CLI turns
each into that one line and a non-zero exit (see ``cli/_errors.py``); Python callers can catch them
by type.
"""

from __future__ import annotations

__all__ = [
    "BundleError",
    "CalibrationError",
    "CheckpointError",
    "DataError",
    "ExportError",
    "Interrupted",
    "ModelNotFoundError",
    "OfflineError",
    "OptionError",
    "PlacementError",
    "PteenetError",
    "TraceError",
    "TrainingError",
    "need_extra",
]


class PteenetError(Exception):
    """Base class: a problem with the user's input, explained in one line."""


class ModelNotFoundError(PteenetError):
    """A backbone name that no registry (CIFAR family, timm, torchvision) knows."""


class CheckpointError(PteenetError):
    """A checkpoint file that is missing, unreadable, unsafe or for another architecture."""


class OfflineError(PteenetError):
    """Something had to be downloaded and the network could not be reached."""


class TraceError(PteenetError):
    """A backbone that torch.fx cannot trace, or a cut that does not exist."""


class PlacementError(PteenetError):
    """Exits cannot be placed as asked (too many branches, bad fractions)."""


class DataError(PteenetError):
    """A dataset that is missing, empty or unusable."""


class BundleError(PteenetError):
    """A bundle or threshold table that is missing, corrupt or inconsistent."""


class TrainingError(PteenetError):
    """Training could not go on (e.g. the loss became NaN)."""


class CalibrationError(PteenetError):
    """Thresholds cannot be calibrated as asked."""


class ExportError(PteenetError):
    """A graph the exporter could not write, or one that does not reproduce the model."""


class OptionError(PteenetError):
    """An option value out of range, or options that conflict."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a long run, with what was kept: still a KeyboardInterrupt (``except
    Exception`` does not swallow it), but its message says what survived and ``resumable``
    whether the same command with ``--resume`` continues it."""

    def __init__(self, message: str, resumable: bool = False) -> None:
        super().__init__(message)
        self.resumable = resumable


def need_extra(module: str, package: str, extra: str, what: str) -> None:
    """Refuse in one line, before any work, when ``what`` needs an optional dependency that is
    not installed: scikit-learn (the demo's digits) and matplotlib (the sweep plot) are extras,
    not requirements, since the pipeline itself never uses them."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise OptionError(f"{what} needs {package}, which is not installed: "
                          f"pip install \"pteenet[{extra}]\" (or pip install {package})")
