"""What else could make exits pay, on the same features: the variants issue 11 asked us to try.

On one real CIFAR ResNet (default: ResNet-44 from ../shared), the backbone runs once over a
seeded 45,000-image training subset (20 % held out, as ``attach`` does) and the test split;
then, from those cached features:

* **targets** -- the default branches trained on each target (``auto`` = half labels, half the
  backbone's softmax at T=4; ``hard`` pseudo-labels; ``soft``; ``labels``);
* **ZTW** -- geometric ensembling of the exits so far (Wołczyk et al. 2021, "Zero Time Waste"):
  exit k answers with ``sum_{j<=k} w_kj log softmax(z_j) + b_k``, fitted on one half of the
  held-out split by the library's own :func:`pteenet.cascade.fit_ztw` (what ``attach --ensemble
  ztw`` ships, on the same half); the cost search and the reported cost count every branch up to
  the last exit on, since the ensemble reads them;
* **learned policy** -- an exit policy fed by each exit's score statistics (EENet, Ilhan et al.
  2023): per exit, a logistic model of "this exit is right" on top probability, margin,
  entropy, agreement with the previous exit and its top probability, fitted on one half of the
  held-out split; its probability replaces the top softmax as the exit score;
* **softmax** -- the default: the top softmax probability.

Every row is calibrated by the default rule (:func:`pteenet.calibration.min_cost_thresholds`,
1 pt) on the second half of the held-out split and scored on ``test/``. Not run in CI.

    python benchmarks/exit_variants.py --model resnet44

writes ``benchmarks/results/exit-variants.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from pteenet.backbone._registry import create_backbone
from pteenet.calibration._cost_search import min_cost_thresholds
from pteenet.cascade import Cost, build_early_exit
from pteenet.cascade._ensemble import fit_split, fit_ztw
from pteenet.data import open_data, split_indices
from pteenet.graph._placement import choose_cuts
from pteenet.graph._tracing import trace_backbone
from pteenet.thresholds import as_table, summarize
from pteenet.training._config import TrainConfig
from pteenet.training._features import FeatureSet, compute_features
from pteenet.training._train import train_branches

sys.path.insert(0, str(Path(__file__).parent))
from cifar_resnet import CHECKPOINTS, SHARED, extract  # noqa: E402

TARGETS = ("auto", "hard", "soft", "labels")


@torch.no_grad()
def logits_of(ee, feats: FeatureSet) -> Tensor:
    """Every branch's logits on every sample: [N, B, K]."""
    ee.eval()
    out = []
    for pos in torch.arange(len(feats)).split(1024):
        part = feats.take(pos)
        out.append(torch.stack(ee.branch_outputs(part.feats)[0], 1))
    return torch.cat(out)


def stats(z: Tensor) -> Tensor:
    """Top probability, margin to the second, normalised entropy of each row of logits."""
    p = z.softmax(-1)
    top2 = p.topk(2, -1).values
    ent = -(p * p.clamp_min(1e-12).log()).sum(-1) / math.log(p.shape[-1])
    return torch.stack([top2[..., 0], top2[..., 0] - top2[..., 1], ent], -1)


