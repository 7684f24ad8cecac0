"""The checkpoint actor on a real local Ray (one cluster for the module): the actor runs the plain
Checkpointer's pipeline, so its saves restore bit for bit like a plain Checkpointer's and store
the same payloads in the same commits; backpressure bounds the saves in flight; errors in the
actor reach the training side with their message; store failures are retried and every
checkpoint verifies afterwards; a writer that takes the branch over fences the actor."""
from __future__ import annotations

import copy
import itertools
import random
import time

import pytest
import torch
from torch import nn

import raybranch as rb
from raybranch.checkpoint.training_state import collect, to_buffer
from raybranch.cluster.actor import AsyncCheckpointer, RetryPolicy
from raybranch.errors import FencedError, NonFiniteError, RaybranchError, StoreError
from raybranch.ledger.lineage import Lineage
from raybranch.ledger.records import pages_dir
from raybranch.ledger.refs import list_branch_names, read_branch_ref
from raybranch.ledger.verify import verify_store
from raybranch.store.blob import read_blob
from raybranch.store.store import Store
from raybranch.store.uri import parse_uri

torch.set_num_threads(1)


pytestmark = pytest.mark.usefixtures("local_ray")


# -- test doubles of the store's speed and reliability (the writes themselves are real) ----------
# A write is any of write_bytes (overwrite), create (exclusive create: blobs, commits, pages,
# layouts) and cas (refs).
class SlowStore(Store):
    """A file store whose every write takes ``DELAY`` s longer."""

    DELAY = 0.04

    def write_bytes(self, rel, data):
        time.sleep(self.DELAY)
        Store.write_bytes(self, rel, data)

    def create(self, rel, data):
        time.sleep(self.DELAY)
        return Store.create(self, rel, data)

    def cas(self, rel, data, expect):
        time.sleep(self.DELAY)
        return Store.cas(self, rel, data, expect)


class FlakyStore(Store):
    """A real store whose first three writes fail; after that each write fails with probability
    0.2 or lands but reports a failure (a lost acknowledgement) with probability 0.1, and each
    delete fails with probability 0.25. The faults come from a seeded generator: the same ones on
    every run (a fixed period would beat in step with the writes of a save)."""

    def __init__(self, location):
        super().__init__(location)
        self.writes = itertools.count(1)
        self.rng = random.Random(5)

    def _write(self, rel, do):
        n, u = next(self.writes), self.rng.random()
        if n <= 3 or u < 0.2:
            raise StoreError(f"injected failure of write #{n} ({rel})")
        out = do()
        if u < 0.3:
            raise StoreError(f"injected lost acknowledgement of write #{n} ({rel})")
        return out

    def write_bytes(self, rel, data):
        self._write(rel, lambda: Store.write_bytes(self, rel, data))

    def create(self, rel, data):
        return self._write(rel, lambda: Store.create(self, rel, data))

    def cas(self, rel, data, expect):
        return self._write(rel, lambda: Store.cas(self, rel, data, expect))

    def delete(self, rel):
        if self.rng.random() < 0.25:
            raise StoreError(f"injected failure of delete ({rel})")
        super().delete(rel)


def open_slow(uri: str) -> Store:
    return SlowStore(parse_uri(uri))


def open_flaky(uri: str) -> Store:
    return FlakyStore(parse_uri(uri))


# at FlakyStore's failure rate a commit (layout, blob, record) may need more than the default 8 attempts
FAST_RETRY = RetryPolicy(attempts=16, base_s=0.005, cap_s=0.05)


