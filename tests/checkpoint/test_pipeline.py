"""The save pipeline (capture on the training thread; encode and group commit behind it): group
commits and their window, flush, restore of open-group steps, backpressure, background failures
raised by the next call, SIGKILL during a group, and the GPU path where CUDA exists."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import raybranch as rb
from raybranch.checkpoint.group import RetryPolicy
from raybranch.errors import NonFiniteError, RaybranchError, StoreError
from raybranch.ledger.lineage import Lineage
from raybranch.ledger.verify import verify_store
from raybranch.store.blob import read_blob
from raybranch.store.store import Store
from raybranch.store.uri import parse_uri

from ckpt_testkit import make_model, sgd_step

NO_RETRY = RetryPolicy(attempts=1)


def walk(n: int, seed: int = 0):
    """(step, model, optimizer) after each SGD step of the tiny test model."""
    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for step in range(n):
        sgd_step(model, opt, g)
        yield step, model, opt


def commits(store, run: str, branch: str = "main") -> list[list[int]]:
    """The steps of each commit of a branch that holds steps, oldest first."""
    log = Lineage(store, run, branch).log
    out: dict[int, list[int]] = {}
    for e in log.all_entries():
        out.setdefault(e["seq"], []).append(e["step"])
    return [out[s] for s in sorted(out)]


def rows_of(store, run: str) -> dict:
    """(step, name, kind) → (payload bytes, table) of every row in the run's blobs."""
    out = {}
    for item in store.list(f"{run}/blobs"):
        for r in read_blob(store.read_bytes(item.rel))[0]:
            out[(r.step, r.name, r.kind)] = (bytes(r.payload), None if r.table is None else r.table.tobytes())
    return out


def recon_of(ckpt) -> dict[str, torch.Tensor]:
    """The writer's reconstruction of every lossy tensor (call after flush)."""
    out = {}
    for enc in ckpt._enc.encoders.values():
        for n, piece in zip(enc.names, torch.split(enc.recon, enc.sizes)):
            out[n] = piece
    return out


def test_group_commits_follow_the_window_and_flush_makes_every_step_restorable(file_uri):
    store = rb.open_store(file_uri)
    ckpt = rb.Checkpointer(store, "g", flush_every=4, flush_seconds=None, key_every=6)
    for step, model, _ in walk(15):
        ckpt.save(step, model, tags=["mid"] if step == 9 else None)
        if step == 9:  # a tagged save returns committed
            assert [s for c in commits(store, "g") for s in c][-1] == 9
    ckpt.flush()
    recon = recon_of(ckpt)
    # step 0 (the branch's first snapshot) alone; groups of 4; the key frame at depth 6 (step 6)
    # and the tagged (so exact) step 9 close their group; flush commits the rest
    assert commits(store, "g") == [[0], [1, 2, 3, 4], [5, 6], [7, 8, 9], [10, 11, 12, 13], [14]]
    other = rb.Reader(rb.open_store(file_uri), "g").restore("main", 14)["model"]  # another reader, another store object
    for n, t in recon.items():
        assert torch.equal(other[n].reshape(-1), t), n
    assert verify_store(store, "g").problems == []
    ckpt.close()


def test_the_seconds_window_commits_a_group_while_the_loop_pauses(file_uri):
    store = rb.open_store(file_uri)
    ckpt = rb.Checkpointer(store, "w", flush_every=1000, flush_seconds=0.3)
    for step, model, _ in walk(5):
        ckpt.save(step, model)
    deadline = time.monotonic() + 10
    while commits(store, "w") != [[0], [1, 2, 3, 4]]:  # nobody calls save, flush or close
        assert time.monotonic() < deadline, commits(store, "w")
        time.sleep(0.05)
    ckpt.close()


def test_restore_of_a_step_in_the_open_group(file_uri):
    """The NaN rollback: the last good step is still in the open group when NaN shows up."""
    ckpt = rb.Checkpointer(file_uri, "nan", flush_every=100, flush_seconds=None)
    for step, model, opt in walk(6):
        ckpt.save(step, model, opt)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"tensor 'fc.weight' holds NaN or Inf at step 6; nothing was saved"):
        ckpt.save(6, model, opt)
    state = ckpt.restore(5)
    assert state["step"] == 5
    assert torch.equal(state["model"]["fc.bias"], good["fc.bias"])  # exact tensor
    assert (state["model"]["fc.weight"] - good["fc.weight"]).abs().max() < 0.05
    model.load_state_dict(state["model"])
    ckpt.save(6, model, opt)  # training goes on from the rollback
    ckpt.close()
    assert [e["step"] for e in ckpt.log()] == list(range(7))


