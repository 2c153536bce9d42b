"""Writing a bundle: the branches, the metadata and the threshold table as one commit."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from pteenet.bundle._schema import (
    BRANCHES_FILE,
    ENSEMBLE_TENSORS,
    FORMAT_VERSION,
    MEMBERS,
    META_KEY,
    THRESHOLDS_CSV,
    THRESHOLDS_FILE,
    BundleInfo,
    ThresholdTable,
    calibration_digest,
    check_table_file,
)
from pteenet.storage import commit_files
from pteenet.thresholds import json_rows

if TYPE_CHECKING:
    from pteenet.cascade._model import EarlyExitModel

__all__ = ["save_bundle", "write_thresholds"]


def save_bundle(out: str | os.PathLike, model: EarlyExitModel, info: BundleInfo,
                table: ThresholdTable | None = None) -> Path:
    """Write ``branches.safetensors`` and the threshold table (default: the model's own) as one
    commit (see :func:`pteenet.storage.commit_files`), holding the folder's writer lock."""
    out = Path(out)
    tensors = {f"branches.{k}": v.detach().cpu().contiguous()
               for k, v in model.branches.state_dict().items()}
    tensors["calibration_indices"] = torch.tensor(info.calibration_indices, dtype=torch.int64)
    if model.ensemble is not None:
        tensors.update(zip(ENSEMBLE_TENSORS, (model.ensemble.weight.detach().cpu().contiguous(),
                                               model.ensemble.bias.detach().cpu().contiguous())))
    doc = info.to_meta()
    doc["extra"] = {**info.extra, "calibration_sha256": calibration_digest(
        list(info.calibration_indices))}
    meta = {META_KEY: json.dumps(doc, sort_keys=True)}
    csv_text, json_text = _threshold_texts(table or ThresholdTable.of(model))
    commit_files(out, {
        BRANCHES_FILE: lambda p: save_file(tensors, str(p), metadata=meta),
        THRESHOLDS_CSV: lambda p: p.write_text(csv_text, encoding="utf-8"),
        THRESHOLDS_FILE: lambda p: p.write_text(json_text, encoding="utf-8"),
    }, MEMBERS)
    info.path = out
    return out


def _threshold_texts(table: ThresholdTable) -> tuple[str, str]:
    """The CSV (empty cell / ``never`` = never exits) and JSON texts of a threshold table."""
    t = table.thresholds
    doc = {"format_version": FORMAT_VERSION, "num_branches": int(t.shape[0]),
           "num_classes": int(t.shape[1]), "score": table.score, "method": table.method,
           "params": table.params, "thresholds": json_rows(t), "summary": table.summary}
    if table.gamma is not None:
        doc["gamma"] = json_rows(torch.tensor([table.gamma], dtype=torch.float64))[0]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["branch", "class", "threshold"])
    for b, row in enumerate(doc["thresholds"]):
        for c, v in enumerate(row):
            w.writerow([b, c, "never" if v is None else v])
    return buf.getvalue(), json.dumps(doc, indent=1)


def write_thresholds(out: str | os.PathLike, table: ThresholdTable) -> None:
    """Replace ``thresholds.json`` and ``thresholds.csv`` as one commit, whatever the old
    table was (missing, corrupt, for another branch count): the branches stay as committed."""
    check_table_file(Path(out) / THRESHOLDS_FILE)
    csv_text, json_text = _threshold_texts(table)
    commit_files(out, {THRESHOLDS_CSV: lambda p: p.write_text(csv_text, encoding="utf-8"),
                       THRESHOLDS_FILE: lambda p: p.write_text(json_text, encoding="utf-8")},
                 MEMBERS)
