"""timm's own fx registries are the tracer's leaves: a module or function timm marks as not
traceable is kept whole, so the model traces without ``cuts`` (issue 16)."""

from __future__ import annotations

import torch
from timm.layers import register_notrace_function, register_notrace_module
from torch import nn

from pteenet.graph import trace_backbone


@register_notrace_module
class DataDependentGate(nn.Module):
    """fx cannot trace a branch on a tensor's value; timm's registry says to keep it whole."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


@register_notrace_function
def data_dependent_scale(x: torch.Tensor) -> torch.Tensor:
    return x * 2 if x.mean() > 0 else x


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = DataDependentGate()
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gate(self.stem(x))
        x = self.body(data_dependent_scale(x))
        return self.head(x.mean((2, 3)))


def test_timm_registered_module_and_function_are_leaves():
    net = Net().eval()
    trace = trace_backbone(net, (16, 16), with_thop=False)
    ops = {n.op: n for n in trace.graph_module.graph.nodes if n.op != "placeholder"}
    assert any(n.op == "call_module" and n.target == "gate"
               for n in trace.graph_module.graph.nodes)
    assert any(n.op == "call_function" and n.target is data_dependent_scale
               for n in trace.graph_module.graph.nodes), ops
    names = [c.name for c in trace.cuts]
    assert "gate" in names and "body" in names
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(trace.graph_module(x), net(x))
