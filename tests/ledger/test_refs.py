"""Refs under a race: two processes move one ref from the same version, exactly one wins."""
from __future__ import annotations

import multiprocessing as mp
import os

import pytest

from raybranch.errors import ConflictError, NotFoundError
from raybranch.ledger import create_branch
from raybranch.ledger.refs import (
    delete_branch, list_branch_names, live_branch_id, move_link, read_branch_ref, read_link, rename_branch,
)
from raybranch.store.store import open_store


@pytest.fixture(params=["file_uri", "s3_uri"])
def uri(request):
    return request.getfixturevalue(request.param)


def _mover(uri, env, who, barrier, out):
    os.environ.update(env)
    store = open_store(uri)
    seen = read_link(store, "r", "served")  # both read the same version …
    barrier.wait()
    try:  # … and both try to move it from there
        move_link(store, "r", "served", {"branch": who, "branch_id": who, "step": 1}, expect=seen)
        out.put((who, "won"))
    except ConflictError:
        out.put((who, "lost"))


def test_two_processes_move_one_ref_exactly_one_wins(uri):
    store = open_store(uri)
    move_link(store, "r", "served", {"branch": "main", "branch_id": "main.x", "step": 0}, expect=None)
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    ctx = mp.get_context("spawn")
    for round_ in range(3):
        barrier, out = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_mover, args=(uri, env, f"b{round_}{i}", barrier, out)) for i in range(2)]
        for p in procs:
            p.start()
        results = dict(out.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(30)
        assert sorted(results.values()) == ["lost", "won"]
        winner = next(k for k, v in results.items() if v == "won")
        assert read_link(store, "r", "served").doc["target"]["branch"] == winner


def test_branch_refs_fork_rename_delete(uri):
    store = open_store(uri)
    create_branch(store, "r", "main")
    with pytest.raises(ConflictError):
        create_branch(store, "r", "main")
    bid = live_branch_id(store, "r", "main")
    assert rename_branch(store, "r", "main", "old-main") == bid
    assert live_branch_id(store, "r", "old-main") == bid
    with pytest.raises(NotFoundError) as ei:
        live_branch_id(store, "r", "main")
    assert "old-main" in str(ei.value)
    assert read_branch_ref(store, "r", "main").doc["state"] == "renamed"
    create_branch(store, "r", "main")  # the name can be used again
    assert live_branch_id(store, "r", "main") != bid
    delete_branch(store, "r", "old-main", reason="poisoned slice 3")
    assert sorted(list_branch_names(store, "r")) == ["main"]
    ref = read_branch_ref(store, "r", "old-main")
    assert ref.doc["state"] == "deleted" and ref.doc["reason"] == "poisoned slice 3"
