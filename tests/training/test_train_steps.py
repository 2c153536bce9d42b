"""One optimiser step of the branches: Adam fused where torch has it, the same step as plain."""

from __future__ import annotations

import torch
from torch import nn

from pteenet.training import adam


def _three_steps(fused: bool) -> tuple[torch.optim.Adam, list[torch.Tensor]]:
    torch.manual_seed(0)
    head = nn.Linear(16, 10)
    x, y = torch.randn(32, 16), torch.randint(0, 10, (32,))
    opt = adam(head.parameters(), 1e-2) if fused else torch.optim.Adam(head.parameters(), 1e-2)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(head(x), y).backward()
        opt.step()
    return opt, [p.detach() for p in head.parameters()]


def test_cpu_adam_is_fused_and_takes_the_plain_adam_step():
    fused, got = _three_steps(True)
    plain, want = _three_steps(False)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
