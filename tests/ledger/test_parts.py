"""A commit of several parts (the shards ranks write): visible only whole, read and compacted whole."""
from __future__ import annotations

import hashlib

from raybranch.checkpoint.compact import compact_rows
from raybranch.ledger import Lineage, Sealer, create_branch
from raybranch.ledger.gc import collect
from raybranch.ledger.records import layout_key
from raybranch.ledger.verify import verify_store
from raybranch.store.blob import Row, read_blob, write_blob
from raybranch.store.store import json_bytes, open_store


def test_multi_part_commits_resolve_compact_and_verify(file_uri):
    store = open_store(file_uri)
    layout = json_bytes({"groups": {}, "exact": ["a", "b"], "model_keys": ["a", "b"]})
    lh = hashlib.sha256(layout).hexdigest()
    store.create(layout_key("r", lh), layout)
    w = create_branch(store, "r", "main", page_size=4)
    sealer = Sealer(compact_rows)
    for s in range(6):  # each rank writes its own tensor's rows as its part; one commit names both
        parts = []
        for rank, name in enumerate("ab"):
            blob = write_blob([Row(s, name, "exact", "uint8", (1,), bytes([s * 2 + rank]))], {"run": "r", "rank": rank})
            h, size = store.put_blob("r", blob)
            parts.append({"name": str(rank), "blob": [h, size]})
        w.commit([{"step": s, "kind": "snapshot", "base": [w.bid, s], "layout": lh, "tags": [], "slices": []}], parts, world_size=2)
        sealer.seal_due(w)
    lin = Lineage(open_store(file_uri), "r", "main")
    assert lin.log.head["world_size"] == 2
    sealed, loose = lin.entry(1), lin.entry(5)
    assert [p["name"] for p in sealed["parts"]] == ["segment"] and [p["name"] for p in loose["parts"]] == ["0", "1"]
    seg_rows = read_blob(store.get_blob("r", *sealed["parts"][0]["blob"]))[0]
    assert sorted((r.step, r.name) for r in seg_rows) == [(s, n) for s in range(3) for n in "ab"]
    rep = verify_store(store)
    assert rep.problems == [] and rep.counts["steps"] == 6
    assert collect(store, "r", grace_s=0).deleted["blobs"] == 0  # every part of every step is referenced
    assert verify_store(store).problems == []