# -- a small model with every kind of tensor ------------------------------------------------------
class Net(nn.Module):
    """Linear → BatchNorm (int64 counter) → Linear, plus a bfloat16 buffer and a 3-entry bias."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 3)
        self.register_buffer("scale", torch.linspace(-1, 1, 16).to(torch.bfloat16))

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))) * self.scale.float())


def trajectory(steps: int, seed: int = 0):
    """(model, optimizer) after each SGD step, as deep copies of their states."""
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = torch.randn(8, 12, generator=g)
        loss = (model(x) - torch.randn(8, 3, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.scale.add_(0.01)
        yield step, model, opt


def assert_same_restore(a: dict, b: dict) -> None:
    assert list(a["model"]) == list(b["model"])
    for k in b["model"]:
        assert a["model"][k].dtype == b["model"][k].dtype, k
        assert torch.equal(a["model"][k], b["model"][k]), k
    if b["optimizer"] is None:
        assert a["optimizer"] is None
    else:
        assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
        for pid, entry in b["optimizer"]["state"].items():
            for key, val in entry.items():
                assert torch.equal(a["optimizer"]["state"][pid][key], val), (pid, key)
    if b["rng"] is not None:
        assert a["rng"]["meta"] == b["rng"]["meta"]
        for k, v in b["rng"]["tensors"].items():
            assert torch.equal(a["rng"]["tensors"][k], v), k
    assert a["extra"].keys() == b["extra"].keys()
    for k, v in b["extra"].items():
        assert torch.equal(a["extra"][k], v) if isinstance(v, torch.Tensor) else a["extra"][k] == v


def rows_of(uri: str, run: str) -> dict:
    """(step, name, kind) → (payload bytes, table bytes) of every row in the run's blobs."""
    store = rb.open_store(uri)
    out = {}
    for item in store.list(f"{run}/blobs"):
        for r in read_blob(store.read_bytes(item.rel))[0]:
            out[(r.step, r.name, r.kind)] = (bytes(r.payload), None if r.table is None else r.table.tobytes())
    return out


def pages(uri: str, run: str, branch: str = "main") -> list[str]:
    """The sealed pages of a branch (``<first seq>-<last seq>.g<gen>.json.zst``)."""
    store = rb.open_store(uri)
    bid = Lineage(store, run, branch).log.bid
    return sorted(i.base_name for i in store.list(pages_dir(run, bid)))


def unreferenced_blobs(uri: str, run: str, branch: str = "main") -> set[str]:
    """Blobs of the run that no checkpoint of the branch names (what gc would free)."""
    store = rb.open_store(uri)
    named = {p["blob"][0] for e in Lineage(store, run, branch).all_entries() for p in e["parts"]}
    return {i.base_name.removesuffix(".arrow") for i in store.list(f"{run}/blobs")} - named


def verified_steps(uri: str, run: str, orphans_ok: bool = False) -> int:
    """verify_store finds nothing wrong with the run; returns the number of steps it checked.

    ``orphans_ok``: except branch directories that no ref names and that hold no commit — what a
    store error between a new branch's branch.json and its commit 0 leaves (garbage for gc; the
    retry creates the branch again under a new id)."""
    store = rb.open_store(uri)
    rep = verify_store(store, run)
    problems = rep.problems
    if orphans_ok:
        named = {read_branch_ref(store, run, n).doc["branch_id"] for n in list_branch_names(store, run, live_only=False)}
        orphans = {f"branch {run}/branches/{bid} has no commits" for bid in store.list_dirs(f"{run}/branches") if bid not in named}
        problems = [p for p in problems if p not in orphans]
    assert problems == []
    return rep.counts["steps"]


