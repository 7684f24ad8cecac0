"""The checkpoint actor's client: Checkpointer.save off the training critical path.

    ckpt = AsyncCheckpointer("s3://bucket/ckpts", run="exp1", branch="main")
    for step in ...:
        ...  # optimizer.step()
        ckpt.save(step, model, optimizer)        # returns after copying the state to a CPU buffer
    ckpt.close()                                  # waits for every save

Data flow of one save::

    training worker                                CheckpointActor (one per run/branch)
      main thread: collect → one byte buffer (copy)  Checkpointer.save_state: the pipeline of a
      sender thread: ray.put ──ObjectRef──▶          plain Checkpointer (capture, then encode and
        (saves queued meanwhile go in one call)      group commit on its thread; store errors
      ≤ max_pending saves in flight                  retried with backoff)

Only numpy byte buffers and JSON cross the process boundary (:mod:`.handoff`, the transport;
:func:`~raybranch.checkpoint.training_state.to_buffer`): no torch object is pickled. The actor reads every tensor as a zero-copy view of the buffer in the object store
(read-only; the Checkpointer copies what it keeps). Saves of one branch are ordered: the actor
runs one call at a time, Ray runs the calls of one submitter in submission order, and a call's
saves run in order. What the actor does with a save — writer registration and fencing, retries
with the Checkpointer rebuilt from the store — is in :mod:`.service`.

Backpressure: at most ``max_pending`` saves are in flight per client; the next ``save`` waits for
the oldest to finish, so a slow store slows training down instead of growing memory. The actor's
Checkpointer group-commits (``flush_every``, ``flush_seconds``, as in a user's own loop): a save
is "finished" for the client once the actor has captured it; ``flush``/``close`` wait for the
commit.

Errors: a save that fails for good (NaN/Inf, retries used up, a bad step, fenced by a newer
writer) is never swallowed. The actor refuses the saves queued after it (so a branch never
silently skips a step) and the client raises the original error, type and message, from its
next ``save``/``flush``/``close``. After that the branch accepts saves again (e.g. after rolling
back to the last good checkpoint) — except after a FencedError: another writer owns the branch.

Not here yet: a GPU worker quantizing on its own device and sending symbols instead of weights
(the actor encodes on its CPU; a CUDA state is copied to pinned memory asynchronously). The
plain Checkpointer with ``device="cuda"`` encodes on the GPU, behind the training thread.
"""
from __future__ import annotations

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
from ..checkpoint.capture import check_state_finite
from ..checkpoint.training_state import TrainingState, collect, to_buffer
from .handoff import Sender, Ticket
from .service import (
    CheckpointActor,
    CheckpointActorError,
    CheckpointService,
    RetryPolicy,
    SaveSkippedError,
    actor_name,
)

DEFAULT_MAX_PENDING = 16
DEFAULT_BATCH = 8  # saves per actor call: Ray's cost per call shared (docs/BENCHMARKS.md: +74 % at 1, +32 % at 8)


# -- the client --------------------------------------------------------------------------------
def _cause(exc: BaseException) -> BaseException:
    """The original exception inside a Ray error (same type, same message)."""
    if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(getattr(exc, "cause", None), BaseException):
        return exc.cause
    if isinstance(exc, ray.exceptions.RayActorError):
        return CheckpointActorError(f"the checkpoint actor died: {' '.join(str(exc).split())[:300]}")
    return exc


