"""The checkpoint actor: encode, write and commit checkpoints off the training critical path.

    ckpt = AsyncCheckpointer("s3://bucket/ckpts", run="exp1", branch="main", bits=3)
    for step in ...:
        ...  # optimizer.step()
        ckpt.save(step, model, optimizer)        # returns after copying the state to a CPU buffer
    ckpt.close()                                  # waits for every save, compacts the tail

Data flow of one save (DESIGN.md "Data flow")::

    training worker                                CheckpointActor (one per run/branch)
      main thread: state → one byte buffer (copy)    Checkpointer.save: δ vs ũ, quantize, zstd,
      sender thread: ray.put ──ObjectRef──▶          blob, manifest (= commit); retried with
        (saves queued meanwhile go in one call)      backoff on StoreError / OSError
      ≤ max_pending saves in flight                  compaction into segments: a background thread

Only numpy byte buffers and JSON cross the process boundary: no torch object is pickled. The
actor reads every tensor as a zero-copy view of the buffer in the object store (read-only; the
Checkpointer copies what it keeps). Saves of one branch are ordered: the actor runs one call at a
time, Ray runs the calls of one submitter in submission order, and a call's saves run in order.

Backpressure: at most ``max_pending`` saves are in flight per client; the next ``save`` waits for
the oldest to finish, so a slow store slows training down instead of growing memory.

Retries: a failed save is retried as a whole, up to ``RetryPolicy.attempts`` times, sleeping
min(cap, base·2^(k−1)) after the k-th failure. Before each retry the actor rebuilds its
Checkpointer from the store, so its in-memory state (head, reconstruction ũ, index) is exactly what
the store holds: the blob is content-addressed and the manifest written last, so either the earlier
attempt committed the step (the retry finds it at the head and stops) or it did not (the retry
encodes the same state against the same ũ and writes the same blob). Rebuilding also sidesteps two
ways a Checkpointer's memory parts from the store after a store error: a head load that failed
once is not retried (the next save starts a new chain with no parent), and an inline compaction
cut short leaves its index naming deleted blobs (every later save fails with NotFoundError).

Errors: a save that fails for good (NaN/Inf, retries used up, a bad step) is never swallowed. The
actor refuses the saves queued after it (so a branch never silently skips a step) and the client
raises the original error, type and message, from its next ``save``/``flush``/``close``. After
that the branch accepts saves again (e.g. after rolling back to the last good checkpoint).

Not here yet: a GPU worker quantizing on its own device and sending symbols instead of weights
(the actor encodes on its CPU; a CUDA state is copied to pinned memory asynchronously).
"""
from __future__ import annotations

import json
import queue
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np
import ray
import torch

from ..checkpoint import state as st
from ..checkpoint.checkpointer import Checkpointer, log_record
from ..checkpoint.compact import compact_branch
from ..checkpoint.manifest import RunIndex, check_name
from ..checkpoint.restore import Reader
from ..errors import RaybranchError, StoreError
from ..store.store import Store, open_store

DEFAULT_MAX_PENDING = 4
_READ_ONLY_WARNING = "The given NumPy array is not writable"


class SaveSkippedError(RaybranchError):
    """A save the actor refused because an earlier save of the branch failed."""


class CheckpointActorError(RaybranchError):
    """The checkpoint actor died or could not be reached."""


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of a failed save: ``attempts`` tries in all; after the k-th failure sleep
    min(cap_s, base_s · 2^(k−1)) seconds."""

    attempts: int = 8
    base_s: float = 0.2
    cap_s: float = 5.0

    def __post_init__(self):
        if self.attempts < 1 or self.base_s < 0 or self.cap_s < 0:
            raise RaybranchError(f"retry policy needs attempts >= 1 and delays >= 0, got {self}")

    def delay(self, failures: int) -> float:
        return min(self.cap_s, self.base_s * 2.0 ** (failures - 1))


def actor_name(run: str, branch: str) -> str:
    """The Ray name of a branch's checkpoint actor."""
    return f"raybranch-ckpt-{check_name('run', run)}-{check_name('branch', branch)}"


