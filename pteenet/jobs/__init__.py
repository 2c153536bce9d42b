"""The jobs the commands run: inspect a backbone, attach exits to it."""

from pteenet.jobs._attach import (
    STATE_FILE,
    WARN_SHARE,
    AttachResult,
    attach,
)
from pteenet.jobs._inspect import (
    inspect_backbone,
)

__all__ = [
    "AttachResult",
    "STATE_FILE",
    "WARN_SHARE",
    "attach",
    "inspect_backbone",
]