class AsyncCheckpointer:
    """Checkpointer.save without the wait: hand the state to the branch's CheckpointActor.

    ``save`` copies the state into one CPU buffer (:func:`~raybranch.checkpoint.training_state.to_buffer`) and
    returns; a sender thread puts the buffer in the object store and calls the actor, so neither
    the ``ray.put`` nor the call is on the training path. At most ``max_pending`` saves are in
    flight (packed, sent or being captured by the actor); the next ``save`` waits for the oldest.
    Saves go ``batch`` at a time (default min(8, max_pending)): one ``ray.put`` and one actor call
    for them all, which divides Ray's fixed cost per call (on LeNet-5, +74 % step time at batch 1,
    +32 % at 8: docs/BENCHMARKS.md); a save then reaches the actor up to ``batch`` − 1 steps later,
    and ``flush``/``close`` send what is waiting. Saves that queue up while the sender is busy are
    merged into one call anyway.

    ``store`` is a URI (the actor opens it; nothing holding credentials is sent). Keyword
    arguments not named below go to the actor's :class:`~raybranch.Checkpointer` (codec, residual,
    key_every, flush_every, flush_seconds, segment_size, exact, min_lossy_numel, optimizer_codec,
    save_rng, …).
    ``actor_options`` are passed to ``CheckpointActor.options`` (default: 0 CPUs reserved, on
    this node when possible, so the object-store hand-over stays zero-copy). ``records`` keeps
    the last ``keep_records`` completed saves ({id, step, start, end}; monotonic clock).
    """

    def __init__(self, store: str, run: str, branch: str = "main", *, max_pending: int = DEFAULT_MAX_PENDING,
                 retry: RetryPolicy | None = None, store_factory: Callable[[str], Store] | None = None,
                 actor_options: dict | None = None, keep_records: int = 1000, batch: int | None = None, **checkpointer_kwargs):
        if not isinstance(store, str):
            raise RaybranchError(f"AsyncCheckpointer takes a store URI, not {type(store).__name__}: the actor opens the store itself")
        if not isinstance(max_pending, int) or max_pending < 1:
            raise RaybranchError(f"max_pending must be a positive integer, got {max_pending!r}")
        if batch is None:
            batch = min(DEFAULT_BATCH, max_pending)
        if not isinstance(batch, int) or not 1 <= batch <= max_pending:
            raise RaybranchError(f"batch must be an integer from 1 to max_pending ({max_pending}), got {batch!r}")
        if "device" in checkpointer_kwargs:
            raise RaybranchError("device is not an AsyncCheckpointer option: the actor encodes on its own device")
        if "background" in checkpointer_kwargs or "retry" in checkpointer_kwargs:
            raise RaybranchError("background and retry are the actor's own: pass retry=RetryPolicy(...) to AsyncCheckpointer")
        if not ray.is_initialized():
            raise RaybranchError("AsyncCheckpointer needs Ray: call ray.init() or run inside a Ray worker")
        self.uri, self.run, self.branch = store, check_name("run", run), check_name("branch", branch)
        self.max_pending, self.batch = max_pending, batch
        self.store_factory = store_factory
        self._save_rng = checkpointer_kwargs.get("save_rng")
        self.actor = self._attach(store, checkpointer_kwargs, retry, actor_options)
        self._pending: deque[Ticket] = deque()
        self._unsent: list = []  # packed saves waiting for their batch to fill
        self._sender = Sender(self.actor, f"raybranch-send-{self.branch}", max_pending)
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
        """Queue a checkpoint of ``model`` at ``step``; returns the id it will have (collect + :meth:`save_state`)."""
        return self.save_state(step, collect(model, optimizer, extra, rng=self._save_rng), slices=slices, tags=tags,
                               snapshot=snapshot)

    def save_state(self, step: int, state: TrainingState, *, slices=None, tags=None, snapshot: bool | None = None) -> str:
        """Queue a checkpoint of ``state`` at ``step``.

        Raises, queuing nothing of this step: NonFiniteError when a CPU tensor holds NaN/Inf; the
        error of an earlier save that failed in the actor. Blocks while ``max_pending`` saves are
        in flight.
        """
        if self._closed:
            raise RaybranchError(f"AsyncCheckpointer of {self.run}/{self.branch} is closed")
        step = int(step)
        self._collect(keep=self.max_pending - 1)
        t0 = time.perf_counter()
        check_state_finite(state, step)  # the plain Checkpointer's error, at this step's save
        buf, doc = to_buffer(state, alloc=self._sender.alloc)
        copied = None
        if buf.is_pinned():  # asynchronous copies from the GPU: the sender waits for them, not us
            copied = torch.cuda.Event()
            copied.record()
        ticket = Ticket(step)
        self._pending.append(ticket)
        self._unsent.append((ticket, buf, copied, doc, list(slices or []), list(tags or []), snapshot))
        if len(self._unsent) >= self.batch:
            self._release()
        self.stats["handoff_s"] += time.perf_counter() - t0
        self.stats["saves"] += 1
        return f"{self.run}/{self.branch}/{step}"

    def _release(self) -> None:
        """Hand the saves packed so far to the sender thread, as one batch."""
        if self._unsent:
            self._sender.post(self._unsent)
            self._unsent = []

    @property
    def pending(self) -> int:
        """Saves handed over and not yet seen finished."""
        return len(self._pending)

    def flush(self) -> None:
        """Wait until every save is committed; raise the first error (after close: nothing to wait for)."""
        if self._closed:
            return
        self._collect(keep=0)
        self._get(self.actor.flush.remote())

    def close(self, terminate: bool = True) -> None:
        """flush (every save is then committed) and (``terminate``) let the actor exit."""
        if self._closed:
            return
        self._collect(keep=0)
        self._closed = True
        self._sender.stop()
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

    def _finish(self, ticket: Ticket) -> None:
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
]