# -- what travels: one byte buffer + JSON -----------------------------------------------------
_ALIGN = 64  # every tensor starts on a 64-byte boundary of the buffer


def pack_state(model, optimizer=None, extra: dict | None = None, rng: bool = False,
               alloc: Callable[[int, bool], torch.Tensor] | None = None) -> tuple[torch.Tensor, str]:
    """(buffer, meta JSON) of a training state, ready for ``ray.put``.

    The buffer is one contiguous uint8 array holding a copy of every tensor (model, optimizer
    state, RNG states, tensors in ``extra``), each at a 64-byte-aligned offset; a GPU tensor is
    copied straight into it. ``meta`` lists [group, name, dtype, shape, offset] per tensor
    (group ∈ model, optim, rng, extra) and holds the JSON parts (optimizer hyper-parameters, RNG
    scalars, non-tensor extras). One array is the cheapest thing to put in the object store, and
    the reader gets every tensor back as a zero-copy view (:func:`unpack_state`). ``alloc(n, pinned)``
    supplies the uint8 buffer (to reuse buffers); the buffer is returned as a tensor
    (``.numpy()`` is a view of it).

    With CUDA tensors the buffer is pinned and the copies are asynchronous on the current stream:
    the caller must wait for them (a CUDA event recorded after this call) before reading the
    buffer. Kernels queued later on that stream (the next optimizer step) run after the copies,
    so the snapshot is the state at this call.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {"model": st.model_tensors(model)}
    meta: dict = {}
    if isinstance(model, torch.nn.Module):  # the Checkpointer groups a module's buffers apart
        meta["buffers"] = [n for n, _ in model.named_buffers()]
    if optimizer is not None:
        groups["optim"], meta["optimizer"] = st.optimizer_tensors(optimizer)
    if rng:
        groups["rng"], meta["rng"] = st.rng_tensors()
    if extra:
        groups["extra"], meta["extra"] = st.extra_tensors(extra)
    layout, total = [], 0
    for g, ts in groups.items():
        for k, t in ts.items():
            layout.append([g, k, st.dtype_name(t.dtype), list(t.shape), total])
            total += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    cuda = any(t.is_cuda for ts in groups.values() for t in ts.values())
    buf = alloc(total, cuda) if alloc is not None else torch.empty(total, dtype=torch.uint8, pin_memory=cuda)
    for (g, k, _, _, off) in layout:
        t = groups[g][k]
        if t.numel():
            buf[off : off + t.numel() * t.element_size()].view(t.dtype).copy_(t.detach().reshape(-1), non_blocking=cuda)
    meta["tensors"] = layout
    return buf, json.dumps(meta)


def unpack_state(buf: np.ndarray, meta: dict) -> dict[str, dict[str, torch.Tensor]]:
    """{group: {name: tensor}} as views of ``buf`` (which may be a read-only object-store view)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_READ_ONLY_WARNING)
        whole = torch.from_numpy(buf)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for g, k, dtype, shape, off in meta["tensors"]:
        dt = st.dtype_from_name(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dt).element_size()
        out.setdefault(g, {})[k] = whole[off : off + n].view(dt).reshape(shape)
    return out


class _ModuleState(torch.nn.Module):
    """A module as far as Checkpointer.save reads one: its state_dict and its buffers' names."""

    def __init__(self, sd: dict[str, torch.Tensor], buffers: list[str]):
        super().__init__()
        self._rb_sd, self._rb_buffers = sd, buffers

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return self._rb_sd

    def named_buffers(self, *args, **kwargs):
        return ((n, self._rb_sd.get(n)) for n in self._rb_buffers)


class _OptimizerState:
    """What Checkpointer.save needs of an optimizer: its state_dict."""

    def __init__(self, sd: dict):
        self._sd = sd

    def state_dict(self) -> dict:
        return self._sd


