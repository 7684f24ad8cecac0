"""gc keeps everything reachable and frees what is not, with a writer running; retention thins."""
from __future__ import annotations

import os
import threading
import time

import pytest
import torch

import raybranch as rb
from raybranch.checkpoint.retention import apply_retention, set_policy
from raybranch.ledger.gc import collect
from raybranch.ledger.refs import delete_branch, move_link
from raybranch.ledger.verify import verify_store
from raybranch.store.store import open_store


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(12, 6)


def _nudge(m, s):
    with torch.no_grad():
        g = torch.Generator().manual_seed(s)
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)


def _restore_all(uri, run, branch):
    reader = rb.Reader(open_store(uri), run)
    return {e["step"]: reader.restore(branch, e["step"])["model"] for e in reader.lineage(branch).all_entries()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[s][k], b[s][k]) for s in a for k in a[s])


def test_gc_frees_dead_branch_and_garbage_keeps_the_rest(file_uri):
    m = _model()
    ck = rb.Checkpointer(file_uri, "r", "main", segment_size=4, flush_every=1)  # one commit per save (forks inherit it)
    for s in range(10):
        _nudge(m, s)
        ck.save(s, m)
    alt = ck.fork("alt", 6)
    for s in range(7, 12):
        _nudge(m, 100 + s)
        alt.save(s, m)
    doomed = ck.fork("doomed", 3)
    for s in range(4, 9):
        _nudge(m, 200 + s)
        doomed.save(s, m)
    for w in (ck, alt, doomed):
        w.close()  # every save committed before gc looks
    store = open_store(file_uri)
    garbage = "r/blobs/" + "0" * 64 + ".arrow"
    store.write_bytes(garbage, b"x" * 1000)
    before = {b: _restore_all(file_uri, "r", b) for b in ("main", "alt")}
    delete_branch(store, "r", "doomed")
    young = collect(store, "r", grace_s=3600)
    assert young.freed_bytes == 0 and young.kept_young > 0  # everything is younger than the grace period
    rep = collect(store, "r", grace_s=3600, now=time.time() + 7200)
    assert rep.deleted["branches"] == 1 and rep.deleted["blobs"] >= 2 and rep.freed_bytes > 1000
    assert not store.exists(garbage)
    assert verify_store(store).problems == []
    assert {b: _restore_all(file_uri, "r", b) for b in ("main", "alt")}.keys() == before.keys()
    for b in before:
        assert _same(_restore_all(file_uri, "r", b), before[b])


@pytest.mark.parametrize("backend", ["file_uri", "s3_uri"])
def test_gc_with_a_writer_running(request, backend):
    uri = request.getfixturevalue(backend)
    m = _model(1)
    ck = rb.Checkpointer(uri, "r", "main", segment_size=4, flush_every=2)
    stop, errors, saved = threading.Event(), [], []

    def write():
        try:
            s = 0
            while not stop.is_set() and s < 60:
                _nudge(m, s)
                ck.save(s, m)
                saved.append(s)
                s += 1
            ck.close()
        except Exception as exc:  # surfaced below
            errors.append(exc)

    t = threading.Thread(target=write)
    t.start()
    store = open_store(uri)
    passes = 0
    while t.is_alive() and passes < 30:
        collect(store, "r", grace_s=5.0)  # anything older than 5 s and unreferenced goes (a commit lands well within)
        passes += 1
    t.join()
    assert not errors, errors
    rep = collect(store, "r", grace_s=5.0)
    assert verify_store(store).problems == []
    steps = [e["step"] for e in rb.Reader(open_store(uri), "r").lineage("main").all_entries()]
    assert steps == saved and passes > 0 and rep.freed_bytes >= 0


def test_retention_thins_old_pages_and_keeps_tagged_forked_and_linked_steps(file_uri):
    m = _model(2)
    ck = rb.Checkpointer(file_uri, "r", "main", segment_size=4, snapshot_every=8, flush_every=1)  # pages of 4 commits = 4 steps
    for s in range(48):
        _nudge(m, s)
        ck.save(s, m, tags=["slice-end:1"] if s == 13 else None)
    fork = ck.fork("alt", 18)
    _nudge(m, 99)
    fork.save(19, m)
    fork.close()
    ck.close()
    store = open_store(file_uri)
    move_link(store, "r", "served", {"branch": "main", "branch_id": ck._writer.bid, "step": 21})
    before = _restore_all(file_uri, "r", "main")
    alt_before = _restore_all(file_uri, "r", "alt")
    set_policy(store, "r", "main", keep_steps=10, keep_days=None)
    assert apply_retention(store, "r") > 0
    rep = collect(store, "r", grace_s=3600, now=time.time() + 7200)
    assert rep.freed_bytes > 0
    after = _restore_all(file_uri, "r", "main")
    kept = sorted(after)
    assert set(range(38, 48)) <= set(kept)  # the recent past, every step
    assert {13, 18, 21} <= set(kept)  # tagged, forked from, linked: materialized, bit for bit
    assert all(s % 8 == 0 or s in (13, 18, 21) for s in kept if s < 28), kept  # pages wholly before snapshot 32
    assert len(kept) < len(before)
    for s in kept:
        assert all(torch.equal(after[s][k], before[s][k]) for k in before[s])
    alt_after = _restore_all(file_uri, "r", "alt")  # its history through main is thinned like main's
    assert {18, 19} <= set(alt_after) and set(alt_after) <= set(alt_before)
    assert _same(alt_after, {s: alt_before[s] for s in alt_after})
    assert verify_store(store).problems == []
    _nudge(m, 1000)
    rb.Checkpointer(file_uri, "r", "main", segment_size=4, snapshot_every=8).save(48, m)  # the branch goes on


def test_cli_gc_and_branch(file_uri, capsys):
    from raybranch.cli.main import main

    m = _model(3)
    ck = rb.Checkpointer(file_uri, "r", "main", segment_size=4)
    for s in range(6):
        _nudge(m, s)
        ck.save(s, m)
    ck.fork("tmp", 3)
    assert main(["branch", "delete", "--store", file_uri, "--run", "r", "--branch", "tmp", "--reason", "test"]) == 0
    assert main(["gc", "--store", file_uri, "--grace-s", "0"]) == 0
    out = capsys.readouterr().out
    assert "freed" in out and "1 dead branches" in out
    assert main(["branch", "rename", "--store", file_uri, "--run", "r", "--branch", "main", "--to", "trunk"]) == 0
    assert main(["verify", "--store", file_uri]) == 0
    assert main(["gc", "--store", file_uri + "-typo"]) == 2
    assert main(["branch", "delete", "--store", file_uri, "--run", "r", "--branch", "nope"]) == 2
    assert os.path.isdir(file_uri[len("file://"):])
