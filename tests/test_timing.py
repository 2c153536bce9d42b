"""Batch-1 timing: the mean is an image's expected time, not hostage to one stalled call."""

from __future__ import annotations

import time

import torch

from pteenet.timing import LATENCY_REPEATS, Clock, _latency


class _Stalls:
    """A 'model' that takes ~1 ms a call, except one call that stalls as a preempted one does."""

    def __init__(self, stall_at: int, stall_s: float) -> None:
        self.calls, self.stall_at, self.stall_s = 0, stall_at, stall_s

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(self.stall_s if self.calls == self.stall_at else 0.001)
        return x


def test_one_stalled_call_does_not_move_the_mean() -> None:
    images = torch.zeros(20, 3, 4, 4)
    steady, stalls = _Stalls(stall_at=-1, stall_s=0), _Stalls(stall_at=10, stall_s=0.3)
    lat = _latency({"steady": steady, "stalls": stalls}, images, 20, Clock(torch.device("cpu")))
    assert stalls.calls == 3 + 20 * LATENCY_REPEATS  # warm-up, then every image thrice
    # a plain mean over the 60 calls would be ~6 ms; each image's median ignores the stall
    assert lat["stalls"]["mean_ms"] < lat["steady"]["mean_ms"] + 1.0
    for v in lat.values():
        assert v["p10_ms"] <= v["median_ms"] <= v["p90_ms"]
