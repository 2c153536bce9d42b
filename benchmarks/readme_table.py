"""Regenerate README.md's benchmark table from benchmarks/results/cifar-resnet.json.

The README's figures are never typed by hand: this script rewrites the part between the
``<!-- bench:start -->`` and ``<!-- bench:end -->`` markers.

    python benchmarks/readme_table.py
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "cifar-resnet.json"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
ROWS = [("default", "attach (mincost, 1 pt)", "pteenet defaults: `attach` then nothing else"),
        ("default", "mincost", "`calibrate --max-drop D`"),
        ("default", "risk (wsr, delta 0.1)", "`calibrate --risk` (certified, 90 %)"),
        ("default", "cpm (margin 0.02)", "`calibrate --cpm` (BTS-EE)"),
        ("default", "bench --threshold 0.5", "`bench --threshold 0.5`"),
        ("sdn-baseline", "global softmax", "SDN baseline (same run)")]


def table(doc: dict) -> str:
    lines = [f"Command: `{doc['command']}` (figures from `benchmarks/results/cifar-resnet.json`; "
             "thresholds chosen on held-out training images, scored on the shared test images)",
             "", "| backbone | configuration | allowed drop | test drop (pt) | relative FLOPs |",
             "|---|---|---|---|---|"]
    for r in doc["rows"]:
        label = next((text for cfg, rule, text in ROWS
                      if r["config"] == cfg and r["rule"] == rule), None)
        if label is None:
            continue
        drop = "" if r["target_drop"] is None else f"{100 * r['target_drop']:.1f} pt"
        lines.append(f"| {r['backbone']} | {label} | {drop} | {100 * r['drop']:.2f} | "
                     f"{r['relative_flops']:.3f} |")
    lines += ["", "Wall clock of the default bundles against the **fastest way to run the plain "
              "backbone** on this 2-core CPU (the fastest of eager torch, its frozen segments in "
              "a row and onnxruntime, timed taking turns in the same process; the load average "
              "shows how busy the machine was), and beside it against the eager backbone:", ""]
    for r in doc["rows"]:
        if "timing" in r:
            t = r["timing"]
            sp = t["speedup"]
            lines.append(f"- {r['backbone']}: vs the fastest plain runtime batch 1 (mean) "
                         f"x{sp['latency_vs_fastest']:.2f} ({sp['fastest_latency_runtime']}), "
                         f"batch 256 x{sp['throughput_vs_fastest']:.2f} "
                         f"({sp['fastest_throughput_runtime']}); FLOPs x{sp['flops']:.2f}; "
                         f"vs eager torch x{sp['latency']:.2f} / x{sp['throughput']:.2f}; "
                         f"load average {t['load_average']:.1f}; default attach "
                         f"{r['attach_s']:.0f} s on 45,000 images")
    return "\n".join(lines)


def main() -> None:
    doc = json.loads(RESULTS.read_text())
    readme = (ROOT / "README.md").read_text()
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    (ROOT / "README.md").write_text(f"{head}{START}\n{table(doc)}\n{END}{tail}")


if __name__ == "__main__":
    main()
