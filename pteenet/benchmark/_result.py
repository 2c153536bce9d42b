"""What :func:`pteenet.bench` hands back: typed values, and the layout of ``bench.json``.

The three ways of running the model that bench compares (the early exits, the untouched
backbone, the oracle) are :class:`Quality` values, so ``result.early_exit.top1`` reads as what it
is; the measurements that are tables by nature (timing, speedups, the time profile, classes)
stay JSON-shaped mappings, the same ones ``bench.json`` holds. :meth:`BenchResult.to_json` and
:meth:`BenchResult.from_json` convert both ways, so a saved ``bench.json`` reads back typed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["BenchResult", "Quality"]


@dataclass(frozen=True)
class Quality:
    """One way of running the model on the scored images: top-1 against the labels (None
    without labels), agreement with the backbone's own answers, and the mean FLOPs per image
    relative to the backbone's."""

    top1: float | None
    agreement: float
    relative_flops: float

    def to_json(self) -> dict[str, Any]:
        return {"top1": self.top1, "agreement": self.agreement,
                "relative_flops": self.relative_flops}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Quality:
        return cls(d["top1"], d["agreement"], d["relative_flops"])


@dataclass(frozen=True)
class BenchResult:
    """A bundle measured against its backbone (see :mod:`pteenet.benchmark._bench`).

    ``exits``: one row per exit (the backbone last): its FLOPs, share of the images, agreement,
    top-1 and the oracle's share. ``timing`` and ``speedup``: wall clock of every runtime timed
    and the ratios against the backbone, its segments in a row and the fastest plain runtime.
    ``files``: what was written (``bench.json``, the sweep's CSV and plot)."""

    bundle: dict[str, Any]
    data: dict[str, Any]
    thresholds: dict[str, Any]
    early_exit: Quality
    backbone: Quality
    oracle: Quality
    exits: list[dict[str, Any]]
    oracle_shares: list[float]
    exit_costs: list[float]
    simulation: dict[str, Any]
    by_class: dict[str, Any]
    timing: dict[str, Any]
    speedup: dict[str, Any]
    profile: dict[str, Any] | None = None
    sweep: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The layout of ``bench.json`` (JSON-serialisable)."""
        return {
            "bundle": self.bundle, "data": self.data, "thresholds": self.thresholds,
            "exit_costs": self.exit_costs,
            "early_exit": {**self.early_exit.to_json(), "exits": self.exits},
            "backbone": self.backbone.to_json(),
            "oracle": {**self.oracle.to_json(), "shares": self.oracle_shares},
            "simulation": self.simulation, "by_class": self.by_class, "notes": self.notes,
            "warnings": self.warnings, "timing": self.timing, "speedup": self.speedup,
            "profile": self.profile, "sweep": self.sweep, "files": self.files,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BenchResult:
        """A result from the layout :meth:`to_json` writes (a ``bench.json`` read back)."""
        return cls(
            bundle=d["bundle"], data=d["data"], thresholds=d["thresholds"],
            early_exit=Quality.from_json(d["early_exit"]),
            backbone=Quality.from_json(d["backbone"]), oracle=Quality.from_json(d["oracle"]),
            exits=d["early_exit"]["exits"], oracle_shares=d["oracle"]["shares"],
            exit_costs=d["exit_costs"], simulation=d["simulation"], by_class=d["by_class"],
            timing=d["timing"], speedup=d["speedup"], profile=d.get("profile"),
            sweep=d.get("sweep"), notes=d.get("notes", []), warnings=d.get("warnings", []),
            files=d.get("files", {}))
