"""``bench`` says which classes leave at which exit and which never leave early, and reports the
p95/p99 batch-1 latency beside the mean, on screen and in bench.json (issue 31, item 4)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from pteenet.benchmark import by_class


def test_top_classes_per_exit_and_the_ones_that_never_leave():
    exits = torch.tensor([0, 0, 0, 1, 2, 2, 2, 0])
    classes = torch.tensor([1, 1, 0, 0, 2, 2, 3, 3])
    res = by_class(exits, classes, 2, ["n01440764, tench", "goldfish", "shark", "eel"], "label",
                   top=2)
    first = res["per_exit"][0]
    assert first["name"] == "branch 0"
    assert first["top"][0] == {"class": "goldfish", "index": 1, "count": 2, "share_of_class": 1.0}
    assert first["top"][1]["class"] == "tench" and first["top"][1]["share_of_class"] == 0.5
    assert res["per_exit"][2]["name"] == "backbone"
    assert res["never_early"] == [{"class": "shark", "index": 2, "count": 2}]
    assert res["classes_seen"] == 4 and res["by"] == "label"
    panel = {row["class"]: row["shares"] for row in res["exit_shares"]}
    assert panel == {"tench": [0.5, 0.5, 0.0], "goldfish": [1.0, 0.0, 0.0],
                     "shark": [0.0, 0.0, 1.0], "eel": [0.5, 0.0, 0.5]}


def test_bench_reports_classes_and_tail_latency(shared, tmp_path, invoke):
    bundle = Path(shutil.copytree(shared[2], tmp_path / "b"))
    r = invoke("bench", "--bundle", bundle, "--latency-samples", "20", "--repeats", "1",
               "--no-profile", "--threshold", "0", "--quiet")
    assert r.exit_code == 0, r.output
    assert "batch-1 p95 (ms)" in r.stdout and "batch-1 p99 (ms)" in r.stdout
    assert "which classes leave where" in r.stdout
    doc = json.loads((bundle / "bench.json").read_text())
    lat = doc["timing"]["latency"]["early_exit"]
    assert lat["p90_ms"] <= lat["p95_ms"] <= lat["p99_ms"]
    rows = doc["by_class"]["per_exit"]
    assert len(rows) == doc["bundle"]["branches"] + 1
    named = {c["class"] for row in rows for c in row["top"]}
    assert named and named <= {"blue", "green", "red"}
    total = sum(c["count"] for row in rows for c in row["top"])
    assert total == doc["data"]["num_samples"]  # 3 classes, all within the top 5 per exit
