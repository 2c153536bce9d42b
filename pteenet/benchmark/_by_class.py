"""Which classes leave at which exit: the per-class view of the exit shares.

Exit shares say how much work the exits save; they do not say for whom. A serving engineer asks
which classes the early exits handle (the easy, distinctive ones) and which always run the whole
backbone (earlyon shows the same breakdown). Images are grouped by their label where the data's
labels are the backbone's classes, else by the backbone's own answer, the class the image is as
far as the model knows; classes are named as every command names them (:mod:`pteenet.labels`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from pteenet.labels import class_name

__all__ = ["PANEL_CLASSES", "TOP_CLASSES", "by_class"]

TOP_CLASSES = 5  # classes listed per exit
PANEL_CLASSES = 12  # classes whose whole exit profile is kept (the sweep plot's panel)


def by_class(exits: Tensor, classes_of: Tensor, num_branches: int,
             names: Sequence[str] | None, by: str, top: int = TOP_CLASSES) -> dict[str, Any]:
    """Per exit, the classes that most often leave there (count, and the share of the class's
    images that leave there); and the classes none of whose images leave early, most images
    first; and for the ``PANEL_CLASSES`` classes with the most images, the share of their
    images leaving at every exit (``exit_shares``). ``exits`` and ``classes_of`` are per image;
    ``by`` says what ``classes_of`` holds."""
    k = int(classes_of.max()) + 1 if classes_of.numel() else 0
    counts = torch.zeros(num_branches + 1, max(k, 1), dtype=torch.long)
    counts.index_put_((exits.long(), classes_of.long()), torch.ones_like(exits, dtype=torch.long),
                      accumulate=True)
    per_class = counts.sum(0)

    def row(c: int, n: int) -> dict[str, Any]:
        return {"class": class_name(names, c), "index": c, "count": n,
                "share_of_class": n / int(per_class[c])}

    per_exit = []
    for e in range(num_branches + 1):
        ranked = sorted(((int(n), c) for c, n in enumerate(counts[e].tolist()) if n),
                        key=lambda t: (-t[0], t[1]))[:top]
        per_exit.append({"exit": e, "name": "backbone" if e == num_branches else f"branch {e}",
                         "top": [row(c, n) for n, c in ranked]})
    early = counts[:num_branches].sum(0)
    never = sorted((c for c in range(counts.shape[1]) if per_class[c] and not early[c]),
                   key=lambda c: (-int(per_class[c]), c))
    biggest = sorted((c for c in range(counts.shape[1]) if per_class[c]),
                     key=lambda c: (-int(per_class[c]), c))[:PANEL_CLASSES]
    shares = [{"class": class_name(names, c), "index": c, "count": int(per_class[c]),
               "shares": (counts[:, c].double() / per_class[c]).tolist()} for c in biggest]
    return {"by": by, "per_exit": per_exit, "exit_shares": shares,
            "never_early": [{"class": class_name(names, c), "index": c,
                             "count": int(per_class[c])} for c in never],
            "classes_seen": int((per_class > 0).sum())}
