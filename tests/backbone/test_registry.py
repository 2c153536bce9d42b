"""Backbones: names, sizes, freezing, checkpoint files (good, bad and malicious), offline use and
the real pretrained CIFAR ResNets from ../shared."""

from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pteenet.backbone import cifar_resnet, create_backbone, load_state_dict_file, resolve_name
from pteenet.backbone._registry import CIFAR_PREPROCESS
from pteenet.errors import CheckpointError, ModelNotFoundError, OfflineError, PteenetError
from pteenet.graph import trace_backbone
from tests._helpers import block_network


def _randomised_state(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Give every float tensor of ``model`` (BN statistics included) random values, so a load
    that skipped anything would change the output; returns the state dict."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def source_model() -> torch.nn.Module:
    """A resnet20 with every tensor random, in eval mode: the model the checkpoints come from."""
    model = cifar_resnet("resnet20")
    _randomised_state(model)
    return model.eval()


@pytest.fixture(scope="module")
def probe() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, f"error message is not one line: {text!r}"
    return text


def _block_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Every connection attempt fails at once, and the torch hub cache is an empty temp dir."""
    block_network(monkeypatch)
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setattr(torch.hub, "_hub_dir", torch.hub.get_dir())  # restored after the test
    torch.hub.set_dir(str(hub))
    return hub


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("name", "params", "macs"),
    [("resnet20", 0.27e6, 41e6), ("resnet56", 0.85e6, 125e6), ("resnet110", 1.7e6, 253e6)],
)
def test_cifar_family_matches_published_params_and_macs(name, params, macs):
    bb = create_backbone(name)
    trace = trace_backbone(bb.model, (32, 32), with_thop=False)
    n_params = sum(p.numel() for p in bb.model.parameters())
    assert trace.total_params == n_params
    assert n_params == pytest.approx(params, rel=0.02)
    assert trace.total_flops / 2 == pytest.approx(macs, rel=0.02)
    assert bb.num_classes == 10
    assert bb.preprocess.input_size == (32, 32)


def test_torchvision_resnet18_macs_at_224():
    bb = create_backbone("torchvision:resnet18")
    assert (bb.source, bb.name, bb.num_classes) == ("torchvision", "resnet18", 1000)
    assert bb.preprocess.input_size == (224, 224)
    trace = trace_backbone(bb.model, (224, 224), with_thop=False)
    assert trace.total_flops / 2 == pytest.approx(1.82e9, rel=0.02)
    assert trace.total_params == pytest.approx(11.69e6, rel=0.01)


def test_thop_leaves_no_buffers_and_agrees_with_our_count():
    model = cifar_resnet("resnet20").eval()
    keys_before = set(model.state_dict())
    trace = trace_backbone(model, (32, 32))
    keys_after = set(model.state_dict())
    assert keys_after == keys_before
    assert not any("total_ops" in k or "total_params" in k for k in keys_after)
    assert not any(hasattr(m, "total_ops") for m in model.modules())
    assert isinstance(trace.thop_macs, int)
    assert trace.thop_macs == pytest.approx(trace.total_flops / 2, rel=0.05)


# --------------------------------------------------------------------------- names


def test_bare_cifar_name_resolves_to_builtin_family():
    assert resolve_name("resnet20") == ("cifar", "resnet20")
    bb = create_backbone("resnet20")
    assert (bb.source, bb.name, bb.full_name) == ("cifar", "resnet20", "cifar:resnet20")
    assert bb.preprocess == CIFAR_PREPROCESS


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("timm:resnet18", ("timm", "resnet18")),
        ("torchvision:resnet18", ("torchvision", "resnet18")),
        ("cifar:resnet56", ("cifar", "resnet56")),
        ("resnet18", ("timm", "resnet18")),  # not a CIFAR name: timm comes before torchvision
    ],
)
def test_prefixed_and_bare_names(name, expected):
    assert resolve_name(name) == expected


def test_bare_imagenet_name_builds_from_timm():
    bb = create_backbone("resnet18")
    assert bb.full_name == "timm:resnet18"
    assert bb.num_classes == 1000
    assert bb.model.__class__.__module__.startswith("timm.")


@pytest.mark.parametrize("name", ["resnt20", "cifar:resnt20"])
def test_unknown_name_suggests_closest(name):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_name(name)
    msg = _one_line(info.value)
    assert "resnet20" in msg
    assert name in msg


def test_unknown_source_prefix():
    with pytest.raises(ModelNotFoundError) as info:
        create_backbone("keras:resnet20")
    msg = _one_line(info.value)
    assert "keras" in msg
    for source in ("cifar", "timm", "torchvision"):
        assert source in msg


# --------------------------------------------------------------------------- frozen


def test_backbone_is_frozen_and_bn_statistics_never_move():
    bb = create_backbone("resnet20")
    model = bb.model
    assert all(not p.requires_grad for p in model.parameters())
    assert not model.training
    assert all(not m.training for m in model.modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}

    # What a careless training loop does: grad enabled, input that needs a gradient, backward.
    x = (torch.randn(8, 3, 32, 32) * 3 + 1).requires_grad_(True)
    for _ in range(3):
        out = model(x)
        out.square().mean().backward()
    assert x.grad is not None  # the graph flowed through the backbone ...
    assert all(p.grad is None for p in model.parameters())  # ... and left no gradients in it
    assert not model.training

    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed during forward passes"


# --------------------------------------------------------------------------- checkpoint formats


def _check_loads(path: Path, source_model, probe, **kwargs):
    bb = create_backbone("resnet20", checkpoint=path, **kwargs)
    with torch.no_grad():
        assert torch.equal(bb.model(probe), source_model(probe))
    assert bb.checkpoint == str(path)
    assert bb.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    return bb


def test_bare_state_dict_pt(tmp_path, source_model, probe):
    path = tmp_path / "weights.pt"
    torch.save(source_model.state_dict(), path)
    _check_loads(path, source_model, probe)


def test_nested_state_dict_with_dataparallel_prefix_th(tmp_path, source_model, probe):
    # Like the published CIFAR checkpoints: nested, "module." prefixes, extra entries and (as
    # saved before PyTorch 0.4.1) no BatchNorm step counters.
    sd = {f"module.{k}": v for k, v in source_model.state_dict().items()
          if not k.endswith("num_batches_tracked")}
    path = tmp_path / "resnet20.th"
    torch.save({"state_dict": sd, "best_prec1": 91.7, "epoch": 199}, path)
    _check_loads(path, source_model, probe)


def test_nested_model_with_compile_prefix(tmp_path, source_model, probe):
    sd = {f"_orig_mod.{k}": v for k, v in source_model.state_dict().items()}
    path = tmp_path / "ckpt.pth"
    torch.save({"model": sd, "epoch": 3, "lr": 0.1}, path)
    _check_loads(path, source_model, probe)


def test_safetensors(tmp_path, source_model, probe):
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source_model.state_dict().items()}, str(path))
    _check_loads(path, source_model, probe)


def test_missing_checkpoint(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError) as info:
        create_backbone("resnet20", checkpoint=path)
    msg = _one_line(info.value)
    assert str(path) in msg and "does not exist" in msg


def test_empty_checkpoint(tmp_path):
    path = tmp_path / "empty.pt"
    path.touch()
    with pytest.raises(CheckpointError) as info:
        create_backbone("resnet20", checkpoint=path)
    assert "empty" in _one_line(info.value)


def test_truncated_checkpoint(tmp_path, source_model):
    full = tmp_path / "full.pt"
    torch.save(source_model.state_dict(), full)
    data = full.read_bytes()
    path = tmp_path / "half.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        create_backbone("resnet20", checkpoint=path)
    msg = _one_line(info.value)
    assert str(path) in msg
    assert "truncated" in msg or "not a readable" in msg


def _random_bytes_file(tmp_path: Path) -> Path:
    path = tmp_path / "noise.pt"
    path.write_bytes(random.Random(0).randbytes(4096))
    return path


def test_random_bytes_checkpoint(tmp_path):
    path = _random_bytes_file(tmp_path)
    with pytest.raises(CheckpointError) as info:
        create_backbone("resnet20", checkpoint=path)
    assert str(path) in _one_line(info.value)


# pteenet/backbones.py load_state_dict_file reports every pickle.UnpicklingError as an unsafe
# pickle, also for a file that is merely not a checkpoint (torch's weights_only unpickler raises
# UnpicklingError("... Unsupported operand 205") for garbage). Remove the marker once fixed.
def test_random_bytes_are_not_called_unsafe(tmp_path):
    with pytest.raises(CheckpointError) as info:
        load_state_dict_file(_random_bytes_file(tmp_path))
    assert "could run code" not in str(info.value)


@pytest.mark.parametrize(("saved", "loaded", "word"),
                         [("resnet32", "resnet20", "unexpected"),
                          ("resnet20", "resnet32", "missing")])
def test_checkpoint_for_another_architecture(tmp_path, saved, loaded, word):
    path = tmp_path / f"{saved}.pt"
    torch.save(cifar_resnet(saved).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        create_backbone(loaded, checkpoint=path)
    msg = _one_line(info.value)
    assert f"{word} keys" in msg
    assert "layer1.3." in msg  # names a key resnet32 has and resnet20 lacks
    assert "architecture" in msg


def test_checkpoint_with_other_number_of_classes(tmp_path, probe):
    src = cifar_resnet("resnet20", num_classes=100)
    _randomised_state(src, seed=3)
    src.eval()
    path = tmp_path / "cifar100.pt"
    torch.save(src.state_dict(), path)

    with pytest.raises(CheckpointError) as info:  # a wrong explicit count is still refused
        create_backbone("resnet20", checkpoint=path, num_classes=10)
    assert "`num_classes` 100" in _one_line(info.value)

    inferred = create_backbone("resnet20", checkpoint=path)  # read from the classifier
    assert inferred.num_classes == 100 and "`num_classes` 100" in inferred.notes[0]
    bb = create_backbone("resnet20", checkpoint=path, num_classes=100)
    assert bb.num_classes == 100 and bb.notes == []
    with torch.no_grad():
        out = bb.model(probe)
        assert out.shape == (4, 100)
        assert torch.equal(out, src(probe))


class _MakesMarker:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for any code a pickle can run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, source_model):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": source_model.state_dict(), "payload": _MakesMarker(marker)}, path)
    assert not marker.exists()

    for load in (lambda: load_state_dict_file(path),
                 lambda: create_backbone("resnet20", checkpoint=path)):
        with pytest.raises(CheckpointError) as info:
            load()
        msg = _one_line(info.value)
        assert "weights_only" in msg
        assert "refused" in msg
        assert not marker.exists()


# --------------------------------------------------------------------------- offline


def test_pretrained_offline_fails_fast_and_says_to_pass_checkpoint(monkeypatch, tmp_path):
    hub = _block_network(monkeypatch, tmp_path)
    start = time.monotonic()
    with pytest.raises(OfflineError) as info:
        create_backbone("resnet20", pretrained=True)
    assert time.monotonic() - start < 10
    msg = _one_line(info.value)
    assert "pass `checkpoint`" in msg
    assert "cifar:resnet20" in msg
    assert not [p for p in hub.rglob("*") if p.is_file()]  # no partial download left behind


def test_torchvision_pretrained_offline(monkeypatch, tmp_path):
    _block_network(monkeypatch, tmp_path)
    with pytest.raises(OfflineError) as info:
        create_backbone("torchvision:resnet18", pretrained=True)
    assert "pass `checkpoint`" in _one_line(info.value)


def test_checkpoint_wins_over_pretrained_offline(monkeypatch, tmp_path, source_model, probe):
    _block_network(monkeypatch, tmp_path)
    path = tmp_path / "w.pt"
    torch.save(source_model.state_dict(), path)
    _check_loads(path, source_model, probe, pretrained=True)


def test_errors_are_pteenet_errors(monkeypatch, tmp_path):
    """What each failure really raises is ours (the CLI turns PteenetError into one line)."""
    bad = tmp_path / "bad.th"
    bad.write_bytes(b"not a checkpoint")
    _block_network(monkeypatch, tmp_path)
    cases = [(ModelNotFoundError, lambda: create_backbone("resnet20x")),
             (CheckpointError, lambda: create_backbone("resnet20", checkpoint=bad)),
             (OfflineError, lambda: create_backbone("resnet20", pretrained=True))]
    for kind, call in cases:
        with pytest.raises(PteenetError) as info:
            call()
        assert type(info.value) is kind, (kind, info.value)


# --------------------------------------------------------------------------- real weights

# name, file, top-1 (%) on the 4,976 test.tar.gz images, from ../shared/README.md
SHARED_CHECKPOINTS = [
    ("resnet20", "resnet20-12fca82f.th", 81.57),
    ("resnet32", "resnet32-d509ac18.th", 82.40),
    ("resnet44", "resnet44-014dd654.th", 82.82),
]


@pytest.fixture(scope="module")
def cifar_test_images(cifar_test_dir):
    """All test images, preprocessed once with the CIFAR preprocessing (shared by the three)."""
    from pteenet.data import make_loader, open_data

    data = open_data(cifar_test_dir, CIFAR_PREPROCESS)
    images, labels = [], []
    for batch in make_loader(data, batch_size=500):
        assert batch.skipped == 0
        images.append(batch.images)
        labels.append(batch.labels)
    images, labels = torch.cat(images), torch.cat(labels)
    assert len(labels) == 4976
    return images, labels


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize(("name", "file", "top1"), SHARED_CHECKPOINTS)
def test_shared_pretrained_checkpoint_accuracy(shared_dir, cifar_test_images, name, file, top1):
    path = shared_dir / "weights" / "cifar-resnet" / file
    if not path.is_file():
        pytest.skip(f"{path} not found")
    bb = create_backbone(name, checkpoint=path)  # loads strictly or raises
    assert bb.checkpoint_sha256.startswith(file.split("-")[1].split(".")[0])
    assert bb.preprocess == CIFAR_PREPROCESS
    images, labels = cifar_test_images
    correct = 0
    with torch.inference_mode():
        for x, y in zip(images.split(500), labels.split(500)):
            correct += int((bb.model(x).argmax(1) == y).sum())
    assert 100 * correct / len(labels) == pytest.approx(top1, abs=0.3)