# -- the actor ---------------------------------------------------------------------------------
class BackgroundCompactor:
    """Compaction of one branch in a thread of the actor, so saves never wait for it.

    Inline, :class:`~raybranch.Checkpointer` rewrites ``segment_size`` deltas into a segment during
    the save that completes them (~140 ms for 64 LeNet-5 deltas): with a queue of 4 saves that
    would stall training every ``segment_size`` steps. Here the actor's Checkpointer runs with
    ``segment_size=0`` and this thread runs :func:`~raybranch.checkpoint.compact.compact_branch`
    (same batches, same segments) on its own index, fed with each committed entry. ``lock`` is held
    by a pass, and by the saver while it reloads its state from the store, so a reload never sees
    a pass half done. A failed pass loses nothing (the loose deltas stay committed); it is retried
    on the next trigger, and the tail compaction at ``close`` raises if it still fails.
    """

    def __init__(self, store: Store, run: str, branch: str, segment_size: int, retry: RetryPolicy):
        self.store, self.run, self.branch, self.segment_size, self.retry = store, run, branch, segment_size, retry
        self.lock = threading.Lock()
        self._cv = threading.Condition()
        self._index: RunIndex | None = None
        self._new: list[dict] = []  # committed entries the index has not taken in yet
        self._loose = 0  # loose deltas, as far as this object knows
        self._stop = False
        self._thread: threading.Thread | None = None
        self.stats = {"passes": 0, "moved": 0, "failures": 0, "busy_s": 0.0, "last_error": None}

    def committed(self, entry: dict) -> None:
        """The saver committed ``entry`` (a manifest entry as the RunIndex holds it)."""
        with self._cv:
            self._new.append(entry)
            self._loose += entry["kind"] == "delta"
            if self._loose >= self.segment_size:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name=f"raybranch-compact-{self.branch}", daemon=True)
                    self._thread.start()
                self._cv.notify()

    def reset(self) -> None:
        """Forget the index (call with ``lock`` held, after the store changed under it)."""
        with self._cv:
            self._index = None
            self._new.clear()
            self._loose = self.segment_size  # look at the store on the next pass
            self._cv.notify()

    def compact(self, tail: bool = False) -> int:
        """One pass now (``tail``: also the last, shorter run of deltas); returns deltas moved."""
        t0 = time.monotonic()
        with self.lock:
            try:
                if self._index is None:
                    self._index = RunIndex(self.store, self.run)
                    self._index.entries(self.branch, refresh=True)
                with self._cv:
                    new, self._new = self._new, []
                entries = self._index.entries(self.branch)
                top = max(entries, default=-1)
                for e in new:  # only what the load did not already see (steps only grow)
                    if e["step"] > top:
                        self._index.add(e)
                moved = compact_branch(self.store, self._index, self.branch, self.segment_size, tail=tail)
            except BaseException:
                self._index = None  # may no longer match the store: reload on the next pass
                self.stats["failures"] += 1
                raise
            finally:
                self.stats["busy_s"] += time.monotonic() - t0
            loose = sum(1 for e in self._index.entries(self.branch).values() if "file" in e and e["kind"] == "delta")
            with self._cv:
                self._loose = loose + sum(e["kind"] == "delta" for e in self._new)
        self.stats["passes"] += 1
        self.stats["moved"] += moved
        return moved

    def _loop(self) -> None:
        failures = 0
        while True:
            with self._cv:
                while not self._stop and self._loose < self.segment_size:
                    self._cv.wait()
                if self._stop:
                    return
            try:
                self.compact()
                failures = 0
            except Exception as exc:  # noqa: BLE001 - kept, retried, and raised by close() if it persists
                failures += 1
                self.stats["last_error"] = f"{type(exc).__name__}: {exc}"
                with self._cv:
                    self._cv.wait_for(lambda: self._stop, timeout=self.retry.delay(failures))

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()


