"""The package reads as the pipeline: every import points down the stage order, never up.

The order is the README's Architecture list. An import of a later stage (even inside a
function, where it would hide a circle until run time) fails here, naming the file.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "pteenet"
#: Lowest first. ``runtime`` is torch-free, so it may only use the leaves before it.
ORDER = ["_face", "errors", "choices", "labels", "progress", "machine", "storage", "thresholds",
         "runtime", "backbone", "data", "graph", "cascade", "training", "bundle", "calibration",
         "exporter", "benchmark", "jobs", "demo"]


def _stage(module: str) -> str | None:
    """The stage a dotted module belongs to; "" for the package root, None outside it."""
    parts = module.split(".")
    return None if parts[0] != "pteenet" else (parts[1] if len(parts) > 1 else "")


def _imports(path: Path) -> list[str]:
    """Every module named by an import anywhere in ``path`` (function bodies included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(a.name for a in node.names)
    return found


def upward_imports(root: Path = ROOT) -> list[str]:
    """``file: stage -> later stage`` for each import against the order."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        own = path.relative_to(root).parts[0].removesuffix(".py")
        if own in ("__init__", "__main__"):
            continue
        for module in _imports(path):
            stage = _stage(module)
            if stage is None or stage == own:
                continue
            if stage == "":  # the root only for its version string
                if "__version__" not in path.read_text(encoding="utf-8"):
                    bad.append(f"{path.name}: {own} -> the package root")
            elif ORDER.index(stage) > ORDER.index(own):
                bad.append(f"{path.relative_to(root)}: {own} -> {stage}")
    return bad


def test_every_stage_is_in_the_order():
    stages = {p.name.removesuffix(".py") for p in ROOT.iterdir()
              if (p.suffix == ".py" or (p / "__init__.py").is_file())
              and p.name not in ("__init__.py", "__main__.py")}
    assert stages == set(ORDER)


def test_imports_point_down_the_pipeline():
    assert upward_imports() == []


def test_an_upward_import_is_caught(tmp_path):
    """Not vacuous: a training module that imports the bundle, inside a function, is seen."""
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "_x.py").write_text(
        "def f():\n    from pteenet.bundle import load\n    return load\n")
    assert upward_imports(tmp_path) == ["training/_x.py: training -> bundle"]


def module_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the pteenet modules it imports (a package import counts as its __init__)."""
    names = {".".join(("pteenet", *p.relative_to(root).with_suffix("").parts))
             .removesuffix(".__init__"): p for p in root.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in names and m != name and m != "pteenet"}
            for name, path in names.items() if name != "pteenet"}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``graph``, each as the path that closes it."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_circle_between_modules():
    graph = module_graph()
    assert len(graph) > 40 and circles(graph) == []
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_each_stage_imports_first_thing():
    """The heaviest stage imported first in a fresh interpreter pulls in every other cleanly."""
    code = "import pteenet.demo, pteenet.jobs, pteenet.exporter, pteenet.benchmark"
    subprocess.run([sys.executable, "-c", code], check=True)