# -- tests -----------------------------------------------------------------------------------------
def test_actor_and_plain_checkpointer_store_the_same_payloads_and_restore_bit_identically(file_uri, tmp_path):
    ref_uri = "file://" + str(tmp_path / "reference")
    opts = dict(key_every=5, flush_every=3, flush_seconds=None)  # groups by step count only: the same in both
    sync = rb.Checkpointer(rb.open_store(ref_uri), "r1", "main", **opts)
    async_ = AsyncCheckpointer(file_uri, "r1", "main", max_pending=3, **opts)
    for step, model, opt in trajectory(14):
        if step == 7:  # close and reopen mid-run: the new actor continues the branch from the store
            async_.close()  # ...sending its saves three to an actor call from here on
            async_ = AsyncCheckpointer(file_uri, "r1", "main", max_pending=3, batch=3, **opts)
            sync.close()
            sync = rb.Checkpointer(rb.open_store(ref_uri), "r1", "main", **opts)
        extra = {"epoch": step // 4, "ema": model.fc2.bias.detach() * 0.5}
        cid = async_.save(step, model, opt, extra, slices=[step // 5], tags=["t"] if step == 9 else None)
        assert cid == sync.save(step, model, opt, extra, slices=[step // 5], tags=["t"] if step == 9 else None)
    async_.close()
    sync.close()

    reader = rb.Checkpointer(rb.open_store(file_uri), "r1", "main")
    for step in range(14):
        assert_same_restore(reader.restore(step), sync.restore(step))
    # the same commits (the reopened actor registered as a new writer where the new plain one did)
    # holding the same rows, byte for byte
    drop = ("time", "bytes")
    assert [{k: v for k, v in e.items() if k not in drop} for e in reader.log()] == \
           [{k: v for k, v in e.items() if k not in drop} for e in sync.log()]
    ours, theirs = rows_of(file_uri, "r1"), rows_of(ref_uri, "r1")
    assert ours == theirs and {k[0] for k in ours} == set(range(14))
    assert verified_steps(file_uri, "r1") == 14


def test_saves_on_s3_restore_from_s3_in_this_process(s3_uri, s3_server):
    env = {"runtime_env": {"env_vars": dict(s3_server.env())}}  # the actor's own AWS environment
    ckpt = AsyncCheckpointer(s3_uri, "r2", "main", actor_options=env, flush_every=4)
    states = []
    for step, model, _ in trajectory(9):
        ckpt.save(step, model)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    ckpt.close()
    assert verified_steps(s3_uri, "r2") == 9
    totals = Lineage(rb.open_store(s3_uri), "r2", "main").log.totals
    assert totals["steps"] == 9 and totals["commits"] <= 5  # creation, fence, [0], [1..4], [5..8]
    store = rb.open_store(s3_uri)
    restored = rb.Reader(store, "r2").restore("main", 8)["model"]
    assert torch.equal(restored["bn.num_batches_tracked"], states[8]["bn.num_batches_tracked"])
    assert torch.equal(restored["fc2.bias"], states[8]["fc2.bias"])  # 3 entries: stored exactly
    err = (restored["fc1.weight"] - states[8]["fc1.weight"]).abs().max().item()
    assert 0 < err < 0.05  # lossy, error-fed: close, not exact


def test_backpressure_bounds_saves_in_flight_and_blocks_the_client(tmp_path):
    """A slow store fills the actor's pipeline (max_pending captures), which holds up the actor's
    calls, which blocks the client's saves once its own max_pending are in flight."""
    uri = "file://" + str(tmp_path / "slow")
    ckpt = AsyncCheckpointer(uri, "r3", "main", max_pending=2, store_factory=open_slow, flush_every=1)
    t0 = time.monotonic()
    for step, model, _ in trajectory(20):
        ckpt.save(step, model)
        assert ckpt.pending <= 2
    save_loop_s = time.monotonic() - t0
    ckpt.flush()
    ckpt.close()
    assert [e["step"] for e in ckpt.log()] == list(range(20))
    assert ckpt.stats["blocked"] >= 5
    # each commit writes ≥ 2 objects (blob, record) at ≥ 0.04 s each; at most 2 (client) + 8 (the
    # actor's queue) + 1 (being written) saves can be behind when the loop ends
    assert save_loop_s >= (20 - 11) * 2 * SlowStore.DELAY


def test_error_in_actor_fails_next_save_and_flush_with_its_message(file_uri, tmp_path):
    ckpt = AsyncCheckpointer(file_uri, "r4", "main", max_pending=1)
    sync = rb.Checkpointer(rb.open_store("file://" + str(tmp_path / "reference")), "r4", "main")
    steps = trajectory(8)
    for step, model, _ in itertools.islice(steps, 3):
        ckpt.save(step, model)
        sync.save(step, model)
    good = copy.deepcopy(model)
    with torch.no_grad():
        model.fc1.weight[2, 3] = float("nan")
    with pytest.raises(NonFiniteError) as original:
        sync.save(3, model)
    assert "fc1.weight" in str(original.value)
    with pytest.raises(NonFiniteError) as raised:
        ckpt.save(3, model)  # checked in the worker before the hand-over: nothing is queued
    assert str(raised.value) == str(original.value)
    ckpt.save(3, good)  # the branch accepts saves again (e.g. after a rollback)
    ckpt.save(2, good)  # refused in the actor: the error reaches the client with its type and message
    with pytest.raises(RaybranchError, match=r"^step 2 is not after the head of branch 'main' \(step 3\)$"):
        ckpt.flush()
    ckpt.flush()  # raised once, not again
    ckpt.save(4, good)
    assert [e["step"] for e in ckpt.log()] == [0, 1, 2, 3, 4]
    stats = ckpt.actor_stats()
    assert stats["failed"] == 1 and stats["saves"] == 5
    ckpt.close()


def test_transient_store_failures_are_retried_and_every_checkpoint_verifies(tmp_path):
    uri, ref_uri = ("file://" + str(tmp_path / d) for d in ("flaky", "reference"))
    opts = dict(key_every=6, flush_every=2, flush_seconds=None)
    ckpt = AsyncCheckpointer(uri, "r5", "main", retry=FAST_RETRY, store_factory=open_flaky, **opts)
    sync = rb.Checkpointer(rb.open_store(ref_uri), "r5", "main", **opts)
    for step, model, opt in trajectory(16):
        ckpt.save(step, model, opt)
        sync.save(step, model, opt)
    ckpt.flush()
    stats = ckpt.actor_stats()
    ckpt.close()
    sync.close()
    assert stats["retries"] >= 3 and stats["failed"] == 0  # the first three writes failed, at least
    # retried commits (a blob written twice is the same object; a record an attempt created before
    # its acknowledgement was lost is the writer's own): one chain, no step twice, nothing lost
    assert verified_steps(uri, "r5", orphans_ok=True) == 16
    store = rb.open_store(uri)
    reader = rb.Reader(store, "r5")
    for step in range(16):
        assert_same_restore(reader.restore("main", step), sync.restore(step))
    assert rows_of(uri, "r5") == rows_of(ref_uri, "r5")


def test_retries_are_bounded_and_the_last_error_is_raised(tmp_path):
    class DeadStore(Store):
        def write_bytes(self, rel, data):
            raise StoreError(f"cannot write {rel}: connection refused")

        def create(self, rel, data):
            self.write_bytes(rel, data)

        def cas(self, rel, data, expect):
            self.write_bytes(rel, data)

    ckpt = AsyncCheckpointer("file://" + str(tmp_path / "dead"), "r6", "main",
                             retry=RetryPolicy(attempts=3, base_s=0.001, cap_s=0.001),
                             store_factory=lambda uri: DeadStore(parse_uri(uri)))
    model = Net()
    ckpt.save(0, model)
    with pytest.raises(StoreError, match=r"registering the writer failed after 3 attempts: cannot write r6/.*connection refused"):
        ckpt.flush()
    assert ckpt.actor_stats()["retries"] == 2
    ckpt.close()


def test_bad_input_and_mismatched_settings(file_uri):
    with pytest.raises(RaybranchError, match="takes a store URI, not Store"):
        AsyncCheckpointer(rb.open_store(file_uri), "r7")
    with pytest.raises(RaybranchError, match="max_pending must be a positive integer, got 0"):
        AsyncCheckpointer(file_uri, "r7", max_pending=0)
    with pytest.raises(RaybranchError, match=r"batch must be an integer from 1 to max_pending \(16\), got 17"):
        AsyncCheckpointer(file_uri, "r7", batch=17)
    with pytest.raises(RaybranchError, match="branch name 'a/b'"):
        AsyncCheckpointer(file_uri, "r7", "a/b")
    with pytest.raises(RaybranchError, match="attempts >= 1"):
        RetryPolicy(attempts=0)
    first = AsyncCheckpointer(file_uri, "r7", "main", bits=3)
    with pytest.raises(RaybranchError, match=r"checkpoint actor 'raybranch-ckpt-r7-main' already runs with other settings"):
        AsyncCheckpointer(file_uri, "r7", "main", bits=4)
    first.close()
    second = AsyncCheckpointer(file_uri, "r7", "main", bits=4)  # the name is free after close
    second.close()


def test_a_batch_commits_in_order_and_stops_at_its_first_failure(file_uri):
    from raybranch.cluster.actor import CheckpointService, SaveSkippedError

    svc = CheckpointService(file_uri, "r8", "main", {"segment_size": 2})  # the actor's class, in this process
    items, bufs = [], []
    for step, model, _ in trajectory(5):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        if step == 2:
            state["fc1.weight"][0, 0] = float("nan")
        buf, doc = to_buffer(collect(state))
        bufs.append(buf.numpy())
        items.append((step, doc, [], [], False))
    out = svc.save_many(bufs, items)
    assert [o for o, _ in out] == ["ok", "ok", "error", "error", "error"]
    assert isinstance(out[2][1], NonFiniteError) and "fc1.weight" in str(out[2][1])
    assert isinstance(out[3][1], SaveSkippedError)
    assert str(out[3][1]).startswith("save of step 3 skipped: the save of step 2 failed: NonFiniteError: ")
    svc.clear_failure()
    assert svc.save_many(bufs[3:4], items[3:4])[0][0] == "ok"  # step 3 after the failed step 2
    svc.close()
    assert [e["step"] for e in rb.Checkpointer(rb.open_store(file_uri), "r8").log()] == [0, 1, 3]


def test_a_writer_that_takes_the_branch_over_fences_the_actor(file_uri):
    ckpt = AsyncCheckpointer(file_uri, "r9", "main", max_pending=2)
    steps = trajectory(6)
    for step, model, _ in itertools.islice(steps, 3):
        ckpt.save(step, model)
    ckpt.flush()
    other = rb.Checkpointer(rb.open_store(file_uri), "r9", "main")  # e.g. a worker restarted elsewhere
    epoch = other.acquire()
    assert epoch == ckpt.actor_stats()["epoch"] + 1
    step, model, _ = next(steps)
    ckpt.save(step, model)
    with pytest.raises(FencedError, match=rf"writer epoch {epoch - 1} was fenced by epoch {epoch}"):
        ckpt.flush()
    ckpt.save(4, model)  # the actor does not take the branch back: it stays fenced
    with pytest.raises(FencedError):
        ckpt.flush()
    assert other.save(3, model) == "r9/main/3"  # the new writer's commits were never touched
    other.close()
    assert [e["step"] for e in ckpt.log()] == [0, 1, 2, 3]
    stats = ckpt.actor_stats()
    assert stats["failed"] == 2 and stats["writers"] == 1 and "fenced" in stats["fenced"]
    ckpt.close()
    assert verified_steps(file_uri, "r9") == 4


def test_a_commit_whose_acknowledgement_was_lost_is_not_written_twice(file_uri):
    from raybranch.cluster.actor import CheckpointService

    class OneLostCommit(Store):
        """Step 2's commit lands, but its acknowledgement is lost."""

        lost = False

        def create(self, rel, data):
            created = Store.create(self, rel, data)
            if "/commits/" in rel and not self.lost and b'"step":2,' in data:
                self.lost = True
                raise StoreError(f"injected lost acknowledgement ({rel})")
            return created

    svc = CheckpointService(file_uri, "r10", "main", {"flush_every": 1}, FAST_RETRY, lambda uri: OneLostCommit(parse_uri(uri)))
    items, bufs = [], []
    for step, model, _ in trajectory(4):
        buf, doc = to_buffer(collect(model))
        bufs.append(buf.numpy())
        items.append((step, doc, [], [], False))
    assert [o for o, _ in svc.save_many(bufs, items)] == ["ok"] * 4
    svc.flush()
    stats = svc.get_stats()
    assert stats["retries"] == 1 and stats["found_committed"] == 1 and stats["writers"] == 1 and stats["failed"] == 0
    epoch = svc._ckpt.epoch
    svc.close()
    # step 2 committed once, by the one writer, and the chain goes on after it
    log = Lineage(rb.open_store(file_uri), "r10", "main").log
    assert [(e["step"], log.commit(e["seq"])["epoch"]) for e in log.all_entries()] == [(s, epoch) for s in range(4)]
    assert verified_steps(file_uri, "r10") == 4
