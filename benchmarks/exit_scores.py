"""Exit scores under pteenet's own cost search: does another score than max softmax reach fewer
FLOPs at <= 1 pt on the CIFAR ResNets? (issue 28; not run in CI)

For each default bundle kept by ``cifar_resnet.py --keep``: every exit's logits, the backbone's
and the labels on the bundle's held-out split and on the shared test images; then, per score
(max softmax, margin p1 - p2, negative entropy, max softmax after a per-exit temperature fitted
on held-out, a per-exit logistic regression on the three fitted on half of held-out), thresholds
chosen by :func:`pteenet.calibration.min_cost_thresholds` on held-out (top-1 against labels, as
the default calibration) and applied unchanged on test. ``--boot`` redraws held-out with
replacement that many times (refitting what is fitted) to show the search's own noise. Needs
scikit-learn (the ``[demo]`` extra).

    python benchmarks/cifar_resnet.py --models resnet44 resnet20 resnet32 --keep /tmp/keep8
    python benchmarks/exit_scores.py --bundles /tmp/keep8 --boot 25

writes ``benchmarks/results/exit-scores.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import pteenet
from pteenet.bundle import read_bundle
from pteenet.calibration import min_cost_thresholds
from pteenet.data import open_data
from pteenet.thresholds import as_table, summarize
from pteenet.training import branch_logits, compute_features

sys.path.insert(0, str(Path(__file__).parent))
from cifar_resnet import extract  # noqa: E402

BASE, CTRL = "max softmax", "max softmax, half B (control)"
DROPS = (0.005, 0.01, 0.02)


def collect(bundle: Path, root: Path) -> dict:
    """Exit logits, backbone logits and labels on held-out and test; costs with every exit on."""
    b = read_bundle(bundle, thresholds=False)
    model = pteenet.load(bundle).eval()
    info, out = b.info, {}
    for part, split, idx in (("held", info.data.get("split", "train"),
                              list(info.calibration_indices)), ("test", "test", None)):
        ds = open_data(root, info.preprocess, split=split, label_names=info.classes,
                       labels=info.data.get("labels", "auto"))
        feats = compute_features(model, ds, list(range(len(ds))) if idx is None else idx,
                                 num_workers=0)
        out[part] = {"logits": branch_logits(model, feats), "final": feats.final.argmax(1),
                     "labels": feats.labels}
    out["cost"] = model.cost_in("flops")
    return out


def _stats(lg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per exit [N, B]: max softmax, margin p1 - p2, negative entropy scaled into [0, 1] (the
    cost search takes no negative thresholds; the order is entropy's)."""
    p = lg.float().softmax(-1)
    top2 = p.topk(2, -1).values
    ent = -(p * p.clamp_min(1e-30).log()).sum(-1)
    return top2[..., 0], top2[..., 0] - top2[..., 1], 1 - ent / math.log(p.shape[-1])


def _temperatures(lg: torch.Tensor, target: torch.Tensor) -> list[float]:
    """Per exit, the temperature minimising the NLL of the backbone's predictions."""
    temps = []
    for k in range(lg.shape[1]):
        z = lg[:, k].double()
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

        def closure(z=z, log_t=log_t, opt=opt) -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(z / log_t.exp(), target)
            loss.backward()
            return loss

        opt.step(closure)
        temps.append(float(log_t.detach().exp()))
    return temps


