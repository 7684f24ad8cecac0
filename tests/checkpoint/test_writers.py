"""What the Checkpointer adds on top of the commit log: group commits (``flush_every``) and
writer fencing (a Checkpointer whose branch another one took over is refused).

Group commits run behind the training thread: a group closed by a save (its ``flush_every``-th
step, an exact checkpoint) is committed by the pipeline, and :func:`settle` waits for that
without committing anything more; a tagged save, ``flush``, ``close`` and ``restore`` wait for the
commit themselves."""
from __future__ import annotations

import pytest
import torch

import raybranch as rb
from raybranch.errors import FencedError, NotFoundError
from raybranch.ledger.verify import verify_store
from raybranch.store.blob import read_blob

from ckpt_testkit import Recorder, assert_matches_record, committed, make_model, sealed_pages, settle, sgd_step, state_bytes

BACKENDS = ["file_uri", "s3_uri"]


@pytest.fixture(params=BACKENDS)
def uri(request):
    return request.getfixturevalue(request.param)


class Trainer:
    """A TinyNet trained by SGD, one step per call, saved through a Recorder."""

    def __init__(self, seed=0):
        self.model = make_model(seed)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.rec = Recorder()

    def save(self, ckpt, step, *, on_return=None, **kw):
        """``on_return()`` runs as soon as ``save`` returns, before the Recorder waits for the pipeline."""
        sgd_step(self.model, self.opt, self.gen)
        cid = ckpt.save(step, self.model, self.opt, **kw)
        if on_return is not None:
            on_return()
        self.rec.record(ckpt, step, self.model, self.opt)
        return cid


def _steps_of_blob(store, h):
    rows, _ = read_blob(store.get_blob("exp1", h))
    return sorted({r.step for r in rows})


# -- group commits ---------------------------------------------------------------------------
def test_group_commits(uri):
    store = rb.open_store(uri)
    ckpt = rb.Checkpointer(store, run="exp1", flush_every=8, flush_seconds=None, segment_size=0)  # no time window
    t = Trainer()

    other = rb.open_store(uri)  # another process's view

    def visible():  # what another process sees (log() would commit the open group)
        return committed(other, "exp1")

    t.save(ckpt, 0)  # the first save is a snapshot: it closes its group (a commit of its own)
    settle(ckpt)
    assert visible() == [(1, [0])]
    for s in range(1, 8):
        t.save(ckpt, s)
    settle(ckpt)
    assert visible() == [(1, [0])]  # seven saves open
    with pytest.raises(NotFoundError):
        rb.Reader(other, "exp1").restore("main", 5)
    t.save(ckpt, 8)  # the eighth save of the group closes it: one commit, one blob
    settle(ckpt)
    assert visible() == [(1, [0]), (2, list(range(1, 9)))]
    blobs = {i.base_name.removesuffix(".arrow") for i in store.list("exp1/blobs")}
    assert len(blobs) == 2
    group_blob = [h for h in blobs if _steps_of_blob(store, h) != [0]]
    assert len(group_blob) == 1 and _steps_of_blob(store, group_blob[0]) == list(range(1, 9))

    t.save(ckpt, 9)
    t.save(ckpt, 10)
    seen = []
    t.save(ckpt, 11, tags=["eval"], on_return=lambda: seen.append(visible()[-1]))
    assert seen == [(3, [9, 10, 11])]  # a tagged save returns once the open group is committed with it
    t.save(ckpt, 12)
    t.save(ckpt, 13)
    assert_matches_record(ckpt.restore(13), t.rec, 13)  # restore of an open step commits the group first
    assert visible()[-1] == (4, [12, 13])
    t.save(ckpt, 14)
    t.save(ckpt, 15)
    t.save(ckpt, 16, snapshot=True)  # a snapshot closes the open group too
    settle(ckpt)
    assert visible()[-1] == (5, [14, 15, 16])
    t.save(ckpt, 17)
    t.save(ckpt, 18)
    ckpt.flush()
    assert visible()[-1] == (6, [17, 18])
    ckpt.flush()  # nothing open: no empty commit
    t.save(ckpt, 19)
    ckpt.close()
    assert visible()[-1] == (7, [19])
    assert len(list(store.list("exp1/blobs"))) == 7  # one blob per commit

    log = ckpt.log()
    assert [r["step"] for r in log] == list(range(20))
    # tagged saves and snapshot=True are exact key frames
    assert [r["kind"] for r in log] == ["snapshot"] + ["delta"] * 10 + ["key"] + ["delta"] * 4 + ["key", "delta", "delta", "delta"]
    assert log[11]["tags"] == ["eval"] and log[1]["parent"] == ["main", 0] and log[8]["depth"] == 8
    assert len({r["bytes"] for r in log[1:9]}) == 1  # the steps of a group share its blob
    fresh = rb.Reader(other, "exp1")
    for s in range(20):
        assert_matches_record(fresh.restore("main", s), t.rec, s)
    assert verify_store(store, "exp1").problems == []


