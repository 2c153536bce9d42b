"""scikit-learn (the demo) and matplotlib (the sweep plot) are extras, not requirements: the
core installs without them, what needs them says so in one line before any work, and the
README's set-up line (which CI runs) installs them for the demo (issue 31, item 5)."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from pteenet.errors import OptionError
from tests._helpers import fails_cleanly

ROOT = Path(__file__).resolve().parents[2]


def _missing(monkeypatch, name: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda mod, *a: None if mod == name else real(mod, *a))


def test_the_core_requires_neither():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    assert "scikit-learn" not in core and "matplotlib" not in core
    extras = project["optional-dependencies"]
    assert any(d.startswith("scikit-learn") for d in extras["demo"])
    assert any(d.startswith("matplotlib") for d in extras["demo"])
    assert any(d.startswith("matplotlib") for d in extras["plot"])


def test_readme_and_ci_install_the_same_extras_with_the_demos():
    line = re.compile(r'pip install -e "\.\[([a-z,]+)\]"')
    readme = line.findall((ROOT / "README.md").read_text())
    ci = line.findall((ROOT / ".ci" / "run").read_text())
    assert ci and readme and set(readme) == set(ci)
    assert {"test", "demo"} <= set(ci[0].split(","))


def test_the_demo_without_scikit_learn_is_one_line(monkeypatch, invoke, tmp_path):
    _missing(monkeypatch, "sklearn")
    line = fails_cleanly(invoke("demo", "--quick", "--out", tmp_path / "d", "--workdir",
                                tmp_path / "w"))
    assert 'pip install "pteenet[demo]"' in line and "scikit-learn" in line
    assert not (tmp_path / "w").exists()  # refused before any work


def test_a_sweep_without_matplotlib_is_refused_before_measuring(monkeypatch, shared):
    from pteenet.benchmark import bench

    _missing(monkeypatch, "matplotlib")
    with pytest.raises(OptionError, match=r'pteenet\[plot\]'):
        bench(shared[2], sweep=True, out_json=False)
