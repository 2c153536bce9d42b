"""Every fixed choice of the CLI as an Enum made from the library's own list of values, so
``--help`` lists them and click refuses any other value with one line (``_errors``)."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

from pteenet.choices import (
    BOOSTED,
    BOUNDS,
    BRANCH_TYPES,
    COSTS,
    ENSEMBLES,
    FORMATS,
    LABELS,
    LOSSES,
    POLICIES,
    SCORES,
    SPLITS,
    TARGETS,
)


def choice(name: str, values: Sequence[str]) -> type[Enum]:
    """A ``str`` Enum whose members are ``values`` (typer shows them as ``[a|b|c]``)."""
    return Enum(name, [(v, v) for v in values], type=str)


Branch = choice("Branch", BRANCH_TYPES)
Placement = choice("Placement", POLICIES)
Target = choice("Target", TARGETS)
Loss = choice("Loss", LOSSES)
Boost = choice("Boost", [b for b in BOOSTED if b])  # no None: the value is required
Score = choice("Score", [s for s in SCORES if s != "gate"])  # the gate: the default method's
Bound = choice("Bound", BOUNDS)
Format = choice("Format", FORMATS)
Cost = choice("Cost", COSTS)
Split = choice("Split", SPLITS)
Labels = choice("Labels", LABELS)
Ensemble = choice("Ensemble", ENSEMBLES)


def value(member: Enum | None) -> str | None:
    """The library's string for a chosen member (None stays None)."""
    return None if member is None else str(member.value)
