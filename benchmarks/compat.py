"""Which architectures pteenet handles end to end, with random weights (not run in CI).

Each backbone in ``benchmarks/compat_models.txt`` goes through :func:`pteenet.jobs.compat_row`:
trace, attach 4 exits (one epoch on 12 tiny images), load the bundle, export it to ONNX and run
the torch-free cascade against the Python model on 6 random images.

    OMP_NUM_THREADS=1 python benchmarks/compat.py [--only NAME ...]

writes ``benchmarks/results/compat.json`` and ``compat.md`` (the README's compatibility table).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pteenet.jobs import compat_row

HERE = Path(__file__).resolve().parent
LIST = HERE / "compat_models.txt"
RESULTS = HERE / "results"


def models() -> list[tuple[str, str]]:
    rows = [line.split() for line in LIST.read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    return [(r[0], r[1]) for r in rows]


def tiny_data(root: Path, per_class: int = 4) -> Path:
    """Three classes of noisy 48x48 images (resized to each model's input by its recipe)."""
    rng = np.random.default_rng(0)
    for c in range(3):
        d = root / f"c{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 120, (48, 48, 3))
            img[..., c] += 100
            Image.fromarray(img.clip(0, 255).astype("uint8")).save(d / f"{i}.png")
    return root


def table(rows: list[dict]) -> str:
    lines = ["| model | kind | result | useful cuts | exits (FLOP fraction) | layouts | "
             "costliest branch | GFLOPs | s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        result = "ok" if r["ok"] else f"fails at {r['stage']}: {r['error']}"
        exits = ", ".join(f"{e:.2f}" for e in r.get("exits", []))
        share = f"{r['max_branch']:.2%}" if "max_branch" in r else ""
        gflops = f"{r['gflops']:.2f}" if "gflops" in r else ""
        lines.append(f"| `{r['model']}` | {r['kind']} | {result.replace('|', '/')} | "
                     f"{r.get('cuts', '')} | {exits} | {', '.join(r.get('layouts', []))} | "
                     f"{share} | {gflops} | {r['seconds']:.0f} |")
    passed = sum(r["ok"] for r in rows)
    lines.append(f"\n{passed} of {len(rows)} pass end to end "
                 f"({passed / max(len(rows), 1):.0%}).")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="run only these models (results not written)")
    args = ap.parse_args()
    torch.manual_seed(0)
    todo = [(m, k) for m, k in models() if not args.only or m in args.only]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = tiny_data(Path(tmp) / "data")
        for i, (name, kind) in enumerate(todo):
            row = {**compat_row(name, data, Path(tmp) / f"b{i}"), "kind": kind}
            shutil.rmtree(Path(tmp) / f"b{i}", ignore_errors=True)  # exports of big models
            rows.append(row)
            print(("ok  " if row["ok"] else "FAIL") + f" {name} ({row['seconds']:.0f} s) "
                  f"{row['error'] or ''}", flush=True)
    if args.only:
        return
    RESULTS.mkdir(exist_ok=True)
    doc = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "date": time.strftime("%Y-%m-%d"), "rows": rows}
    (RESULTS / "compat.json").write_text(json.dumps(doc, indent=1))
    (RESULTS / "compat.md").write_text(table(rows))
    print(table(rows), file=sys.stderr)


if __name__ == "__main__":
    main()
