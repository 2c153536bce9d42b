"""The fault-injection hook: a writer announces each step of a commit and waits there.

With ``$PTEENET_PAUSE_DIR`` set, a test (tests/e2e/test_crash_safety.py) can stop a writer between
any two steps and kill it at exactly that step; unset, a step costs one environment lookup.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["PAUSE_ENV", "pause_point"]

PAUSE_ENV = "PTEENET_PAUSE_DIR"


def pause_point(step: str) -> None:
    """With ``$PTEENET_PAUSE_DIR`` set: create ``<dir>/<step>`` and wait until it is removed."""
    folder = os.environ.get(PAUSE_ENV)
    if not folder:
        return
    marker = Path(folder) / step
    marker.write_text(str(os.getpid()))
    while marker.exists():
        time.sleep(0.001)
