"""A store that fails at the wrong moment must not break a branch's chain.

A failed group commit loses exactly that group (the error names its steps) and the next save
goes on from the last commit; a failed seal after a commit loses nothing (a warning, and the
next commit finishes it).

The tests inject one failure and turn the group commit's retries off (``RetryPolicy(attempts=1)``)
so that it surfaces. With ``background=False`` it is raised by the save whose commit hit it; in
the background pipeline by the next call (here ``flush``)."""
import pytest
import torch

import raybranch as rb
from raybranch.checkpoint.group import RetryPolicy
from raybranch.errors import NotFoundError, StoreError
from raybranch.ledger.verify import verify_store
from raybranch.store.store import Store
from raybranch.store.uri import parse_uri

from ckpt_testkit import MEMORYLESS, Recorder, assert_matches_record, branch_id, commit_seqs, committed, make_model, sealed_pages, sgd_step

ONE_ATTEMPT = RetryPolicy(attempts=1)


def _fails_at_commit(ck, background, save):
    """``save()`` makes the commit that fails: the StoreError it raises (inline), or that the
    next ``flush`` raises (background)."""
    if background:
        save()
        with pytest.raises(StoreError) as ei:
            ck.flush()
    else:
        with pytest.raises(StoreError) as ei:
            save()
    return ei


class FlakyStore(Store):
    """A real file store whose chosen operations raise StoreError a set number of times;
    ``only`` restricts the failures to paths containing that string."""

    def __init__(self, uri, fail_reads=0, fail_deletes=0, fail_creates=0, fail_writes=0, only=""):
        super().__init__(parse_uri(uri))
        self.fail_reads, self.fail_deletes, self.fail_creates, self.fail_writes = fail_reads, fail_deletes, fail_creates, fail_writes
        self.only = only

    def _fail(self, what, rel):
        n = getattr(self, what)
        if n and self.only in rel:
            setattr(self, what, n - 1)
            raise StoreError(f"injected {what.removeprefix('fail_')[:-1]} failure of {rel}")

    def read_bytes(self, rel):
        self._fail("fail_reads", rel)
        return super().read_bytes(rel)

    def delete(self, rel):
        self._fail("fail_deletes", rel)
        return super().delete(rel)

    def create(self, rel, data):
        self._fail("fail_creates", rel)
        return super().create(rel, data)

    def write_bytes(self, rel, data):
        self._fail("fail_writes", rel)
        return super().write_bytes(rel, data)


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Linear(16, 8)


def _states(n, seed=0):
    """n (step, state_dict) of a short SGD run of the checkpoint tests' TinyNet."""
    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed + 1)
    out = []
    for step in range(n):
        sgd_step(model, opt, gen)
        out.append((step, {k: v.clone() for k, v in model.state_dict().items()}))
    return out


def test_failed_head_read_is_retried_not_a_new_chain(file_uri):
    m = _model(0)
    ck = rb.Checkpointer(file_uri, "r", "main")
    for s in range(3):
        with torch.no_grad():
            m.weight.add_(0.01)
        ck.save(s, m)
    ck.close()
    flaky = FlakyStore(file_uri, fail_reads=1)
    resumed = rb.Checkpointer(flaky, "r", "main")
    with pytest.raises(StoreError):
        resumed.save(3, m)
    resumed.save(3, m)  # the head is read again, not forgotten
    rec = resumed.log()[-1]
    assert rec["kind"] == "delta" and rec["parent"] == ["main", 2]


@pytest.mark.parametrize("background", [True, False], ids=["background", "inline"])
@pytest.mark.parametrize("where", ["/blobs/", "/commits/"], ids=["blob-write", "commit-create"])
def test_failed_group_commit_loses_the_group_and_the_chain_goes_on(file_uri, tmp_path, where, background):
    states = dict(_states(13))
    # ground truth: a clean store that never saw steps 5..8
    ref = rb.Checkpointer("file://" + str(tmp_path / "ref"), "r", "main", flush_every=4, segment_size=3, **MEMORYLESS)
    ref_rec = Recorder()
    for s in [0, 1, 2, 3, 4, 9, 10, 11, 12]:
        ref_rec.save(ref, s, states[s])
    ref.close()

    flaky = FlakyStore(file_uri, only=where)
    ck = rb.Checkpointer(flaky, "r", "main", flush_every=4, flush_seconds=None, segment_size=3, retry=ONE_ATTEMPT,
                         background=background, **MEMORYLESS)
    rec = Recorder()
    for s in range(5):
        rec.save(ck, s, states[s])  # commits: [0] (the snapshot), [1..4]
    ck.flush()  # (nothing open: step 4 closed its group)
    assert committed(flaky, "r") == [(1, [0]), (2, [1, 2, 3, 4])]
    flaky.fail_creates = 1  # the next group's blob (or its commit record) cannot be created
    for s in range(5, 8):
        rec.save(ck, s, states[s])
    ei = _fails_at_commit(ck, background, lambda: ck.save(8, states[8]))
    msg = str(ei.value)
    assert "steps 5..8" in msg and "'main'" in msg and "not committed" in msg and "injected" in msg and "\n" not in msg
    assert committed(flaky, "r") == [(1, [0]), (2, [1, 2, 3, 4])]  # nothing of the group

    for s in range(9, 13):  # the next save rebuilds the writer from the last commit (step 4)
        rec.save(ck, s, states[s])
    ck.close()
    log = ck.log()
    assert [r["step"] for r in log] == [0, 1, 2, 3, 4, 9, 10, 11, 12]
    assert log[5]["parent"] == ["main", 4] and log[5]["kind"] == "delta" and log[5]["depth"] == 5
    # the chain after the failure is the one a store that never saw the failed group holds, bit for bit
    for s in (9, 10, 11, 12):
        for g, r in ref_rec.recon[s].items():
            assert torch.equal(rec.recon[s][g].view(torch.int32), r.view(torch.int32))
    fresh = rb.Reader(rb.open_store(file_uri), "r")
    for s in [0, 1, 2, 3, 4, 9, 10, 11, 12]:
        assert_matches_record(fresh.restore("main", s), rec, s)
    for s in range(5, 9):
        with pytest.raises(NotFoundError, match=f"step {s}"):
            fresh.restore("main", s)
    rep = verify_store(rb.open_store(file_uri), "r")
    assert rep.problems == [] and rep.counts["steps"] == 9


