"""Batch-1 timing: the mean is an image's expected time, not hostage to one stalled call."""

from __future__ import annotations

import itertools

import torch

from pteenet.benchmark._wall_clock import LATENCY_BLOCK, LATENCY_REPEATS, batch1_latency


class _Clock:
    """Every call takes 1 ms, except the ``stall``-th, which the OS preempted for 300 ms."""

    def __init__(self, stall: int) -> None:
        self.calls, self.stall = 0, stall

    def __call__(self, fn, x: torch.Tensor) -> float:
        fn(x)
        self.calls += 1
        return 0.3 if self.calls == self.stall else 0.001


def test_one_stalled_call_does_not_move_the_mean() -> None:
    images = torch.zeros(20, 3, 4, 4)
    ran: list[int] = []
    clock = _Clock(stall=10)
    lat = batch1_latency({"model": lambda x: ran.append(len(x))}, images, 20, clock)
    # + three warm-up calls, and one untimed call as each block of images starts
    assert clock.calls == 20 * LATENCY_REPEATS and len(ran) == 3 + clock.calls + LATENCY_REPEATS
    # a plain mean over the 60 calls would be 6 ms; each image's median drops the stall
    assert lat["model"]["mean_ms"] == 1.0 and lat["model"]["median_ms"] == 1.0
    assert lat["model"]["p10_ms"] <= lat["model"]["median_ms"] <= lat["model"]["p90_ms"]


def test_models_take_turns_in_blocks_of_images_in_rotating_order() -> None:
    images = torch.zeros(LATENCY_BLOCK + 5, 3, 4, 4)
    ran: list[str] = []
    models = {name: (lambda x, n=name: ran.append(n)) for name in ("a", "b", "c")}
    batch1_latency(models, images, len(images), lambda fn, x: fn(x) or 0.001)
    timed = ran[3 * 3:]  # after each model's three warm-up calls
    runs = [(name, len(list(group))) for name, group in itertools.groupby(timed)]
    # each model streams a block of images (not one call each, the first untimed), and who
    # goes first rotates
    blocks = [("a", LATENCY_BLOCK + 1), ("b", LATENCY_BLOCK + 1), ("c", LATENCY_BLOCK + 1)]
    assert runs[:3] == blocks
    assert runs[3:6] == [("b", 6), ("c", 6), ("a", 6)]
    assert len(timed) == 3 * (len(images) + 2) * LATENCY_REPEATS
