"""The package's public surface: lazy names resolve, and the runtime needs no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

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


ROOT = Path(pteenet.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    """The absolute names of the modules ``path`` imports, relative imports resolved."""
    package = ["pteenet", *path.relative_to(ROOT).parent.parts]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            stem = ".".join([*base, *([node.module] if node.module else [])])
            found.add(stem)
            found.update(f"{stem}.{a.name}" for a in node.names)
    return found


def test_the_core_does_not_import_the_demo():
    """The demo sits at the edge (it uses the library as a user would): a core module that
    imported it would pull scikit-learn and the digits into every ``import pteenet``."""
    core = [p for p in ROOT.rglob("*.py") if "demo" not in p.relative_to(ROOT).parts]
    assert len(core) > 30
    for path in core:
        bad = {m for m in _imported_modules(path) if m == "pteenet.demo"
               or m.startswith("pteenet.demo.")}
        assert not bad, (path, bad)


def test_every_subpackage_is_installed():
    """pyproject lists its packages by hand; a subpackage left out works in an editable
    install and is missing from the wheel."""
    tomllib = pytest.importorskip("tomllib")
    setup = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(["pteenet", *p.parent.relative_to(ROOT).parts])
             for p in ROOT.rglob("__init__.py")}
    assert set(setup["packages"]) == found | {"pteenet_cli"}


def test_the_way_in_is_public():
    """The issue's API: every step a user takes is one name on the package root."""
    assert {"attach", "calibrate", "load", "bench", "export", "inspect",
            "list_backbones"} <= set(pteenet.__all__)


def test_list_backbones_filters_by_pattern_and_source():
    from pteenet.backbone import CIFAR_DEPTHS, resolve_name
    from pteenet.errors import ModelNotFoundError

    cifar = pteenet.list_backbones(source="cifar")
    assert cifar == sorted(f"cifar:{n}" for n in CIFAR_DEPTHS)
    mobile = pteenet.list_backbones("*mobilenetv3*")
    assert mobile and all("mobilenetv3" in n for n in mobile)
    assert {n.split(":")[0] for n in mobile} == {"timm"}
    for name in (*cifar[:2], *mobile[:2], pteenet.list_backbones(source="torchvision")[0]):
        assert ":".join(resolve_name(name)) == name
    with pytest.raises(ModelNotFoundError, match="unknown model source"):
        pteenet.list_backbones(source="hub")
