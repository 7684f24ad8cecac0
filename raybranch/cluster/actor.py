"""The checkpoint actor's client: Checkpointer.save off the training critical path.

    ckpt = AsyncCheckpointer("s3://bucket/ckpts", run="exp1", branch="main")
    for step in ...:
        ...  # optimizer.step()
        ckpt.save(step, model, optimizer)        # returns after copying the state to a CPU buffer
    ckpt.close()                                  # waits for every save

Data flow of one save::

    training worker                                CheckpointActor (one per run/branch)
      main thread: state → one byte buffer (copy)    Checkpointer.save: δ vs ũ, quantize, zstd,
      sender thread: ray.put ──ObjectRef──▶          blob, commit; every segment_size commits a
        (saves queued meanwhile go in one call)      page seal + compaction; retried with
      ≤ max_pending saves in flight                  backoff on StoreError / OSError

Only numpy byte buffers and JSON cross the process boundary (:mod:`.handoff`): no torch object
is pickled. The actor reads every tensor as a zero-copy view of the buffer in the object store
(read-only; the Checkpointer copies what it keeps). Saves of one branch are ordered: the actor
runs one call at a time, Ray runs the calls of one submitter in submission order, and a call's
saves run in order. What the actor does with a save — writer registration and fencing, retries
with the Checkpointer rebuilt from the store — is in :mod:`.service`.

Backpressure: at most ``max_pending`` saves are in flight per client; the next ``save`` waits for
the oldest to finish, so a slow store slows training down instead of growing memory. The save
that completes a page also seals it and compacts its blobs (it reads and rewrites them): the
queue absorbs that longer save, training waits for it only when the queue is full.

Errors: a save that fails for good (NaN/Inf, retries used up, a bad step, fenced by a newer
writer) is never swallowed. The actor refuses the saves queued after it (so a branch never
silently skips a step) and the client raises the original error, type and message, from its
next ``save``/``flush``/``close``. After that the branch accepts saves again (e.g. after rolling
back to the last good checkpoint) — except after a FencedError: another writer owns the branch.

Not here yet: a GPU worker quantizing on its own device and sending symbols instead of weights
(the actor encodes on its CPU; a CUDA state is copied to pinned memory asynchronously).
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import Callable

import ray
import torch

from ..checkpoint.checkpointer import branch_log
from ..checkpoint.restore import Reader
from ..errors import RaybranchError
from ..ledger.lineage import Lineage
from ..ledger.records import check_name
from ..store.store import Store, open_store
from .handoff import pack_state, unpack_state
from .service import (
    CheckpointActor,
    CheckpointActorError,
    CheckpointService,
    RetryPolicy,
    SaveSkippedError,
    actor_name,
)

DEFAULT_MAX_PENDING = 4


# -- the client --------------------------------------------------------------------------------
def _cause(exc: BaseException) -> BaseException:
    """The original exception inside a Ray error (same type, same message)."""
    if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(getattr(exc, "cause", None), BaseException):
        return exc.cause
    if isinstance(exc, ray.exceptions.RayActorError):
        return CheckpointActorError(f"the checkpoint actor died: {' '.join(str(exc).split())[:300]}")
    return exc


class _Ticket:
    """One save on its way: packed on the training thread, sent by the sender thread."""

    __slots__ = ("step", "sent", "ref", "index", "error")

    def __init__(self, step: int):
        self.step = step
        self.sent = threading.Event()
        self.ref = None  # the ObjectRef of the actor call that carries it, once sent
        self.index = 0  # its place in that call's batch
        self.error: BaseException | None = None  # ray.put / submission failed


class AsyncCheckpointer:
    """Checkpointer.save without the wait: hand the state to the branch's CheckpointActor.

    ``save`` copies the state into one CPU buffer (:func:`pack_state`, ~50 µs for LeNet-5) and
    returns; a sender thread puts the buffer in the object store and calls the actor, so neither
    the ``ray.put`` nor the call is on the training path. At most ``max_pending`` saves are in
    flight (packed, sent or being written); the next ``save`` waits for the oldest. ``batch`` > 1
    sends saves ``batch`` at a time (one ``ray.put`` and one actor call for them all, which
    divides Ray's fixed cost per call; a save then reaches the store up to ``batch`` − 1 steps
    later); saves that queue up while the sender is busy are merged into one call anyway.

    ``store`` is a URI (the actor opens it; nothing holding credentials is sent). Keyword
    arguments not named below go to :class:`~raybranch.Checkpointer` (codec, residual, bits, granularity,
    snapshot_every, segment_size, exact, min_lossy_numel, optimizer_codec, save_rng).
    ``actor_options`` are passed to ``CheckpointActor.options`` (default: 0 CPUs reserved, on
    this node when possible, so the object-store hand-over stays zero-copy). ``records`` keeps
    the last ``keep_records`` completed saves ({id, step, start, end}; monotonic clock).
    """

    def __init__(self, store: str, run: str, branch: str = "main", *, max_pending: int = DEFAULT_MAX_PENDING,
                 retry: RetryPolicy | None = None, store_factory: Callable[[str], Store] | None = None,
                 actor_options: dict | None = None, keep_records: int = 1000, batch: int = 1, **checkpointer_kwargs):
        if not isinstance(store, str):
            raise RaybranchError(f"AsyncCheckpointer takes a store URI, not {type(store).__name__}: the actor opens the store itself")
        if not isinstance(max_pending, int) or max_pending < 1:
            raise RaybranchError(f"max_pending must be a positive integer, got {max_pending!r}")
        if not isinstance(batch, int) or not 1 <= batch <= max_pending:
            raise RaybranchError(f"batch must be an integer from 1 to max_pending ({max_pending}), got {batch!r}")
        if "device" in checkpointer_kwargs:
            raise RaybranchError("device is not an AsyncCheckpointer option: the actor encodes on its own device")
        if checkpointer_kwargs.get("flush_every", 1) != 1:
            raise RaybranchError("flush_every is not an AsyncCheckpointer option: the actor commits every save")
        if not ray.is_initialized():
            raise RaybranchError("AsyncCheckpointer needs Ray: call ray.init() or run inside a Ray worker")
        self.uri, self.run, self.branch = store, check_name("run", run), check_name("branch", branch)
        self.max_pending, self.batch = max_pending, batch
        self.store_factory = store_factory
        self._save_rng = checkpointer_kwargs.get("save_rng")
        self.actor = self._attach(store, checkpointer_kwargs, retry, actor_options)
        self._pending: deque[_Ticket] = deque()
        self._unsent: list = []  # packed saves waiting for their batch to fill
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()  # batches for the sender thread
        self._free: deque[torch.Tensor] = deque(maxlen=max_pending)  # packing buffers the sender is done with
        self._sender: threading.Thread | None = None
        self.records: deque = deque(maxlen=keep_records)  # the latest completed saves: id, step, start, end
        self.stats = {"saves": 0, "blocked": 0, "blocked_s": 0.0, "handoff_s": 0.0}
        self._store: Store | None = None
        self._reader: Reader | None = None
        self._closed = False

    def _attach(self, store, checkpointer_kwargs, retry, actor_options):
        """The branch's actor: created here, or the running one when its settings match."""
        name = actor_name(self.run, self.branch)
        opts = {"num_cpus": 0, "name": name, "get_if_exists": True}
        if "scheduling_strategy" not in (actor_options or {}):
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
        opts.update(actor_options or {})
        opts["max_concurrency"] = 1  # saves of a branch must stay ordered
        want = {"store": store, "run": self.run, "branch": self.branch, "checkpointer": dict(checkpointer_kwargs)}
        deadline, delay = time.monotonic() + 20.0, 0.05
        while True:
            actor = CheckpointActor.options(**opts).remote(store, self.run, self.branch, checkpointer_kwargs, retry, self.store_factory)
            try:
                have = ray.get(actor.get_config.remote())
            except ray.exceptions.RayActorError as exc:
                if exc.actor_init_failed or time.monotonic() > deadline:
                    lines = [ln.strip() for ln in str(getattr(exc, "error_msg", exc)).splitlines() if ln.strip()]
                    raise CheckpointActorError(f"cannot start checkpoint actor {name!r}: {lines[-1] if lines else exc}") from None
                # the name still points at a dead actor (its owner, e.g. a killed worker, just died):
                # Ray frees the name shortly
                time.sleep(delay)
                delay = min(1.0, delay * 2)
                continue
            if have != want:
                raise RaybranchError(f"checkpoint actor {name!r} already runs with other settings ({have}); close it first")
            return actor

    # -- saving ---------------------------------------------------------------------------------
    def save(self, step: int, model, optimizer=None, extra: dict | None = None, *, slices=None, tags=None, snapshot: bool | None = None) -> str:
        """Queue a checkpoint of ``model`` at ``step``; returns the id it will have.

        Raises the error of an earlier save that failed (nothing of this step is queued then).
        Blocks while ``max_pending`` saves are in flight.
        """
        if self._closed:
            raise RaybranchError(f"AsyncCheckpointer of {self.run}/{self.branch} is closed")
        step = int(step)
        self._collect(keep=self.max_pending - 1)
        t0 = time.perf_counter()
        rng = self._save_rng if self._save_rng is not None else optimizer is not None
        buf, meta = pack_state(model, optimizer, extra, rng, alloc=self._alloc)
        copied = None
        if buf.is_pinned():  # asynchronous copies from the GPU: the sender waits for them, not us
            copied = torch.cuda.Event()
            copied.record()
        ticket = _Ticket(step)
        self._pending.append(ticket)
        self._unsent.append((ticket, buf, copied, meta, list(slices or []), list(tags or []), snapshot))
        if len(self._unsent) >= self.batch:
            self._release()
        self.stats["handoff_s"] += time.perf_counter() - t0
        self.stats["saves"] += 1
        return f"{self.run}/{self.branch}/{step}"

    def _release(self) -> None:
        """Hand the saves packed so far to the sender thread, as one batch."""
        if not self._unsent:
            return
        if self._sender is None:
            self._sender = threading.Thread(target=self._send_loop, name=f"raybranch-send-{self.branch}", daemon=True)
            self._sender.start()
        self._outbox.put(self._unsent)
        self._unsent = []

    def _send_loop(self) -> None:
        """Send what the training thread packed: every save queued by now in one ``ray.put`` and
        one actor call, so Ray's fixed cost per call is shared when the sender falls behind."""
        while True:
            batches = [self._outbox.get()]
            while batches[-1] is not None:
                try:
                    batches.append(self._outbox.get_nowait())
                except queue.Empty:
                    break
            stop = batches[-1] is None
            batch = [item for b in batches if b is not None for item in b]
            if batch:
                self._send(batch)
            if stop:
                return

    def _send(self, batch: list) -> None:
        tickets = [item[0] for item in batch]
        try:
            for _, _, copied, *_ in batch:
                if copied is not None:
                    copied.synchronize()
            ref = ray.put([item[1].numpy() for item in batch])  # one copy into the object store
            self._free.extend(item[1] for item in batch)
            call = self.actor.save_many.remote(ref, [(t.step, *item[3:]) for t, item in zip(tickets, batch)])
            for i, t in enumerate(tickets):
                t.ref, t.index = call, i
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread
            for t in tickets:
                t.error = exc
        finally:
            del batch
            for t in tickets:
                t.sent.set()

    def _alloc(self, n: int, pinned: bool) -> torch.Tensor:
        """A free packing buffer of ``n`` bytes (reused: no fresh pages to fault in or pin every step)."""
        try:
            buf = self._free.pop()
        except IndexError:
            buf = None
        if buf is None or buf.numel() != n or buf.is_pinned() != pinned:
            buf = torch.empty(n, dtype=torch.uint8, pin_memory=pinned)
        return buf

    @property
    def pending(self) -> int:
        """Saves handed over and not yet seen finished."""
        return len(self._pending)

    def flush(self) -> None:
        """Wait for every pending save; raise the first error."""
        self._collect(keep=0)

    def close(self, terminate: bool = True) -> None:
        """flush (every save is then committed) and (``terminate``) let the actor exit."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        if self._sender is not None:
            self._outbox.put(None)
            self._sender.join()
        self._get(self.actor.close.remote())
        if terminate:
            self._terminate()

    def _terminate(self) -> None:
        """End the actor (idle: every save is flushed) and wait until its name is free again.

        ``ray.kill``, not ``__ray_terminate__``: after a graceful exit Ray 2.60 keeps the name
        registered to the dead actor, and ``get_if_exists`` would keep handing that one out.
        """
        ray.kill(self.actor, no_restart=True)
        name, deadline, delay = actor_name(self.run, self.branch), time.monotonic() + 10.0, 0.005
        while time.monotonic() < deadline:
            try:
                if ray.get_actor(name)._actor_id != self.actor._actor_id:
                    return  # someone already started a new one
            except ValueError:
                return
            time.sleep(delay)
            delay = min(0.2, delay * 2)

    def _collect(self, keep: int) -> None:
        """Take finished saves off the queue, waiting on the oldest while more than ``keep`` remain."""
        sent = list({t.ref: None for t in self._pending if t.sent.is_set() and t.ref is not None})
        done = set(ray.wait(sent, num_returns=len(sent), timeout=0)[0]) if sent else set()
        while self._pending and self._pending[0].sent.is_set() and (self._pending[0].error or self._pending[0].ref in done):
            self._finish(self._pending.popleft())
        while len(self._pending) > keep:
            t0 = time.perf_counter()
            ticket = self._pending[0]
            if not ticket.sent.is_set() and self._unsent and self._unsent[0][0] is ticket:
                self._release()  # it waits for its batch to fill: send what there is
            ticket.sent.wait()
            if ticket.ref is not None:
                ray.wait([ticket.ref], num_returns=1)
            self.stats["blocked"] += 1
            self.stats["blocked_s"] += time.perf_counter() - t0
            self._finish(self._pending.popleft())

    def _finish(self, ticket: _Ticket) -> None:
        try:
            if ticket.error is not None:
                raise ticket.error
            outcome, value = ray.get(ticket.ref)[ticket.index]
            if outcome != "ok":
                raise value
            self.records.append(value)
        except Exception as exc:  # noqa: BLE001 - re-raised below, never swallowed
            first = _cause(exc)
            unsent = {id(item[0]) for item in self._unsent}  # never sent: dropped with the rest
            self._unsent = []
            for t in self._pending:  # the actor refuses the saves queued after a failure: drain them
                if id(t) in unsent:
                    continue
                t.sent.wait()
                if t.ref is not None:
                    try:
                        ray.get(t.ref)
                    except Exception:  # noqa: BLE001 - follows from `first`
                        pass
            self._pending.clear()
            if not isinstance(first, CheckpointActorError):
                self._get(self.actor.clear_failure.remote())
            raise first from None

    def _get(self, ref):
        try:
            return ray.get(ref)
        except Exception as exc:  # noqa: BLE001
            raise _cause(exc) from None

    # -- reading --------------------------------------------------------------------------------
    @property
    def store(self) -> Store:
        """The store, opened in this process (for reading: the actor writes through its own)."""
        if self._store is None:
            self._store = (self.store_factory or open_store)(self.uri)
        return self._store

    @property
    def reader(self) -> Reader:
        """A Reader of the run in this process (it caches blobs; see :meth:`restore`)."""
        if self._reader is None:
            self._reader = Reader(self.store, self.run)
        return self._reader

    def restore(self, step: int | None = None, branch: str | None = None) -> dict:
        """flush, then restore from the store in this process (see :meth:`Checkpointer.restore`)."""
        self.flush()
        b = branch or self.branch
        self.reader.lineage(b, refresh=True)  # the branch has moved on since the Reader last looked
        return self.reader.restore(b, step)

    def log(self, branch: str | None = None) -> list[dict]:
        """flush, then every committed checkpoint of the branch, oldest first (a forked branch
        starts with its fork point, kind "fork"), as :meth:`Checkpointer.log` gives them."""
        self.flush()
        return branch_log(Lineage(self.store, self.run, branch or self.branch))

    def head(self) -> dict | None:
        self.flush()
        return self._get(self.actor.head.remote())

    def actor_stats(self) -> dict:
        """The actor's counters: saves, retries, failed, skipped, busy_s."""
        return self._get(self.actor.get_stats.remote())

    def __enter__(self) -> "AsyncCheckpointer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


__all__ = [
    "AsyncCheckpointer",
    "CheckpointActor",
    "CheckpointActorError",
    "CheckpointService",
    "RetryPolicy",
    "SaveSkippedError",
    "actor_name",
    "pack_state",
    "unpack_state",
]
