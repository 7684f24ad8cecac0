"""The checkpoint actor's side: one branch's Checkpointer behind a Ray actor.

The actor runs one call at a time (``max_concurrency=1``), so the saves of a branch are captured
in the order they were sent. It holds a plain :class:`~raybranch.Checkpointer` and calls
``save_state`` with the state the worker collected (its RNG states included: the actor never
touches its own generators); that Checkpointer's pipeline encodes and group-commits behind the
call, exactly as in a user's own loop, so a call returns once its saves are captured.

Writer. The actor's Checkpointer registers as the branch's writer when it is built
(``acquire``: a fence commit with a new epoch), so any older writer of the branch — a previous
actor, a worker that was presumed dead — is refused from then on
(:class:`~raybranch.errors.FencedError`). The reverse holds too: when another process takes the
branch over, this actor's next save fails with FencedError; the actor then refuses every later
save with it (it never re-registers on its own, which would take the branch back).

Retries. Store errors during a group commit are retried inside the Checkpointer
(:class:`~raybranch.checkpoint.group.RetryPolicy`: ``attempts`` tries, sleeping
min(cap, base·2^(k−1)) after the k-th failure; the blob is content-addressed and a commit record
an earlier attempt created is recognised as the writer's own). A group whose retries are used up
is lost: the next save fails with the error naming its steps, the actor refuses the saves after
it until the client has raised it, and the Checkpointer then continues from the last commit.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import ray
import torch

from ..checkpoint.checkpointer import Checkpointer
from ..checkpoint.group import RetryPolicy
from ..checkpoint.training_state import from_buffer
from ..errors import CheckpointActorError, FencedError, SaveSkippedError, StoreError
from ..ledger.records import check_name
from ..store.store import Store, open_store

TIMINGS = ("capture_s", "encode_s", "encode_cpu_s", "write_s", "compact_s", "retries", "found_committed")




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
        self.config = {"store": store_uri, "run": run, "branch": branch, "checkpointer": dict(kwargs)}
        self.retry = retry or RetryPolicy()
        self._kwargs = kwargs
        self.store = (store_factory or open_store)(store_uri)
        self._ckpt: Checkpointer | None = None
        self._fenced: str | None = None  # why this actor may no longer write the branch
        self._failure: tuple[int, str] | None = None  # (step, message) of the save that failed
        self.stats = {"saves": 0, "retries": 0, "failed": 0, "skipped": 0, "writers": 0, "busy_s": 0.0}
        self._timings = dict.fromkeys(TIMINGS, 0.0)  # of the Checkpointers dropped so far
        self._cpu0 = time.process_time()  # cpu_s in get_stats: CPU time of the actor since it started
        Checkpointer(self.store, run, branch, retry=self.retry, **kwargs)  # bad settings fail here, at creation (no I/O)

    def get_config(self) -> dict:
        return self.config

    def get_stats(self) -> dict:
        """saves, retries, found_committed, failed, skipped, writers (Checkpointers registered),
        epoch (the current writer's), timings (encode_s, write_s, compact_s summed), busy_s, cpu_s."""
        timings = dict(self._timings)
        if self._ckpt is not None:
            for k in TIMINGS:
                timings[k] += self._ckpt.timings.get(k, 0.0)
        return dict(self.stats, retries=self.stats["retries"] + int(timings["retries"]),
                    found_committed=int(timings["found_committed"]), cpu_s=time.process_time() - self._cpu0, timings=timings,
                    epoch=None if self._ckpt is None else self._ckpt.epoch, fenced=self._fenced)

    def _checkpointer(self) -> Checkpointer:
        """The branch's Checkpointer, built from the store and registered as its writer if needed."""
        if self._fenced is not None:
            raise FencedError(self._fenced)
        if self._ckpt is None:
            c = self.config
            ck = Checkpointer(self.store, c["run"], c["branch"], retry=self.retry, **self._kwargs)
            ck.acquire()  # loads head and reconstruction; fences every older writer, this actor's own included
            self.stats["writers"] += 1
            self._ckpt = ck
        return self._ckpt

    def _drop(self) -> None:
        """Forget the Checkpointer (its memory may differ from the store): it is never used again."""
        if self._ckpt is not None:
            for k in TIMINGS:
                self._timings[k] += self._ckpt.timings.get(k, 0.0)
            try:  # stops its pipeline thread; what it still held is lost with the failure being reported
                self._ckpt.close()
            except Exception:  # noqa: BLE001
                pass
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

    def save(self, step: int, buf: np.ndarray, doc_json: str, slices=None, tags=None, snapshot: bool | None = None) -> dict:
        """Capture one checkpoint from a :func:`~raybranch.checkpoint.training_state.to_buffer`
        buffer into the Checkpointer's pipeline; returns its record {id, step, start, end}
        (monotonic clock of the actor's node). Raises the pipeline's failures as they surface."""
        t0 = time.monotonic()
        step = int(step)
        if self._failure is not None:
            self.stats["skipped"] += 1
            raise SaveSkippedError(f"save of step {step} skipped: the save of step {self._failure[0]} failed: {self._failure[1]}")
        try:
            ck = self._retrying("registering the writer", lambda n: self._checkpointer())
            ck.save_state(step, from_buffer(buf, doc_json), slices=slices, tags=tags, snapshot=snapshot)
        except Exception as exc:
            self._failure = (step, f"{type(exc).__name__}: {exc}")
            self._count_failure(exc)
            raise
        finally:
            self.stats["busy_s"] += time.monotonic() - t0
        self.stats["saves"] += 1
        return {"id": self._id(step), "step": step, "start": t0, "end": time.monotonic()}

    def _count_failure(self, exc: Exception) -> None:
        self.stats["failed"] += 1
        if isinstance(exc, FencedError):
            self._fenced = self._fenced or " ".join(str(exc).split())
            self._drop()

    def flush(self) -> None:
        """Commit every step captured so far; raise a failure of the pipeline."""
        if self._ckpt is not None:
            try:
                self._ckpt.flush()
            except Exception as exc:  # raised to the client right here: later saves are not refused
                self._count_failure(exc)
                raise

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
        """End of the branch's saves: commit the open group and stop the pipeline's thread."""
        if self._ckpt is not None:
            self.flush()
            self._ckpt.close()

    def head(self) -> dict | None:
        """The log record of the branch's head (registering this actor as its writer if not yet)."""
        rec = self._retrying("reading the head", lambda n: self._checkpointer().head())
        return None if rec is None else {**rec, "id": self._id(rec["step"])}


CheckpointActor = ray.remote(max_concurrency=1)(CheckpointService)
"""The Ray actor class: ``CheckpointActor.options(name=actor_name(run, branch)).remote(uri, run, branch, …)``."""


__all__ = ["CheckpointActor", "CheckpointActorError", "CheckpointService", "RetryPolicy", "SaveSkippedError", "actor_name"]