class SlowStore(Store):
    """Every blob write takes DELAY s longer."""

    DELAY = 0.05

    def put_blob(self, run, data):
        time.sleep(self.DELAY)
        return Store.put_blob(self, run, data)


def test_a_slow_store_blocks_capture_instead_of_growing_memory(tmp_path):
    store = SlowStore(parse_uri("file://" + str(tmp_path / "slow")))
    ckpt = rb.Checkpointer(store, "bp", flush_every=1, max_pending=2)
    seen = []
    t0 = time.monotonic()
    for step, model, _ in walk(12):
        ckpt.save(step, model)
        seen.append(ckpt._pipeline.pending())
    loop_s = time.monotonic() - t0
    ckpt.close()
    assert max(seen) <= 2  # never more than max_pending captures queued
    assert ckpt.timings["blocked_s"] > 0
    # 12 blob writes of 0.05 s: all but the ≤ 3 in flight at the end were waited for
    assert loop_s >= (12 - 3) * SlowStore.DELAY
    assert [e["step"] for e in ckpt.log()] == list(range(12))


class FailingBlobStore(Store):
    """Blob writes fail while ``down`` is set."""

    down = False

    def put_blob(self, run, data):
        if self.down:
            raise StoreError("injected: the store is unreachable")
        return Store.put_blob(self, run, data)


def test_a_failed_group_is_raised_by_the_next_call_and_training_goes_on(tmp_path):
    store = FailingBlobStore(parse_uri("file://" + str(tmp_path / "s")))
    ckpt = rb.Checkpointer(store, "f", flush_every=3, flush_seconds=None, retry=NO_RETRY)
    steps = walk(14)
    for step, model, _ in steps:
        ckpt.save(step, model)
        if step == 3:
            break
    ckpt.flush()  # committed: [0], [1, 2, 3]
    store.down = True
    for step, model, _ in steps:  # 4..6: the group fails behind the training thread
        ckpt.save(step, model)
        if step == 6:
            break
    ckpt._pipeline.wait()  # the group's commit has failed behind the training thread by now
    assert ckpt._pipeline.failed
    store.down = False
    step, model, _ = next(steps)
    with pytest.raises(StoreError, match=r"^steps 4\.\.6 of branch 'main' not committed: .*injected: the store is unreachable"):
        ckpt.save(step, model)  # step 7: nothing of it is queued
    for step, model, _ in steps:  # training goes on from the last commit
        ckpt.save(step, model)
    ckpt.close()
    assert [e["step"] for e in ckpt.log()] == [0, 1, 2, 3, 8, 9, 10, 11, 12, 13]
    assert verify_store(store, "f").problems == []
    # the chain after the gap starts from what the store holds: restores match the writer's reconstruction
    restored = ckpt.restore(13)["model"]
    for n, t in recon_of(ckpt).items():
        assert torch.equal(restored[n].reshape(-1), t), n


def test_a_failure_drops_the_captures_queued_behind_it_and_names_them(tmp_path):
    gate = threading.Event()

    class GatedStore(FailingBlobStore):
        def put_blob(self, run, data):
            gate.wait()
            return FailingBlobStore.put_blob(self, run, data)

    store = GatedStore(parse_uri("file://" + str(tmp_path / "s")))
    gate.set()
    ckpt = rb.Checkpointer(store, "q", flush_every=1, flush_seconds=None, retry=NO_RETRY, max_pending=8)
    steps = walk(10)
    step, model, _ = next(steps)
    ckpt.save(step, model)
    ckpt.flush()
    gate.clear()
    store.down = True
    for step, model, _ in steps:  # 1 fails; 2..5 wait behind it and are dropped
        ckpt.save(step, model)
        if step == 5:
            break
    gate.set()
    with pytest.raises(StoreError, match=r"^step 1 of branch 'main' not committed: .*; steps 2\.\.5, queued after it, were dropped$"):
        ckpt.flush()
    store.down = False
    ckpt.flush()  # raised once
    step, model, _ = next(steps)
    ckpt.save(step, model)
    ckpt.close()
    assert [e["step"] for e in ckpt.log()] == [0, 6]


