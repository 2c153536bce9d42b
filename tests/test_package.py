"""The package's public surface: lazy names resolve, and the runtime needs no torch."""

from __future__ import annotations

import subprocess
import sys

import pteenet


def test_public_names_resolve():
    for name in pteenet.__all__:
        assert getattr(pteenet, name) is not None, name


def test_runtime_imports_without_torch():
    code = "import sys, pteenet.runtime; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
