"""``pteenet --help`` and every ``pteenet CMD --help`` print without importing torch (issue 31,
item 2; the wall times are ``benchmarks/cli_startup.py``'s, never asserted here)."""
from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
from pteenet_cli.app import app
names = [c.name or c.callback.__name__ for c in app.registered_commands]
assert "predict" in names, names
for args in [["--help"], *([n, "--help"] for n in names)]:
    try:
        app(args)
    except SystemExit as e:
        assert not e.code, (args, e.code)
    assert "torch" not in sys.modules, f"pteenet {' '.join(args)} imported torch"
print(len(names))
"""


def test_every_help_leaves_torch_out():
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.strip().splitlines()[-1]) >= 7  # inspect ... predict, export, demo


def test_the_check_sees_an_import():
    """Not vacuous: a help that pulled torch in would be caught."""
    code = CODE.replace("import sys\n", "import sys\nimport pteenet.data._datasets\n", 1)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "imported torch" in r.stderr