class CheckpointService:
    """One branch's Checkpointer behind a Ray actor (see :data:`CheckpointActor`).

    ``store_factory(uri) -> Store`` opens the store inside the actor (default
    :func:`raybranch.open_store`), so credentials come from the actor's environment and are never
    sent. ``checkpointer_kwargs`` go to :class:`~raybranch.Checkpointer`, except that compaction
    into segments of ``segment_size`` runs in a :class:`BackgroundCompactor`.
    """

    def __init__(self, store_uri: str, run: str, branch: str, checkpointer_kwargs: dict | None = None,
                 retry: RetryPolicy | None = None, store_factory: Callable[[str], Store] | None = None,
                 threads: int = 1):
        if threads:
            torch.set_num_threads(threads)
        kwargs = dict(checkpointer_kwargs or {})
        self.config = {"store": store_uri, "run": run, "branch": branch, "checkpointer": dict(kwargs)}
        self.retry = retry or RetryPolicy()
        self.segment_size = kwargs.pop("segment_size", 64)
        if not isinstance(self.segment_size, int) or self.segment_size < 0:
            raise RaybranchError(f"segment_size must be >= 0 (0 = never compact), got {self.segment_size!r}")
        self._kwargs = {**kwargs, "segment_size": 0}
        self.store = (store_factory or open_store)(store_uri)
        self.compactor = BackgroundCompactor(self.store, run, branch, self.segment_size, self.retry) if self.segment_size else None
        self._ckpt: Checkpointer | None = None
        self._failure: tuple[int, str] | None = None  # (step, message) of the save that failed
        self.stats = {"saves": 0, "retries": 0, "found_committed": 0, "failed": 0, "skipped": 0, "busy_s": 0.0}
        self._cpu0 = time.process_time()  # cpu_s in get_stats: CPU time of the actor since it started
        Checkpointer(self.store, run, branch, **self._kwargs)  # bad settings fail here, at creation

    def get_config(self) -> dict:
        return self.config

    def get_stats(self) -> dict:
        out = dict(self.stats, cpu_s=time.process_time() - self._cpu0)
        if self.compactor is not None:
            out["compaction"] = dict(self.compactor.stats)
        return out

    def _checkpointer(self) -> Checkpointer:
        """The branch's Checkpointer, (re)loaded from the store while no compaction pass runs."""
        if self._ckpt is None:
            c = self.config
            ck = Checkpointer(self.store, c["run"], c["branch"], **self._kwargs)
            if self.compactor is None:
                ck.head()
            else:
                with self.compactor.lock:
                    ck.head()  # loads head, reconstruction and index from the store
                    self.compactor.reset()
            self._ckpt = ck
        return self._ckpt

    def _retrying(self, what: str, fn: Callable[[int], object]):
        """fn(attempt) with retries on store errors, the Checkpointer rebuilt from the store after each."""
        for attempt in range(1, self.retry.attempts + 1):
            try:
                return fn(attempt)
            except (StoreError, OSError) as exc:
                self._ckpt = None  # its memory may now differ from the store: reload before retrying
                if attempt == self.retry.attempts:
                    raise StoreError(f"{what} failed after {attempt} attempts: {' '.join(str(exc).split())}") from None
                self.stats["retries"] += 1
                time.sleep(self.retry.delay(attempt))

    def save(self, step: int, buf: np.ndarray, meta_json: str, slices=None, tags=None, snapshot: bool = False) -> dict:
        """Commit one checkpoint from a buffer made by :func:`pack_state`; returns its record."""
        t0 = time.monotonic()
        step = int(step)
        if self._failure is not None:
            self.stats["skipped"] += 1
            raise SaveSkippedError(f"save of step {step} skipped: the save of step {self._failure[0]} failed: {self._failure[1]}")
        try:
            meta = json.loads(meta_json)
            tensors = unpack_state(buf, meta)
            model = tensors["model"] if "buffers" not in meta else _ModuleState(tensors["model"], meta["buffers"])
            optimizer = None
            if "optim" in tensors:
                optimizer = _OptimizerState(st.optimizer_state_dict(tensors["optim"], meta["optimizer"]))
            extra = st.extra_from(tensors.get("extra", {}), meta["extra"]) if "extra" in meta else None

            def attempt(n: int) -> str:
                ck = self._checkpointer()
                head = ck.head()
                if n > 1 and head is not None and head["step"] == step:
                    self.stats["found_committed"] += 1
                    return head["id"]  # an earlier attempt committed it before failing
                if "rng" in tensors:  # the worker's generators, where the Checkpointer reads them
                    st.set_rng({k: v.clone() for k, v in tensors["rng"].items()}, meta["rng"])
                return ck.save(step, model, optimizer, extra, slices=slices, tags=tags, snapshot=snapshot)

            cid = self._retrying(f"save of step {step}", attempt)
            if self.compactor is not None:
                self.compactor.committed(self._ckpt.index.get(self.config["branch"], step))
        except Exception as exc:
            self._failure = (step, f"{type(exc).__name__}: {exc}")
            self.stats["failed"] += 1
            raise
        finally:
            self.stats["busy_s"] += time.monotonic() - t0
        self.stats["saves"] += 1
        return {"id": cid, "step": step, "start": t0, "end": time.monotonic()}

    def save_many(self, bufs: list[np.ndarray], items: list[tuple]) -> list[tuple[str, object]]:
        """Several saves in one call (one object-store read, one Ray call): items are
        (step, meta_json, slices, tags, snapshot); returns ("ok", record) or ("error", exception)
        per save, in order, so one failure does not hide the saves that committed before it."""
        out: list[tuple[str, object]] = []
        for buf, (step, meta_json, slices, tags, snapshot) in zip(bufs, items):
            try:
                out.append(("ok", self.save(step, buf, meta_json, slices, tags, snapshot)))
            except Exception as exc:  # noqa: BLE001 - returned to the client, which raises it
                out.append(("error", exc))
        return out

    def clear_failure(self) -> None:
        """Accept saves again (the client has raised the error)."""
        self._failure = None

    def close(self, compact_tail: bool = True) -> None:
        """Stop background compaction and compact what is left (the tail too, if ``compact_tail``)."""
        if self.compactor is None:
            return
        self.compactor.stop()
        self._retrying("compaction at close", lambda n: self.compactor.compact(tail=compact_tail))

    def head(self) -> dict | None:
        return self._retrying("reading the head", lambda n: self._checkpointer().head())


