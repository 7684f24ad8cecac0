"""A writer SIGKILLed mid-save leaves no visible partial checkpoint, and the branch goes on.

The writer (crash_writer.py, a separate process) saves a deterministic random walk, one commit
per step, sealing a page every 3 commits; the test replays the same walk here into a clean store
to know what every committed step must restore to. A kill lands anywhere: writing a blob, a
commit record, a page, top.json, or deleting what a seal replaced.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import raybranch as rb
from raybranch.ledger.lineage import Lineage
from raybranch.ledger.verify import verify_store
from raybranch.store.store import TMP_MARK

import crash_writer
from ckpt_testkit import Recorder, assert_matches_record, sealed_pages

WRITER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crash_writer.py")
SEED = 11


def _tmp_files(root: str) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if TMP_MARK in f]


def _run_and_kill(uri: str, root: str | None, rng: random.Random, mode: str) -> list[int]:
    """Start the writer, wait for its k-th commit (k ∈ 5..8), kill it mid-save; the steps it reported."""
    k = rng.randint(5, 8)
    proc = subprocess.Popen([sys.executable, WRITER, uri, "crash", str(SEED)], stdout=subprocess.PIPE, text=True)
    printed: list[int] = []
    try:
        while len(printed) < k:
            line = proc.stdout.readline()
            assert line, f"writer exited early (rc {proc.poll()})"
            printed.append(int(line))
        if mode == "tmpfile":  # kill while a file is half written
            deadline = time.monotonic() + 60
            seen: list[str] = []
            while not seen and time.monotonic() < deadline:
                seen = _tmp_files(root)
            assert seen, "never saw the writer mid-write"
        else:  # kill at a random moment of the next save(s)
            time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        rest = proc.stdout.read()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return printed + [int(x) for x in rest.split()]


@pytest.mark.parametrize(
    "backend, mode, trial", [("file_uri", "tmpfile", 0), ("file_uri", "delay", 1), ("s3_uri", "delay", 2)]
)
def test_sigkill_mid_save(request, tmp_path, backend, mode, trial):
    uri = request.getfixturevalue(backend)
    store = rb.open_store(uri)
    root = store.root if store.loc.is_local else None
    reported = _run_and_kill(uri, root, random.Random(trial), mode)
    assert reported == list(range(len(reported)))

    # replay the same walk, uninterrupted, into a clean store: the ground truth per step
    replay = crash_writer.checkpointer("file://" + str(tmp_path / "replay"), "crash")
    rec = Recorder()
    states = dict(crash_writer.states(SEED, len(reported) + 3))
    for step in range(len(reported) + 3):
        rec.save(replay, step, states[step])

    ckpt = crash_writer.checkpointer(uri, "crash")
    log = ckpt.log()
    steps = [r["step"] for r in log]
    # every reported commit is there; at most the save in flight committed on top; no gaps
    assert steps == list(range(len(steps)))
    assert len(reported) <= len(steps) <= len(reported) + 1
    reader = rb.Reader(rb.open_store(uri), "crash")
    for s in steps:  # every visible checkpoint restores, to exactly what the writer had
        assert_matches_record(reader.restore("main", s), rec, s)

    listed = store.list("crash", recursive=True)
    assert not [i.path for i in listed if TMP_MARK in i.base_name]
    assert all(i.base_name.endswith(".arrow") for i in store.list("crash/blobs"))
    rep = verify_store(store, "crash")
    assert rep.problems == [] and rep.counts["steps"] == len(steps)

    # a new Checkpointer on the branch continues the chain exactly as the writer would have
    head = steps[-1]
    ckpt.save(head + 1, states[head + 1])
    assert torch.equal(ckpt._enc.encoders["model"].recon.view(torch.int32), rec.recon[head + 1]["model"].view(torch.int32))
    ckpt.save(head + 2, states[head + 2])
    assert torch.equal(ckpt._enc.encoders["model"].recon.view(torch.int32), rec.recon[head + 2]["model"].view(torch.int32))
    ckpt.close()
    log = ckpt.log()
    assert [r["step"] for r in log] == list(range(head + 3))
    assert log[-2]["parent"] == ["main", head] and log[-2]["kind"] == "delta"
    fresh = rb.Reader(rb.open_store(uri), "crash")
    for s in (0, head, head + 1, head + 2):
        assert_matches_record(fresh.restore("main", s), rec, s)
    rep = verify_store(store, "crash")
    assert rep.problems == [] and rep.counts["steps"] == head + 3
    # a seal the kill interrupted has been finished by the new writer's commits (its fence and
    # two saves cross a page boundary): every full page is sealed, exactly its steps compacted
    head_seq = Lineage(store, "crash", "main").log.head_seq
    full = (head_seq + 1) // crash_writer.SEGMENT_SIZE
    assert sealed_pages(store, "crash") == [(3 * i, 3 * i + 2) for i in range(full)]
    assert [r["compacted"] for r in log] == [r["commit"] <= 3 * full - 1 for r in log]