def fit_logistic(x: Tensor, y: Tensor):
    """A standardised logistic regression fitted by L-BFGS; returns the predictor."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits((x - mu) / sd @ w + b, y)
        loss.backward()
        return loss

    opt.step(closure)
    return lambda v: torch.sigmoid((v - mu) / sd @ w + b).detach()


def policy_features(z: Tensor, k: int) -> Tensor:
    s = stats(z[:, k])
    if k == 0:
        prev = torch.zeros(len(z), 2)
    else:
        prev = torch.stack([(z[:, k].argmax(1) == z[:, k - 1].argmax(1)).float(),
                            stats(z[:, k - 1])[:, 0]], 1)
    return torch.cat([s, prev], 1)


def learned_scores(fit_z: Tensor, fit_labels: Tensor, zs: list[Tensor]) -> list[Tensor]:
    """EENet-style policy: per exit, P(exit is right | score statistics)."""
    out = [torch.zeros(z.shape[:2]) for z in zs]
    for k in range(fit_z.shape[1]):
        f = fit_logistic(policy_features(fit_z, k), (fit_z[:, k].argmax(1) == fit_labels).float())
        for o, z in zip(out, zs):
            o[:, k] = f(policy_features(z, k))
    return out


def ztw_logits(fit_z: Tensor, fit_labels: Tensor, zs: list[Tensor]) -> list[Tensor]:
    """ZTW's geometric ensemble as pteenet ships it: exit k's logits are a weighted sum of the
    log-softmaxes of exits <= k, fitted by :func:`pteenet.cascade._ensemble.fit_ztw`."""
    ens = fit_ztw(fit_z, fit_labels)
    return [torch.stack(ens.exit_logits(z.unbind(1)), 1) for z in zs]


def scored(scores: list[Tensor], preds: list[Tensor], finals: list[Tensor],
           labels: list[Tensor], cost: Cost) -> dict:
    """Thresholds by the default rule on the calibration half, scored on test; an ensemble's
    ``cost`` reads every branch up to the last exit on (searched and counted so)."""
    (s_cal, s_test), (p_cal, p_test) = scores, preds
    found = min_cost_thresholds(s_cal, p_cal, finals[0], cost, labels=labels[0], max_drop=0.01)
    thr = found.thresholds.float()
    cost = torch.tensor(cost.exits(thr <= 1), dtype=torch.float64)
    s = summarize(s_test, p_test, finals[1], as_table(thr, s_test.shape[1], 10), cost, labels[1])
    return {"test_drop_pt": round(100 * (s["backbone_accuracy"] - s["accuracy"]), 2),
            "test_relative_flops": round(s["mean_relative_flops"], 3),
            "cal_relative_flops": round(found.cost, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet44", choices=sorted(CHECKPOINTS))
    ap.add_argument("--max-train", type=int, default=45000)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (quality, not time)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = extract(Path(tmp))
        bb = create_backbone(args.model, checkpoint=SHARED / "weights" / "cifar-resnet" /
                             CHECKPOINTS[args.model])
        trace = trace_backbone(bb.model, bb.preprocess.input_size)
        names = choose_cuts(trace)
        config = TrainConfig()
        ee = build_early_exit(trace, names, bb.num_classes)
        train_ds = open_data(root, bb.preprocess, split="train")
        test_ds = open_data(root, bb.preprocess, split="test")
        g = torch.Generator().manual_seed(config.seed)
        pool = sorted(torch.randperm(len(train_ds), generator=g)[: args.max_train].tolist())
        tr_pos, held_pos = split_indices(len(pool), 0.2, config.seed)
        train = compute_features(ee, train_ds, [pool[i] for i in tr_pos])
        held = compute_features(ee, train_ds, [pool[i] for i in held_pos])
        test = compute_features(ee, test_ds, list(range(len(test_ds))))
    print(f"features: {time.perf_counter() - started:.0f}s", flush=True)
    # the halves attach --ensemble ztw uses: fit the ensemble on one, calibrate on the other
    fit, cal = (torch.tensor(p) for p in fit_split(len(held), config.seed))
    finals = [held.final[cal].argmax(1), test.final.argmax(1)]
    labels = [held.labels[cal], test.labels]
    flops = ee.cost_in("flops")
    rows = []

    def add(variant: str, z_cal: Tensor, z_test: Tensor, scores: list[Tensor] | None = None,
            reads_all: bool = False) -> None:
        sc = scores or [z_cal.softmax(-1).amax(-1), z_test.softmax(-1).amax(-1)]
        cost = replace(flops, chained=reads_all)
        rows.append({"variant": variant, **scored(sc, [z_cal.argmax(-1), z_test.argmax(-1)],
                                                  finals, labels, cost)})
        print(json.dumps(rows[-1]), flush=True)

    for target in TARGETS:
        ee = build_early_exit(trace, names, bb.num_classes)
        t = time.perf_counter()
        train_branches(ee, train, held, TrainConfig(target=target))
        z_held, z_test = logits_of(ee, held), logits_of(ee, test)
        add(f"target {target}", z_held[cal], z_test)
        rows[-1]["train_s"] = round(time.perf_counter() - t, 1)
        if target == "auto":
            y_fit = held.labels[fit]
            add("learned policy (EENet)", z_held[cal], z_test,
                learned_scores(z_held[fit], y_fit, [z_held[cal], z_test]))
            ens = ztw_logits(z_held[fit], y_fit, [z_held[cal], z_test])
            add("ZTW geometric ensemble", *ens, reads_all=True)
    write(rows, args)


def write(rows: list[dict], args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "exit-variants.json").write_text(json.dumps({"model": args.model, "rows": rows},
                                                       indent=1))
    lines = [f"# Exit variants on {args.model} (1 pt rule on held-out half, scored on test)", "",
             "| variant | test relative FLOPs | test drop (pt) | held-out relative FLOPs |",
             "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['test_relative_flops']} | {r['test_drop_pt']} | "
              f"{r['cal_relative_flops']} |" for r in rows]
    (out / "exit-variants.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
