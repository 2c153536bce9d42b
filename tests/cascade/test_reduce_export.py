"""The branch reduction exports to ONNX for every map size, with the numbers eager PyTorch gives,
and an export that fails is reported as an export error."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from pteenet.cascade import Reduce
from pteenet.cascade._pooling import grid_pool, sliced_pool
from pteenet.errors import ExportError

ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("h,w", [(1, 1), (3, 5), (7, 7), (6, 9), (13, 11), (8, 8), (14, 14)])
@pytest.mark.parametrize("s", [1, 2, 3, 4])
def test_sliced_pooling_is_adaptive_pooling(h, w, s):
    x = torch.randn(2, 5, h, w, generator=torch.Generator().manual_seed(h * w + s))
    sh, sw = min(s, h), min(s, w)
    torch.testing.assert_close(sliced_pool(x, sh, sw, "mean"), nn.functional.adaptive_avg_pool2d(
        x, (sh, sw)), rtol=1e-6, atol=1e-6)
    want = nn.functional.adaptive_max_pool2d(x, (sh, sw))
    assert torch.equal(sliced_pool(x, sh, sw, "amax"), want)


def _onnx(module: nn.Module, x: torch.Tensor) -> np.ndarray:
    buf = io.BytesIO()
    torch.onnx.export(module, (x,), buf, input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                      opset_version=17, dynamo=False)
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.numpy()})[0]


@pytest.mark.parametrize("shape,layout", [((16, 7, 7), "chw"), ((8, 10, 6), "chw"),
                                          ((7, 7, 16), "hwc"), ((197, 12), "tc"),
                                          ((49, 12), "tc"), ((30, 12), "tc")])
def test_every_map_size_exports_with_the_same_numbers(shape, layout):
    """7x7 to 4x4 is the size the ONNX exporter refused (MobileNetV3, Swin, SqueezeNet); the
    graph is checked on a batch other than the one it was exported with."""
    reduce = Reduce(4, layout=layout).eval()
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reduce(x)
    assert tuple(want.shape[1:]) == reduce.out_shape(shape)
    got = _onnx(reduce, torch.randn(2, *shape))  # exported at batch 2 ...
    assert got.shape[1:] == want.shape[1:]
    np.testing.assert_allclose(_onnx(reduce, x), want.numpy(), rtol=1e-5, atol=1e-6)  # ... run at 3


def test_the_export_path_is_taken_only_while_exporting(monkeypatch):
    x = torch.randn(1, 3, 7, 7)
    eager = torch.cat(grid_pool(x, 4, 4), 1)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    torch.testing.assert_close(torch.cat(grid_pool(x, 4, 4), 1), eager, rtol=1e-6, atol=1e-6)


def test_an_export_failure_is_an_export_error(monkeypatch, tmp_path):
    """Not "bad option": the message names the graph and the other format; exit code 6."""
    from pteenet_cli._errors import describe

    from pteenet.exporter import _export

    def broken(*args, **kwargs):
        raise RuntimeError("Unsupported: ONNX export of operator frobnicate")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(ExportError, match="cannot export branch 0 as onnx") as info, \
            _export._writing(tmp_path / "branch_0.onnx", "onnx", "branch 0"):
        torch.onnx.export()
    line, code = describe(info.value)
    assert line.startswith("error (export): cannot export branch 0") and code == 6
    assert not (tmp_path / "branch_0.onnx").exists()


def test_writing_onnx_shows_the_user_none_of_torchs_exporter_warnings(tmp_path):
    """A strided slice (CIFAR ResNets' shortcut) makes torch's exporter warn about constant
    folding at every bench; nothing of it concerns the graph written."""
    from pteenet.cascade._onnx import save_onnx

    class Strided(nn.Module):
        def forward(self, x):
            return x[:, :, ::2, ::2] * 2

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        save_onnx(Strided(), (torch.randn(1, 3, 8, 8),), tmp_path / "m.onnx", ["input"],
                  ["output"])
    assert [str(w.message)[:80] for w in seen] == []
    assert _onnx_file(tmp_path / "m.onnx", np.ones((2, 3, 8, 8), np.float32)).shape == (2, 3, 4, 4)


def _onnx_file(path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]
