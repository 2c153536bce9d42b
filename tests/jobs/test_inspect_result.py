"""``pteenet.inspect`` hands back typed values; ``to_json`` is what ``--json`` prints."""

from __future__ import annotations

import json

import pteenet
from pteenet.jobs import CutInfo


def test_inspect_returns_typed_cuts_and_their_json():
    r = pteenet.inspect("resnet20", branches=3)
    assert isinstance(r, pteenet.InspectResult) and all(isinstance(c, CutInfo) for c in r.cuts)
    chosen = [c for c in r.cuts if c.chosen]
    assert r.chosen == [c.name for c in chosen] and len(chosen) == 3
    assert all(c.branch_flops > 0 for c in chosen)
    assert all(c.branch_flops is None for c in r.cuts if not c.chosen)
    assert r.cache_bytes == sum(c.cache_bytes for c in chosen)
    doc = json.loads(json.dumps(r.to_json()))
    assert doc["cuts"][0] == {**doc["cuts"][0], "name": r.cuts[0].name, "flops": r.cuts[0].flops}
    assert doc["total_macs"] == r.total_flops // 2
