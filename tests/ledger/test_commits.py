"""Exactly-once commits and writer fencing, on a local disk and on the real S3 server."""
from __future__ import annotations

import pytest

from raybranch.errors import ConflictError, FencedError
from raybranch.ledger import BranchLog, BranchWriter, Lineage, Sealer, create_branch
from raybranch.ledger.records import commit_key
from raybranch.store.store import open_store

BACKENDS = ["file_uri", "s3_uri"]


@pytest.fixture(params=BACKENDS)
def uri(request):
    return request.getfixturevalue(request.param)


@pytest.fixture
def store(uri):
    return open_store(uri)


def _steps(a, b):
    return [{"step": s, "kind": "delta", "layout": "x", "tags": []} for s in range(a, b)]


def test_create_is_exclusive(store):
    assert store.create("r/x.json", b"one") is True
    assert store.create("r/x.json", b"two") is False
    assert store.read_bytes("r/x.json") == b"one"


def test_cas_moves_only_from_the_version_read(store):
    t0 = store.cas("r/ref.json", b"v0", None)
    with pytest.raises(ConflictError):
        store.cas("r/ref.json", b"again", None)
    t1 = store.cas("r/ref.json", b"v1", t0)
    with pytest.raises(ConflictError):
        store.cas("r/ref.json", b"stale", t0)
    assert store.read_bytes("r/ref.json") == b"v1"
    assert store.read_tagged("r/ref.json")[1] == t1


def test_commit_chain_groups_and_head(store, uri):
    w = create_branch(store, "r", "main", page_size=4)
    sealer = Sealer()
    for steps in [_steps(0, 1), _steps(1, 65)] + [_steps(s, s + 1) for s in range(65, 75)]:  # one 64-step group
        w.commit(steps, [])
        sealer.seal_due(w)
    lin = Lineage(open_store(uri), "r", "main")  # a fresh reader: nothing cached
    assert lin.head_step == 74 and lin.log.head_seq == 12
    assert [e["step"] for e in lin.all_entries()] == list(range(75))
    assert [p.first_seq for p in lin.log.pages] == [0, 4, 8]
    assert lin.log.commit(12)["parent"] == lin.log.page(8, 11)["commits"][-1]["checksum"]
    assert lin.log.totals["steps"] == 75 and lin.log.totals["commits"] == 13


def test_stale_writer_is_fenced_and_nothing_is_overwritten(store):
    a = create_branch(store, "r", "main", page_size=8)
    a.commit(_steps(0, 1), [])
    b = BranchWriter.register(BranchLog(store, "r", a.bid, "main"))
    assert b.epoch == a.epoch + 1
    for s in range(1, 6):  # the stale writer is refused every time, whatever the step
        with pytest.raises(FencedError) as ei:
            a.commit(_steps(s, s + 1), [])
        msg = str(ei.value)
        assert "main" in msg and f"epoch {a.epoch}" in msg and f"epoch {b.epoch}" in msg and "\n" not in msg
    b.commit(_steps(1, 2), [])
    lin = Lineage(store, "r", "main")
    assert [e["step"] for e in lin.all_entries()] == [0, 1]
    assert lin.log.commit(lin.log.head_seq)["epoch"] == b.epoch


def test_two_writers_racing_for_one_commit(store):
    a = create_branch(store, "r", "main")
    log_b = BranchLog(store, "r", a.bid, "main").open()
    b = BranchWriter(log_b, a.epoch, "other")  # same epoch, same head: only one can win
    a.commit(_steps(0, 1), [])
    with pytest.raises(ConflictError):
        b.commit(_steps(0, 1), [])
    assert store.read_json(commit_key("r", a.bid, 1))["writer"] == a.writer_id


def test_registration_race_newest_wins(store):
    a = create_branch(store, "r", "main")
    ws = [BranchWriter.register(BranchLog(store, "r", a.bid, "main")) for _ in range(3)]
    assert [w.epoch for w in ws] == [2, 3, 4]
    for w in ws[:-1]:
        with pytest.raises(FencedError):
            w.commit(_steps(0, 1), [])
    ws[-1].commit(_steps(0, 1), [])


def test_head_commit_carries_what_a_listing_needs(store, uri):
    w = create_branch(store, "r", "main")
    w.commit([{"step": 0, "kind": "snapshot", "tags": ["branch-point"]}], [{"name": "0", "blob": ["a" * 64, 100]}])
    w.commit([{"step": s, "kind": "delta", "tags": ["slice-end:1"] if s == 4 else []} for s in range(1, 6)],
             [{"name": "0", "blob": ["b" * 64, 50]}], slices=[1])
    fresh = open_store(uri)
    head = Lineage(fresh, "r", "main").log.head
    assert fresh.stats.reads <= 6
    assert head["totals"]["steps"] == 6 and head["totals"]["bytes"] == 150 and head["totals"]["last_step"] == 5
    assert head["slices"] == [1] and head["tags"] == {"branch-point": 0, "slice-end:1": 4}