CheckpointActor = ray.remote(max_concurrency=1)(CheckpointService)
"""The Ray actor class: ``CheckpointActor.options(name=actor_name(run, branch)).remote(uri, run, branch, …)``."""


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
    arguments not named below go to :class:`~raybranch.Checkpointer` (bits, granularity,
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
    def save(self, step: int, model, optimizer=None, extra: dict | None = None, *, slices=None, tags=None, snapshot: bool = False) -> str:
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
        """flush, compact the tail of the branch, and (``terminate``) let the actor exit."""
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
    def _store(self) -> Store:
        return (self.store_factory or open_store)(self.uri)

    def restore(self, step: int | None = None, branch: str | None = None) -> dict:
        """flush, then restore from the store in this process (see :meth:`Checkpointer.restore`)."""
        self.flush()
        return Reader(self._store(), self.run).restore(branch or self.branch, step)

    def log(self, branch: str | None = None) -> list[dict]:
        """flush, then every committed checkpoint of the branch, oldest first."""
        self.flush()
        entries = RunIndex(self._store(), self.run).entries(branch or self.branch, refresh=True)
        return [log_record(e) for e in entries.values()]

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
    "BackgroundCompactor",
    "CheckpointService",
    "RetryPolicy",
    "SaveSkippedError",
    "actor_name",
    "pack_state",
    "unpack_state",
]