@pytest.mark.parametrize(
    "fail", [dict(fail_deletes=1), dict(fail_creates=1, only="/pages/"), dict(fail_writes=1, only="top.json")],
    ids=["delete", "page-create", "top-write"],
)
def test_failed_seal_keeps_the_save_and_the_branch(file_uri, fail):
    m = _model(1)
    flaky = FlakyStore(file_uri, **fail)
    ck = rb.Checkpointer(flaky, "r", "main", segment_size=3, flush_every=1)  # one commit per save
    with pytest.warns(UserWarning, match="committed, but sealing"):
        for s in range(8):
            with torch.no_grad():
                m.weight.add_(0.01 * (s + 1))
            assert ck.save(s, m) == f"r/main/{s}"
        ck.close()  # the commits (and seals) behind the training thread are done
    log = ck.log()
    assert [r["step"] for r in log] == list(range(8))
    # commits 0..8: every page sealed (one cut short is finished by a later commit), every step compacted
    assert sealed_pages(flaky, "r") == [(0, 2), (3, 5), (6, 8)] and all(r["compacted"] for r in log)
    rep = verify_store(rb.open_store(file_uri), "r")
    assert rep.problems == [] and rep.counts["steps"] == 8
    fresh = rb.Reader(rb.open_store(file_uri), "r")
    for s in range(8):
        assert torch.equal(fresh.restore("main", s)["model"]["weight"], ck.restore(s)["model"]["weight"])


def test_seal_cut_short_is_finished_by_the_next_writer(file_uri):
    """A page created but not yet listed in top.json (its writer died, here: top.json could not
    be written and the writer went away): the next writer seals that page again, keeps the page
    that exists, and deletes nothing it references."""
    states = _states(9)
    flaky = FlakyStore(file_uri, fail_writes=1, only="top.json")
    first = rb.Checkpointer(flaky, "r", "main", segment_size=3, flush_every=1)  # one commit per save
    rec = Recorder()
    with pytest.warns(UserWarning, match="sealing"):
        for s, sd in states[:3]:  # commits 0..3: page 0-2 created, top.json not written
            rec.save(first, s, sd)
        first.close()  # its commits are done (close seals nothing: only a commit does)
    del first
    store = rb.open_store(file_uri)
    assert not store.exists(f"r/branches/{branch_id(store, 'r')}/top.json")
    assert commit_seqs(store, "r") == [0, 1, 2, 3]
    nxt = rb.Checkpointer(store, "r", "main", segment_size=3, flush_every=1)
    for s, sd in states[3:]:
        rec.save(nxt, s, sd)
    nxt.close()
    # the fence commit 4, then steps 3..8 as commits 5..10: pages 0-2 (again), 3-5, 6-8 sealed
    assert sealed_pages(store, "r") == [(0, 2), (3, 5), (6, 8)]
    rep = verify_store(rb.open_store(file_uri), "r")
    assert rep.problems == [] and rep.counts["steps"] == 9
    fresh = rb.Reader(rb.open_store(file_uri), "r")
    for s in range(9):
        assert_matches_record(fresh.restore("main", s), rec, s)


@pytest.mark.parametrize("background", [True, False], ids=["background", "inline"])
def test_failed_commit_keeps_the_epoch_and_never_takes_the_branch_back(file_uri, background):
    """A store error is no takeover: the writer continues under its own epoch, and when a newer
    writer registered while it was cut off, it is fenced instead of fencing the newcomer."""
    m = _model(0)
    flaky = FlakyStore(file_uri, only="/commits/")
    ck = rb.Checkpointer(flaky, "r", "main", flush_every=1, retry=ONE_ATTEMPT, background=background)
    for s in range(3):
        ck.save(s, m)
    ck.flush()
    epoch = ck.epoch
    flaky.fail_creates = 1
    _fails_at_commit(ck, background, lambda: ck.save(3, m))
    ck.save(4, m)  # rejoins: no fence commit, same epoch
    assert ck.epoch == epoch
    assert [r["kind"] for r in ck.log()] == ["snapshot", "delta", "delta", "delta"]

    flaky.fail_creates = 1
    _fails_at_commit(ck, background, lambda: ck.save(5, m))
    newer = rb.Checkpointer(file_uri, "r", "main")
    assert newer.acquire() == epoch + 1
    from raybranch.errors import FencedError

    for s in (6, 7):
        with pytest.raises(FencedError):
            ck.save(s, m)
    newer.save(6, m)
    assert [r["step"] for r in newer.log()] == [0, 1, 2, 4, 6]
