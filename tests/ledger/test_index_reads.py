"""Opening a branch and resolving any step cost a bounded number of store reads."""
from __future__ import annotations

import random

import pytest

from raybranch.ledger import Lineage, Sealer, create_branch
from raybranch.store.store import open_store


@pytest.mark.parametrize("backend,commits", [("file_uri", 2000), ("s3_uri", 600)])
def test_reads_stay_bounded(request, backend, commits):
    uri = request.getfixturevalue(backend)
    store = open_store(uri)
    w = create_branch(store, "r", "main", page_size=64)
    sealer = Sealer()
    step = 0
    for c in range(commits):
        n = 1 + c % 3  # groups of 1-3 steps
        w.commit([{"step": step + i, "kind": "delta", "tags": ["t"] if (step + i) % 500 == 0 else []} for i in range(n)],
                 [{"name": "0", "blob": [f"{c:064x}", 10]}])
        sealer.seal_due(w)
        step += n
    rng = random.Random(0)
    for target in [0, step - 1, *rng.sample(range(step), 8)]:
        fresh = open_store(uri)
        lin = Lineage(fresh, "r", "main")
        opened = fresh.stats.reads
        e = lin.entry(target)
        assert e["step"] == target and e["parts"][0]["blob"][1] == 10
        assert opened <= 6, f"open took {fresh.stats.snapshot()}"
        assert fresh.stats.reads <= 7, f"open + resolve of step {target} took {fresh.stats.snapshot()}"
    fresh = open_store(uri)
    lin = Lineage(fresh, "r", "main")
    before = fresh.stats.reads
    tail = lin.log.last_entries(20)
    assert [e["step"] for e in tail] == list(range(step - 20, step))
    # one GET per unsealed commit it shows, one per page: bounded by the entries asked for, not the branch
    assert fresh.stats.reads - before <= len({e["seq"] for e in tail}) + 1
    assert lin.log.totals["steps"] == step and lin.log.totals["commits"] == commits + 1