def test_bad_pipeline_arguments():
    for kw, msg in [({"flush_every": 0}, "flush_every must be a positive"),
                    ({"flush_seconds": 0}, "flush_seconds must be a positive"),
                    ({"max_pending": 0}, "max_pending must be a positive")]:
        with pytest.raises(RaybranchError, match=msg):
            rb.Checkpointer("file:///tmp/never-written", "x", **kw)


def test_inline_pipeline_gives_the_same_store_as_the_thread(tmp_path):
    uris = ["file://" + str(tmp_path / d) for d in ("thread", "inline")]
    for uri, background in zip(uris, (True, False)):
        ckpt = rb.Checkpointer(uri, "i", flush_every=5, flush_seconds=None, background=background)
        for step, model, opt in walk(12):
            ckpt.save(step, model, opt, extra={"epoch": step // 4})
        ckpt.close()
    a, b = (rb.open_store(u) for u in uris)
    assert commits(a, "i") == commits(b, "i")
    assert rows_of(a, "i") == rows_of(b, "i")  # the same payloads


KILLED_WRITER = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    import raybranch as rb
    from test_pipeline import walk
    ckpt = rb.Checkpointer({uri!r}, "k", flush_every=4, flush_seconds=None, codec="lc")
    for step, model, _ in walk(10):
        ckpt.save(step, model)
        if step == 8:
            ckpt.flush()   # committed through 8
    print("open", flush=True)  # step 9 is in the open group
    time.sleep(60)
""")


def test_sigkill_during_a_group_keeps_what_was_committed(tmp_path):
    uri = "file://" + str(tmp_path / "k")
    code = KILLED_WRITER.format(tests=os.path.dirname(__file__), uri=uri)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "open"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(30)
    store = rb.open_store(uri)
    assert [s for c in commits(store, "k") for s in c] == list(range(9))  # step 9 was never committed
    assert verify_store(store, "k").problems == []
    ckpt = rb.Checkpointer(store, "k", flush_every=4, flush_seconds=None, codec="lc")  # a new writer resumes
    ref = rb.Checkpointer("file://" + str(tmp_path / "ref"), "k", flush_every=4, flush_seconds=None, codec="lc")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the child: the reference trains on the same floats
    try:
        for step, model, _ in walk(12):
            ref.save(step, model)
            if step >= 9:
                ckpt.save(step, model)
    finally:
        torch.set_num_threads(threads)
    ckpt.close()
    ref.close()
    assert [e["step"] for e in ckpt.log()] == list(range(12))
    for step in (3, 8, 11):  # LC codes step t from (u_t, ũ_{t−1}) alone: the resumed chain equals an uninterrupted one
        a, b = ckpt.restore(step)["model"], ref.restore(step)["model"]
        assert all(torch.equal(a[k], b[k]) for k in b), step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_state_restores_the_reconstruction_bit_for_bit(file_uri):
    model = make_model(0).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator(device="cuda").manual_seed(0)
    for device in (None, "cuda"):  # encoded on the CPU from pinned copies, and on the GPU
        ckpt = rb.Checkpointer(file_uri, "cuda", f"b{device}", device=device)
        for step in range(20):
            x = torch.randn(16, 1, 8, 8, device="cuda", generator=g)
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            ckpt.save(step, model, opt)
        ckpt.flush()
        restored = ckpt.restore(19)["model"]
        for n, t in recon_of(ckpt).items():
            assert torch.equal(restored[n].reshape(-1), t.cpu()), n
        ckpt.close()


def test_a_script_that_ends_without_close_loses_nothing(tmp_path):
    uri = "file://" + str(tmp_path / "e")
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import raybranch as rb
        from test_pipeline import walk
        ckpt = rb.Checkpointer({uri!r}, "e", flush_every=100, flush_seconds=None)
        for step, model, _ in walk(7):
            ckpt.save(step, model)
    """)  # no close(): the interpreter's exit drains the pipeline
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert [s for c in commits(rb.open_store(uri), "e") for s in c] == list(range(7))