def test_group_commits_across_sealed_pages(file_uri):
    """Pages are sealed by commits, not steps: groups of 4 steps, pages of 2 commits."""
    ckpt = rb.Checkpointer(file_uri, run="exp1", flush_every=4, flush_seconds=None, segment_size=2)
    t = Trainer(3)
    for s in range(21):
        t.save(ckpt, s)
    before = {s: state_bytes(ckpt.restore(s)) for s in (0, 6, 19, 20)}  # the restore commits 17..20
    # commits: 0 root, 1 [0], 2 [1..4], 3 [5..8], 4 [9..12], 5 [13..16], 6 [17..20]
    assert [seq for seq, _ in committed(ckpt.store, "exp1")] == [1, 2, 3, 4, 5, 6]
    assert sealed_pages(ckpt.store, "exp1") == [(0, 1), (2, 3), (4, 5)]
    log = ckpt.log()
    assert [r["compacted"] for r in log] == [True] * 17 + [False] * 4
    fresh = rb.Reader(rb.open_store(file_uri), "exp1")
    for s in range(21):
        assert_matches_record(fresh.restore("main", s), t.rec, s)
    for s, b in before.items():
        assert state_bytes(fresh.restore("main", s)) == b


# -- fencing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("takeover", ["save", "acquire"])
def test_stale_checkpointer_is_fenced(uri, takeover):
    """A takes the branch, B takes it over (its first save, or acquire()): A's next commit is
    refused with FencedError naming the branch, the steps and both epochs; nothing of A's is
    committed after B's fence, and every step committed before restores unchanged."""
    store = rb.open_store(uri)  # the view of a third process
    a = rb.Checkpointer(rb.open_store(uri), run="exp1", flush_every=3, flush_seconds=None, segment_size=4)
    ta = Trainer(0)
    for s in range(7):  # commits [0], [1, 2, 3], [4, 5, 6]
        ta.save(a, s)
    a.flush()  # (nothing open: step 6 closed its group)
    assert a.epoch == 1
    reader = rb.Reader(store, "exp1")
    before = {s: state_bytes(reader.restore("main", s)) for s in range(7)}

    b = rb.Checkpointer(rb.open_store(uri), run="exp1", segment_size=4)
    assert b.epoch is None
    tb = Trainer(5)
    if takeover == "acquire":
        assert b.acquire() == 2
    else:
        tb.save(b, 7)  # its first save registers it (the fence commit, before save returns) …
        b.flush()  # … and step 7 is committed
    assert b.epoch == 2
    b_steps = [7] if takeover == "save" else []

    ta.save(a, 7)
    ta.save(a, 8)  # open: nothing reaches the store yet
    ta.save(a, 9)  # closes the group: its commit, behind the training thread, is refused …
    with pytest.raises(FencedError) as ei:
        a.flush()  # … and the next call raises it
    msg = str(ei.value)
    assert "\n" not in msg
    assert "'main'" in msg and "steps 7..9" in msg and "epoch 1" in msg and "epoch 2" in msg, msg
    assert "not committed" in msg

    assert [st for _, steps in committed(store, "exp1") for st in steps] == list(range(7)) + b_steps
    fresh = rb.Reader(store, "exp1")
    for s in range(7):
        assert state_bytes(fresh.restore("main", s)) == before[s]
        assert state_bytes(a.restore(s)) == before[s]  # the stale one still reads
    # the new writer goes on from the head it found (A's step 6), bit for bit
    start = 8 if takeover == "save" else 7
    for s in range(start, start + 3):
        tb.save(b, s)
    log = b.log()
    assert [r["step"] for r in log] == list(range(start + 3))
    assert log[7]["parent"] == ["main", 6] and log[7]["kind"] == "delta"
    fresh = rb.Reader(store, "exp1")
    for s in range(7, start + 3):
        assert_matches_record(fresh.restore("main", s), tb.rec, s)
    for s in range(7):
        assert state_bytes(fresh.restore("main", s)) == before[s]
    assert verify_store(store, "exp1").problems == []


def test_fenced_single_save_writes_no_commit(file_uri):
    """flush_every=1, inline: the stale writer's very next save is refused; the branch's commits are B's."""
    a = rb.Checkpointer(file_uri, run="exp1", flush_every=1, background=False)
    ta = Trainer(0)
    for s in range(3):
        ta.save(a, s)
    b = rb.Checkpointer(file_uri, run="exp1", flush_every=1)
    b.acquire()
    heads = committed(rb.open_store(file_uri), "exp1")
    with pytest.raises(FencedError, match=r"step 3 of branch 'main'.*epoch 1 was fenced by epoch 2"):
        ta.save(a, 3)
    assert committed(rb.open_store(file_uri), "exp1") == heads
    assert a.epoch is None and b.epoch == 2
    # it stays fenced: saving again never takes the branch back behind B's back …
    for s in (4, 5):
        with pytest.raises(FencedError, match="stays fenced"):
            ta.save(a, s)
    assert committed(rb.open_store(file_uri), "exp1") == heads
    # … only an explicit acquire() does, with a newer epoch that in turn fences B
    assert a.acquire() == 3
    ta.save(a, 6)
    Trainer(1).save(b, 7)  # B's commit behind its training thread is refused: its next call says so
    with pytest.raises(FencedError, match=r"step 7 of branch 'main'.*epoch 2"):
        b.flush()
