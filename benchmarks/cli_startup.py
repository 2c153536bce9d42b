"""How long ``pteenet --help`` and every ``pteenet CMD --help`` take, in a fresh process each.

The target (issue 31): under 1 s on an idle 2-core machine, which needs the CLI to print its help
without importing torch (``tests/e2e/test_cli_help.py`` checks that part; the times are measured
here, never asserted). Each command runs ``--repeats`` times as ``python -m pteenet ...`` and
the median wall time counts; the load average is recorded beside it, since a busy machine makes
every start slower.

    python benchmarks/cli_startup.py [--repeats 5]

writes ``benchmarks/results/cli-startup.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def commands() -> list[list[str]]:
    """``--help`` of the root and of every registered command."""
    from pteenet_cli.app import app  # torch-free: the command list only

    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    return [["--help"], *([n, "--help"] for n in names)]


def wall(args: list[str], repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "pteenet", *args], capture_output=True,
                           text=True, timeout=300)
        times.append(time.perf_counter() - t)
        if r.returncode != 0:
            raise SystemExit(f"pteenet {' '.join(args)} failed: {r.stderr.strip()}")
    return statistics.median(times), times


def baseline(repeats: int) -> float:
    """A bare interpreter's start, the floor no CLI gets below."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    load = os.getloadavg()[0]
    rows = []
    for args in commands():
        median, times = wall(args, a.repeats)
        rows.append({"command": "pteenet " + " ".join(args), "median_s": round(median, 3),
                     "times_s": [round(t, 3) for t in times]})
        print(f"{rows[-1]['command']:<28} {median:.3f} s", flush=True)
    doc = {"python": sys.version.split()[0], "cores": os.cpu_count(), "repeats": a.repeats,
           "load_average_before": round(load, 2), "load_average_after":
           round(os.getloadavg()[0], 2), "bare_python_s": round(baseline(a.repeats), 3),
           "commands": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "cli-startup.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"`python benchmarks/cli_startup.py --repeats {a.repeats}` ({doc['cores']} cores, "
             f"load average {doc['load_average_before']} before, {doc['load_average_after']} "
             f"after; a bare `python -c pass` takes {doc['bare_python_s']:.3f} s)", "",
             "| command | median wall time (s) |", "|---|---|"]
    lines += [f"| `{r['command']}` | {r['median_s']:.3f} |" for r in rows]
    (a.out / "cli-startup.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
