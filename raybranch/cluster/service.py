"""The checkpoint actor's side: one branch's Checkpointer behind a Ray actor.

The actor runs one call at a time (``max_concurrency=1``), so the saves of a branch commit in
the order they were sent. Each save is one commit of the branch's log, durable when
``Checkpointer.save`` returns; every ``segment_size`` commits the same save seals them into a
page and compacts their blobs (:mod:`raybranch.ledger.pages`) — off the training path, since the
client only waits once ``max_pending`` saves are queued.

Writer. The actor's Checkpointer registers as the branch's writer when it is built
(``acquire``: a fence commit with a new epoch), so any older writer of the branch — a previous
actor, a worker that was presumed dead — is refused from then on
(:class:`~raybranch.errors.FencedError`). The reverse holds too: when another process takes the
branch over, this actor's next save fails with FencedError; the actor then refuses every later
save with it (it never re-registers on its own, which would take the branch back).

Retries. A save that fails with a store error (:class:`~raybranch.errors.StoreError`, OSError)
is retried as a whole, up to ``RetryPolicy.attempts`` times, sleeping min(cap, base·2^(k−1))
after the k-th failure. Before each retry the Checkpointer is dropped and a new one built from
the store, so its memory (head, reconstruction ũ) is exactly what the store holds: the blob is
content-addressed and the commit created last, so either the failed attempt committed the step
(the retry finds it at the head and stops) or it did not (the retry encodes the same state
against the same ũ and writes the same blob). The new Checkpointer fences the old one, which
is never called again (each retry costs one fence commit). A page seal cut short by a store
error does not fail the save — the commit stands — and a later commit finishes it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import ray
import torch

from ..checkpoint import state as st
from ..checkpoint.checkpointer import Checkpointer
from ..errors import FencedError, RaybranchError, StoreError
from ..ledger.records import check_name
from ..store.store import Store, open_store
from .handoff import save_arguments

TIMINGS = ("encode_s", "write_s", "compact_s")


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


class CheckpointService:
    """One branch's Checkpointer behind a Ray actor (see :data:`CheckpointActor`).

    ``store_factory(uri) -> Store`` opens the store inside the actor (default
    :func:`raybranch.open_store`), so credentials come from the actor's environment and are never
    sent. ``checkpointer_kwargs`` go to :class:`~raybranch.Checkpointer` as they are.
    """

    def __init__(self, store_uri: str, run: str, branch: str, checkpointer_kwargs: dict | None = None,
                 retry: RetryPolicy | None = None, store_factory: Callable[[str], Store] | None = None,
                 threads: int = 1):
        if threads:
            torch.set_num_threads(threads)
        kwargs = dict(checkpointer_kwargs or {})
        if kwargs.get("flush_every", 1) != 1:
            raise RaybranchError("flush_every is not a checkpoint actor option: the actor commits every save, "
                                 "so that a retried save finds what the failed attempt committed")
        self.config = {"store": store_uri, "run": run, "branch": branch, "checkpointer": dict(kwargs)}
        self.retry = retry or RetryPolicy()
        self._kwargs = kwargs
        self.store = (store_factory or open_store)(store_uri)
        self._ckpt: Checkpointer | None = None
        self._fenced: str | None = None  # why this actor may no longer write the branch
        self._failure: tuple[int, str] | None = None  # (step, message) of the save that failed
        self.stats = {"saves": 0, "retries": 0, "found_committed": 0, "failed": 0, "skipped": 0, "writers": 0, "busy_s": 0.0}
        self._timings = dict.fromkeys(TIMINGS, 0.0)  # of the Checkpointers dropped so far
        self._cpu0 = time.process_time()  # cpu_s in get_stats: CPU time of the actor since it started
        Checkpointer(self.store, run, branch, **kwargs)  # bad settings fail here, at creation (no I/O)

    def get_config(self) -> dict:
        return self.config

    def get_stats(self) -> dict:
        """saves, retries, found_committed, failed, skipped, writers (Checkpointers registered),
        epoch (the current writer's), timings (encode_s, write_s, compact_s summed), busy_s, cpu_s."""
        timings = dict(self._timings)
        if self._ckpt is not None:
            for k in TIMINGS:
                timings[k] += self._ckpt.timings.get(k, 0.0)
        return dict(self.stats, cpu_s=time.process_time() - self._cpu0, timings=timings,
                    epoch=None if self._ckpt is None else self._ckpt.epoch, fenced=self._fenced)

    def _checkpointer(self) -> Checkpointer:
        """The branch's Checkpointer, built from the store and registered as its writer if needed."""
        if self._fenced is not None:
            raise FencedError(self._fenced)
        if self._ckpt is None:
            c = self.config
            ck = Checkpointer(self.store, c["run"], c["branch"], **self._kwargs)
            ck.acquire()  # loads head and reconstruction; fences every older writer, this actor's own included
            self.stats["writers"] += 1
            self._ckpt = ck
        return self._ckpt

    def _drop(self) -> None:
        """Forget the Checkpointer (its memory may differ from the store): it is never used again."""
        if self._ckpt is not None:
            for k in TIMINGS:
                self._timings[k] += self._ckpt.timings.get(k, 0.0)
        self._ckpt = None

    def _retrying(self, what: str, fn: Callable[[int], object]):
        """fn(attempt) with retries on store errors, the Checkpointer rebuilt from the store after each."""
        for attempt in range(1, self.retry.attempts + 1):
            try:
                return fn(attempt)
            except FencedError as exc:
                self._fenced = self._fenced or " ".join(str(exc).split())
                self._drop()
                raise
            except (StoreError, OSError) as exc:
                self._drop()
                if attempt == self.retry.attempts:
                    raise StoreError(f"{what} failed after {attempt} attempts: {' '.join(str(exc).split())}") from None
                self.stats["retries"] += 1
                time.sleep(self.retry.delay(attempt))

    def _id(self, step: int) -> str:
        return f"{self.config['run']}/{self.config['branch']}/{int(step)}"

    def save(self, step: int, buf: np.ndarray, meta_json: str, slices=None, tags=None, snapshot: bool | None = None) -> dict:
        """Commit one checkpoint from a buffer made by :func:`~raybranch.cluster.handoff.pack_state`;
        returns its record {id, step, start, end} (monotonic clock of the actor's node)."""
        t0 = time.monotonic()
        step = int(step)
        if self._failure is not None:
            self.stats["skipped"] += 1
            raise SaveSkippedError(f"save of step {step} skipped: the save of step {self._failure[0]} failed: {self._failure[1]}")
        try:
            model, optimizer, extra, rng = save_arguments(buf, meta_json)

            def attempt(n: int) -> str:
                ck = self._checkpointer()
                head = ck.head()
                if n > 1 and head is not None and head["step"] == step:
                    self.stats["found_committed"] += 1
                    return self._id(step)  # an earlier attempt committed it before failing
                if rng is not None:  # the worker's generators, where the Checkpointer reads them
                    st.set_rng({k: v.clone() for k, v in rng[0].items()}, rng[1])
                ck.save(step, model, optimizer, extra, slices=slices, tags=tags, snapshot=snapshot)
                return self._id(step)

            cid = self._retrying(f"save of step {step}", attempt)
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
        """Accept saves again (the client has raised the error). A fenced actor stays fenced."""
        self._failure = None

    def close(self) -> None:
        """End of the branch's saves: every save is already committed, pages sealed as they filled."""
        if self._ckpt is not None:
            self._ckpt.close()

    def head(self) -> dict | None:
        """The log record of the branch's head (registering this actor as its writer if not yet)."""
        rec = self._retrying("reading the head", lambda n: self._checkpointer().head())
        return None if rec is None else {**rec, "id": self._id(rec["step"])}


CheckpointActor = ray.remote(max_concurrency=1)(CheckpointService)
"""The Ray actor class: ``CheckpointActor.options(name=actor_name(run, branch)).remote(uri, run, branch, …)``."""


__all__ = ["CheckpointActor", "CheckpointActorError", "CheckpointService", "RetryPolicy", "SaveSkippedError", "actor_name"]