def _scores(r: dict, fit: torch.Tensor, seed: int) -> dict[str, tuple]:
    """name -> (held scores, test scores, held rows the search uses); fitted on rows ``fit``."""
    from sklearn.linear_model import LogisticRegression

    held, test = r["held"], r["test"]
    hs, ts = _stats(held["logits"]), _stats(test["logits"])
    temps = _temperatures(held["logits"][fit], held["final"][fit])
    scaled = [torch.stack([(d["logits"][:, k] / t).softmax(-1).amax(-1)
                           for k, t in enumerate(temps)], 1) for d in (held, test)]
    perm = fit[torch.randperm(len(fit), generator=torch.Generator().manual_seed(seed))]
    half_a, half_b = perm[:len(fit) // 2], perm[len(fit) // 2:]
    logit = [torch.zeros_like(hs[0]), torch.zeros_like(ts[0])]
    agree = held["logits"].argmax(-1) == held["final"][:, None]
    for k in range(hs[0].shape[1]):
        xh, xt = (np.stack([s[:, k] for s in st], 1).astype(np.float64) for st in (hs, ts))
        mu, sd = xh[half_a].mean(0), xh[half_a].std(0) + 1e-12
        clf = LogisticRegression(max_iter=1000).fit((xh[half_a] - mu) / sd, agree[half_a, k])
        for out, x in zip(logit, (xh, xt)):
            out[:, k] = torch.from_numpy(clf.predict_proba((x - mu) / sd)[:, 1]).float()
    return {BASE: (hs[0], ts[0], fit), "margin p1 - p2": (hs[1], ts[1], fit),
            "negative entropy": (hs[2], ts[2], fit),
            "temperature-scaled max softmax": (*scaled, fit), CTRL: (hs[0], ts[0], half_b),
            "logistic (fit on half A, thresholds on half B)": (*logit, half_b)}


def _score_table(r: dict, scores: torch.Tensor, part: str, thr: torch.Tensor
                 ) -> tuple[float, float]:
    """(top-1 drop in points, mean relative FLOPs) of per-exit thresholds on ``part``."""
    d, cost = r[part], r["cost"]
    preds = d["logits"].argmax(-1)
    table = as_table(thr.double(), preds.shape[1], d["logits"].shape[-1])
    s = summarize(scores.double(), preds, d["final"], table, cost.exits(thr <= 1), d["labels"])
    return 100 * (s["backbone_accuracy"] - s["accuracy"]), s["mean_relative_flops"]


def _search(r: dict, held: torch.Tensor, rows: torch.Tensor, drop: float) -> torch.Tensor:
    h = r["held"]
    return min_cost_thresholds(held[rows], h["logits"].argmax(-1)[rows], h["final"][rows],
                               r["cost"], labels=h["labels"][rows], max_drop=drop).thresholds


def run(r: dict, boot: int) -> dict:
    rows = []
    n = len(r["held"]["final"])
    for drop in DROPS:
        for name, (hs, ts, idx) in _scores(r, torch.arange(n), 0).items():
            thr = _search(r, hs, idx, drop)
            sub = {k: v[idx] for k, v in r["held"].items()}
            hd, hc = _score_table({**r, "held": sub}, hs[idx], "held", thr)
            td, tc = _score_table(r, ts, "test", thr)
            rows.append({"max_drop": drop, "score": name, "held_n": len(idx), "held_drop": hd,
                         "held_flops": hc, "test_drop": td, "test_flops": tc})
            print(json.dumps(rows[-1]), flush=True)
    resampled = []
    for i in range(boot):  # held-out redrawn with replacement, the test set fixed
        fit = torch.randint(0, n, (n,), generator=torch.Generator().manual_seed(1000 + i))
        resampled.append({name: _score_table(r, ts, "test", _search(r, hs, idx, 0.01))
                          for name, (hs, ts, idx) in _scores(r, fit, 1000 + i).items()})
    return {"rows": rows, "boot": resampled}


def markdown(doc: dict) -> list[str]:
    lines = ["# Exit scores under the cost search (CIFAR ResNets, default bundles)", "",
             f"Command: `{doc['command']}`", "",
             "Thresholds: `min_cost_thresholds` at max_drop 0.01 on the held-out split (top-1 "
             "against labels, every exit on offer), applied unchanged on test; Δ: test FLOPs "
             "against max softmax on the same held-out rows.", ""]
    for model, d in doc["models"].items():
        lines += [f"## {model}", "", "| score | held n | held-out drop (pt) | held-out FLOPs | "
                  "test drop (pt) | test FLOPs | Δ |", "|---|---|---|---|---|---|---|"]
        at = {x["score"]: x for x in d["rows"] if x["max_drop"] == 0.01}
        for name, x in at.items():
            ref = at[CTRL if x["held_n"] < at[BASE]["held_n"] else BASE]
            lines.append(f"| {name} | {x['held_n']} | {x['held_drop']:.2f} | "
                         f"{x['held_flops']:.3f} | {x['test_drop']:.2f} | {x['test_flops']:.3f} "
                         f"| {x['test_flops'] - ref['test_flops']:+.3f} |")
        if d["boot"]:
            lines += ["", f"{len(d['boot'])} held-out redraws, Δ test FLOPs mean ± sd:", ""]
            for name in d["boot"][0]:
                ref = CTRL if "half" in name else BASE
                delta = np.array([b[name][1] - b[ref][1] for b in d["boot"]])
                lines.append(f"- {name}: {delta.mean():+.3f} ± {delta.std():.3f}")
        lines.append("")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundles", default="/tmp/keep8", help="cifar_resnet.py --keep folder")
    ap.add_argument("--models", nargs="+", default=["resnet44", "resnet20", "resnet32"])
    ap.add_argument("--boot", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    doc = {"command": "python benchmarks/exit_scores.py " + " ".join(sys.argv[1:]),
           "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = extract(Path(tmp) / "data")
        for model in args.models:
            r = collect(Path(args.bundles) / f"{model}-default", root)
            doc["models"][model] = run(r, args.boot)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "exit-scores.json").write_text(json.dumps(doc, indent=1))
    (out / "exit-scores.md").write_text("\n".join(markdown(doc)) + "\n")
    print("\n".join(markdown(doc)))


if __name__ == "__main__":
    main()
