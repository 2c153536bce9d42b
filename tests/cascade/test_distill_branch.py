"""The ``distill`` branch: a cut's pooled features mapped into the backbone's pre-logit space and
answered through its own frozen classifier, which the bundle never stores."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from pteenet.backbone import create_backbone
from pteenet.bundle import BRANCHES_FILE, load, read_info
from pteenet.cascade import build_early_exit
from pteenet.cascade._branches import FrozenHead
from pteenet.errors import OptionError
from pteenet.graph import trace_backbone
from pteenet.graph._head import find_head
from pteenet.jobs import attach
from pteenet.training import TrainConfig
from pteenet.training._losses import feature_per_sample


@pytest.fixture(scope="module")
def bundle(tiny, tmp_path_factory):
    data, ckpt = tiny
    out = tmp_path_factory.mktemp("distill")
    result = attach("resnet20", data, checkpoint=ckpt, num_classes=3, branches=2,
                    branch="distill", out=out, config=TrainConfig(epochs=6, batch_size=16),
                    progress=False)
    return out, ckpt, result


def test_the_head_is_the_backbones_linear_classifier(tiny):
    bb = create_backbone("resnet20", checkpoint=tiny[1], num_classes=3)
    head = find_head(trace_backbone(bb.model, (32, 32), with_thop=False))
    assert head is not None and head.weight is bb.model.linear.weight
    assert (head.num_classes, head.dim) == (3, 64)


def test_a_model_without_a_linear_head_has_none_and_distill_is_refused():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 3, 1), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten())
    trace = trace_backbone(net, (16, 16), with_thop=False)
    assert find_head(trace) is None
    with pytest.raises(OptionError, match="linear classifier"):
        build_early_exit(trace, [trace.cuts[0].name], 3, "distill")


def test_branches_answer_through_the_frozen_classifier_and_train_only_their_own_layer(
        tiny):
    bb = create_backbone("resnet20", checkpoint=tiny[1], num_classes=3)
    trace = trace_backbone(bb.model, (32, 32), with_thop=False)
    ee = build_early_exit(trace, ["layer2.0", "layer3.0"], 3, "distill")
    for b in ee.branches:
        assert isinstance(b.classifier, FrozenHead)
        assert b.classifier.weight.data_ptr() == bb.model.linear.weight.data_ptr()
        assert not any(n.startswith("classifier") for n, _ in b.named_parameters())
        assert not any(k.startswith("classifier") for k in b.state_dict())
    x = torch.randn(4, 3, 32, 32)
    feats, final, pre = ee.reduced_features(x, pre_logits=True)
    with torch.no_grad():
        assert torch.allclose(final, bb.model.eval()(x), atol=1e-5)
    assert pre.shape == (4, 64)
    loss = feature_per_sample(ee.branches, feats, pre)
    assert loss.shape == (4,) and bool((loss > 0).all())


def test_attach_trains_them_and_the_bundle_stores_no_classifier(bundle):
    out, _, result = bundle
    info = read_info(out)
    assert [b["type"] for b in info.branches] == ["distill", "distill"]
    losses = info.training["losses"]
    assert losses[-1] < losses[0]
    stored = load_file(str(out / BRANCHES_FILE))
    assert stored and not any(".classifier." in k for k in stored)
    assert max(result.report.agreement) > 0.5  # chance is 1/3


def test_a_loaded_bundle_rebinds_the_backbones_classifier_and_answers_as_trained(bundle):
    out, ckpt, result = bundle
    model = load(out)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        ref = [b.classify(h) for b, h in zip(result.model.eval().branches,
                                              result.model.features(x)[0])]
        got = [b.classify(h) for b, h in zip(model.branches, model.features(x)[0])]
    for a, b in zip(ref, got):
        assert torch.allclose(a, b, atol=1e-5)
    head = model.branches[0].classifier
    assert torch.equal(head.weight, create_backbone("resnet20", checkpoint=ckpt,
                                                    num_classes=3).model.linear.weight)


def test_the_exported_cascade_includes_the_classifier_and_agrees(bundle, tmp_path):
    pytest.importorskip("onnxruntime")
    from pteenet.exporter import export
    from pteenet.runtime import Cascade

    out, _, _ = bundle
    folder = export(out, format="onnx", out=tmp_path / "onnx")
    cascade = Cascade.open(folder)
    model = load(out)
    x = torch.randn(5, 3, 32, 32)
    preds, exits = cascade(x.numpy())
    res = model(x)
    assert (torch.as_tensor(preds) == res.preds).float().mean() >= 0.8


def test_auto_is_distill_on_an_imagenet_sized_head_and_mlp_on_a_small_one(tiny):
    small = create_backbone("resnet20", checkpoint=tiny[1], num_classes=3)
    wide = create_backbone("resnet20", num_classes=100, pretrained=False)
    for bb, kind in ((small, "mlp"), (wide, "distill")):
        trace = trace_backbone(bb.model, (32, 32), with_thop=False)
        ee = build_early_exit(trace, ["layer2.0"], bb.num_classes, "auto")
        assert isinstance(ee.branches[0].classifier, FrozenHead) == (kind == "distill")
        assert ee.pre_logits == (kind == "distill")
