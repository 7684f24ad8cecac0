"""The fault suite (raybranch.bench.faults) at small counts, against real processes and the
session's SeaweedFS server: SIGKILLed writers (at chosen store operations of a commit and of a
page seal, and after a random delay), bit flips in every kind of object, stale writers on
file:// and S3, a writer under a file-size limit, and a ~3 s S3 outage.

Two tests reproduce findings of the suite's first run, now fixed: a page seal deleted the new
writer's fence record (a stale writer's next commit then landed, shadowed by the page), and a
hung S3 server kept a save blocked past a short retry_deadline.
"""
from __future__ import annotations

import random

import pytest

from raybranch.bench.faults import common, diskfull, fencing, flips, kills, outage, spawn


@pytest.fixture(scope="module")
def forkserver(tmp_path_factory):
    fs = spawn.ForkServer(str(tmp_path_factory.mktemp("writers")))
    yield fs
    fs.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return common.Reference(str(tmp_path_factory.mktemp("reference")), 90)  # long enough that a kill within 0.5 s lands mid-run


def _point(ops: list[tuple], phase: str, op: str, kind: str, nth: int = 0) -> int:
    """1-based index of the nth mutation (phase, op, kind) of a calibrated writer."""
    found = [i + 1 for i, o in enumerate(ops) if o == (phase, op, kind)]
    assert len(found) > nth, (phase, op, kind, ops)
    return found[nth]


KILL_POINTS = [  # (phase, op, kind, before/after): inside a commit, a seal and a compaction
    ("commit", "create", "commit", "before"),
    ("compact", "create", "blob", "after"),
    ("seal", "create", "page", "after"),
    ("seal", "write", "top", "after"),
    ("seal", "delete", "commit", "after"),
]


def _check_round(r: dict) -> None:
    assert r["killed"], r
    assert not r["partial"], r
    assert r["resumed"], r


def test_sigkill_at_commit_and_seal_points(tmp_path, file_uri, forkserver, reference):
    cfg = {"segment_size": 3, "flush_every": 1}
    ops = kills.count_ops(forkserver, str(tmp_path), file_uri, {}, **cfg)
    for i, (phase, op, kind, when) in enumerate(KILL_POINTS):
        k = _point(ops, phase, op, kind, nth=1 if phase != "commit" else 3)
        r = kills.kill_round(i, random.Random(i), file_uri, forkserver, reference, {}, "op", cfg, (k, when))
        assert r["at"].startswith(phase), r["at"]
        _check_round(r)


def test_sigkill_after_random_delay_file_and_s3(s3_uri, s3_server, file_uri, forkserver, reference):
    env = s3_server.env()
    rng = random.Random(5)
    for i, (uri, cfg) in enumerate([(file_uri, {"segment_size": 2, "flush_every": 2}),
                                    (s3_uri, {"segment_size": 2, "flush_every": 1})]):
        _check_round(kills.kill_round(10 + i, rng, uri, forkserver, reference, env, "delay", cfg, max_delay_s=0.5))


def test_bit_flips_in_every_kind_of_object(tmp_path):
    s = flips.run(str(tmp_path), 2 * len(common.KINDS), seed=4, log=lambda _m: None)
    assert all(v["flips"] >= 1 for v in s["per_kind"].values()), s["per_kind"]
    assert s["detected"] == s["flips"], s["misses"]
    assert s["silent_wrong_restores"] == 0 and s["restore_crashes"] == 0, s["misses"]
    assert s["cli_exit_1"] == s["flips"], s["misses"]


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_stale_writer_is_refused(request, backend, forkserver, s3_server):
    uri = request.getfixturevalue("file_uri" if backend == "file" else "s3_uri")
    env = s3_server.env() if backend == "s3" else {}
    # rounds "acquire" (B registers) and "open-group" (A has saves not yet committed)
    out = [fencing.fence_round(i, random.Random(i), uri, backend, forkserver, env) for i in (0, 2)]
    for r in out:
        assert r["refused"], r
        assert r["silent_overwrite"] is False, r
        assert not r["verify_problems"] and not r.get("error"), r


def test_stale_writer_after_new_writer_sealed_a_page(file_uri, forkserver):
    from raybranch.checkpoint.checkpointer import Checkpointer
    from raybranch.errors import FencedError
    from raybranch.store.store import open_store

    a = Checkpointer(open_store(file_uri), "slip", **common.ckpt_kwargs(3, 1))
    tr = common.Trainer()
    for s in range(6):  # commits 1..6 (commit 0 is the branch's root)
        a.save(s, tr.advance_to(s).model, tr.opt)
    # B: fence = commit 7, step 6 = commit 8, which completes page 6-8: the seal deletes records 5, 6, 7
    b = forkserver.spawn({"uri": file_uri, "run": "slip", "seed": 99, "segment_size": 3, "steps": 1})
    assert b.wait(120) == 0
    with pytest.raises(FencedError):
        a.save(6, tr.advance_to(6).model, tr.opt)


def test_disk_full_fails_cleanly(tmp_path, forkserver):
    s = diskfull.run(str(tmp_path), log=lambda _m: None, spawner=forkserver)
    assert [r["failed_object"] for r in s["limits"]] == ["commit", "blob", "blob"], s
    for r in s["limits"]:
        assert r["ok"], r
    assert s["limits"][2]["warnings"] >= 1  # the compaction failed after its commit: a warning, the save stands


def test_s3_outage_blocks_or_fails_within_deadline(s3_uri, s3_server):
    s = outage.run(s3_server, 3.0, plans=[("sigstop", "long", None), ("restart", "short", None)], log=lambda _m: None,
                   tag="t")
    for r in s["runs"]:
        assert r["ok"], r
    blocked = s["runs"][0]
    assert blocked["first_save_in_outage"] == "ok" and blocked["blocked_s"] >= 2.0
    failed = s["runs"][1]
    assert failed["error_types"] == ["StoreError"] and failed["error_after_s"] <= failed["retry_deadline_s"] + 1.0


def test_s3_hung_server_short_deadline(s3_uri, s3_server):
    s = outage.run(s3_server, 3.0, plans=[("sigstop", "short", None)], log=lambda _m: None, tag="h")
    assert s["runs"][0]["ok"], s["runs"][0]


def test_sigkill_between_branch_doc_and_root_commit(tmp_path, file_uri, forkserver, reference):
    """A kill right after create_branch wrote branch.json (before commit 0) leaves a branch directory
    without commits: verify must take it for an orphan (gc's), not for damage. (Found by this suite:
    verify reported "has no commits" until 4aa8726.)"""
    cfg = {"segment_size": 3, "flush_every": 1}
    ops = kills.count_ops(forkserver, str(tmp_path), file_uri, {}, **cfg)
    k = _point(ops, "create", "create", "branch")
    r = kills.kill_round(20, random.Random(0), file_uri, forkserver, reference, {}, "op", cfg, (k, "after"))
    assert r["at"] == "create: after create branch", r["at"]
    _check_round(r)
