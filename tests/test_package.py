"""The package's public surface: lazy names resolve, and the runtime needs no torch."""

from __future__ import annotations

import subprocess
import sys

import pteenet


def test_public_names_resolve():
    """Every public name is the very object its home module defines (what the README's API
    section and ``from pteenet import X`` promise), not merely something non-None."""
    import importlib
    for name, module in pteenet._LAZY.items():
        home = importlib.import_module(f"pteenet.{module}")
        obj = getattr(pteenet, name)
        assert obj is getattr(home, name), name
        assert getattr(obj, "__module__", home.__name__) == home.__name__, name
    assert set(pteenet.__all__) == {*pteenet._LAZY, "thresholds"}
    assert pteenet.thresholds is importlib.import_module("pteenet.thresholds")


def test_runtime_imports_without_torch():
    code = "import sys, pteenet.runtime; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
