"""Checkpointer: a compressed checkpoint of a branch at every step, restorable at any step.

    ckpt = Checkpointer(store, run="exp1", branch="main")
    ckpt.save(step, model, optimizer=None, extra=None)   # -> "exp1/main/<step>"
    state = ckpt.restore(step=None)                       # latest if None
    ckpt.log()                                            # every committed checkpoint

Per checkpoint, floating-point model tensors (the *lossy groups*) are coded against the previous
reconstruction: by default with the uniform codec, which keeps every restored step within
``residual`` (0.95) of one step's update of the trained one (:mod:`raybranch.codec.uniform`);
``codec="lc"`` is LC-checkpoint, the baseline. Integer buffers, tensors under
``min_lossy_numel`` entries, names matching ``exact`` and (by default) optimizer state are stored
losslessly, and only when they changed. Exact checkpoints (the first, tagged ones,
``snapshot=True``, and a key frame every ``key_every`` deltas, or as often as ``restore_budget_s``
seconds of delta decoding allow) are coded against the previous exact state
(:mod:`raybranch.checkpoint.encode`), so a restore applies at most ``key_every`` deltas; see
docs/BENCHMARKS.md for the measured trade-off.

Saves go through one pipeline (:mod:`raybranch.checkpoint.pipeline`): ``save`` *captures* the
state on the training thread (a copy into reused buffers and the NaN/Inf check,
:mod:`raybranch.checkpoint.capture`) and returns; a thread behind it encodes each step against
the reconstruction ũ (which advances at capture order, before any commit), and **group-commits**
many steps as one blob and one commit (:mod:`raybranch.checkpoint.group`). The durability window,
what a crash may lose, is the open group: ``flush_every`` (64) steps or ``flush_seconds`` (5 s),
whichever closes first; exact checkpoints close a group, tagged saves and ``flush()``/``close()``
wait for the commit. A failure behind the training thread (a store error after retries, a newer
writer) is raised by the next ``save``, ``flush`` or ``close`` with its type and message, naming
the steps that were not committed; the in-memory state is then rebuilt from the last commit and
training can go on from there. ``background=False`` runs the same pipeline inline (the checkpoint
actor does: it is the background already).

The first save registers the Checkpointer as the branch's writer (a fence commit with a new
epoch): from then on an older writer of the branch is refused with
:class:`~raybranch.errors.FencedError`. Groups are written once, at the compression level they
were encoded with; ``segment_size`` > 0 restores the old compaction of every page of that many
commits into one segment blob at a stronger zstd level (for writers committing single steps).
The arguments' defaults and checks are in :mod:`raybranch.checkpoint.settings`. ``parts``: the
ranks of a data-parallel group, each writing its part of every step (:mod:`.parts`).
"""
from __future__ import annotations

import re
import time
import warnings

import torch

from ..codec.modes import make_params
from ..errors import FencedError, LapsedWriterFenced, NonFiniteError, RaybranchError
from ..ledger.branch import BranchWriter
from ..ledger.lineage import Lineage
from ..ledger.pages import Sealer
from ..ledger.records import PAGE_SIZE, check_name
from ..store.store import Store, open_store
from .capture import BufferPool, Capture, capture
from .compact import compact_rows
from .encode import StateEncoder
from .group import MAX_GROUP_BYTES, OpenGroup, RetryPolicy, commit_group
from .history import branch_log, log_record
from .layout import LayoutRules
from .part_commit import agree_step, commit_parts, create_fork, load_writer
from .parts import Parts, own_view
from .pipeline import Pipeline, describe_steps, failure_error
from .restore import Reader
from .settings import DEFAULT_FLUSH_EVERY, DEFAULT_FLUSH_SECONDS, DEFAULT_KEY_EVERY, DEFAULT_MAX_PENDING, check_settings
from .training_state import TrainingState, collect
from .writer import read_head


class Checkpointer:
    def __init__(
        self,
        store: Store | str,
        run: str,
        branch: str = "main",
        *,
        codec: str = "uniform",
        residual: float = 0.95,
        bits: int = 3,
        granularity: str = "tensor",
        value: str = "mean",
        key_every: int | None = None,
        restore_budget_s: float | None = None,
        standalone_every: int = 8,
        snapshot_every: int | None = None,
        segment_size: int = 0,
        exact: tuple[str, ...] | list[str] = (),
        min_lossy_numel: int = 8,
        optimizer_codec: str = "exact",
        save_rng: bool | None = None,
        device: torch.device | str | None = None,
        flush_every: int = DEFAULT_FLUSH_EVERY,
        flush_seconds: float | None = DEFAULT_FLUSH_SECONDS,
        background: bool = True,
        max_pending: int = DEFAULT_MAX_PENDING,
        retry: RetryPolicy | None = None,
        parts: Parts | None = None,
    ):
        self.store = open_store(store) if isinstance(store, str) else store
        self.run = check_name("run", run)
        self.branch = check_name("branch", branch)
        self.params = make_params(codec, residual=residual, bits=bits, granularity=granularity, value=value)
        key_every, self._settings = check_settings(
            codec=codec, residual=residual, bits=bits, granularity=granularity, value=value, key_every=key_every,
            restore_budget_s=restore_budget_s, standalone_every=standalone_every, snapshot_every=snapshot_every,
            segment_size=segment_size, exact=exact, min_lossy_numel=min_lossy_numel, optimizer_codec=optimizer_codec,
            save_rng=save_rng, device=device, flush_every=flush_every, flush_seconds=flush_seconds,
            background=background, max_pending=max_pending, retry=retry)
        self.key_every, self.standalone_every, self.restore_budget_s = key_every, standalone_every, restore_budget_s
        self.segment_size = segment_size
        self.flush_every, self.flush_seconds = flush_every, flush_seconds
        self.retry = retry or RetryPolicy(attempts=1)  # the store retries within its own deadline (S3: retry_deadline)
        self.parts = parts or Parts()
        if self.parts.world > 1 and restore_budget_s is not None:  # its key_every comes from timings: ranks would differ
            raise RaybranchError("restore_budget_s needs a single writer; give key_every to a part-wise Checkpointer")
        self.rules = LayoutRules(tuple(re.compile(p) for p in self._settings["exact"]), min_lossy_numel, optimizer_codec, save_rng,
                                 self.parts.world)
        self.device = torch.device(device) if device is not None else None
        self.reader = Reader(self.store, self.run)
        self.sealer = Sealer(compact_rows if segment_size else None)
        self._writer: BranchWriter | None = None
        self._enc = StateEncoder(self.params, key_every, standalone_every, self.device, restore_budget_s)
        self._head: dict | None = None  # the head step's entry (pipeline side)
        self._loaded = False
        self._last_step: int | None = None  # the last step captured (training side)
        self._group = OpenGroup()  # encoded, not yet committed
        self._fenced: str | None = None  # why this writer was fenced (it stays so until acquire())
        self._lapsed: tuple | None = None  # (epoch, writer id, branch id) held before a failed commit
        self._lost: list[int] = []  # steps of the open group lost with a failure that was not their commit
        self._pool = BufferPool()
        solo = self.parts.world == 1  # part-wise, a group closes at a step all ranks agree on, never when idle
        self._pipeline = Pipeline(f"raybranch-save-{self.branch}", self._process, max_pending=max_pending,
                                  step_of=lambda c: c.step, due_in=self._due_in if solo else lambda: None,
                                  on_idle=self._commit_group if solo else lambda: None,
                                  on_failure=self._reset_after_failure, release=Capture.release) if background else None
        self.timings = {"capture_s": 0.0, "encode_s": 0.0, "encode_cpu_s": 0.0, "write_s": 0.0, "compact_s": 0.0,
                        "blocked_s": 0.0, "lossy_bytes": 0, "retries": 0, "found_committed": 0}

    # -- public API ---------------------------------------------------------------------------
    def save(self, step: int, model, optimizer=None, extra: dict | None = None, *, slices=None, tags=None,
             snapshot: bool | None = None) -> str:
        """Checkpoint ``model`` (module or state_dict), ``optimizer`` and ``extra`` at ``step``;
        returns its id. ``collect`` + :meth:`save_state`: see there."""
        return self.save_state(step, collect(model, optimizer, extra, rng=self.rules.save_rng), slices=slices, tags=tags,
                               snapshot=snapshot)

    def save_state(self, step: int, state: TrainingState, *, slices=None, tags=None, snapshot: bool | None = None) -> str:
        """Capture ``state`` at ``step`` and queue it for the pipeline; returns its id.

        ``snapshot``: True makes it exact (a key frame), False lossy even when tagged; None
        (default): exact when it carries tags. A tagged save returns once it is committed.

        Raises, and queues nothing: NonFiniteError when a tensor holds NaN/Inf, RaybranchError
        when the step does not come after the last one saved, the error of an earlier save that
        failed behind the training thread (see the module docstring); FencedError once a newer
        writer holds the branch. Blocks while ``max_pending`` captures wait (backpressure).
        """
        step = int(step)
        self._raise_failure()
        if not self._loaded:  # the first save, or the first after a failure: register, read the head
            c = capture(step, state, self.rules, self._pool, self.device, slices=slices, tags=tags, snapshot=snapshot,
                        rank=self.parts.rank)
            c.release()  # checked before becoming the writer writes anything (the branch, a fence commit)
            self._load_head()
            self._last_step = None if self._head is None else self._head["step"]
        if self._last_step is not None and step <= self._last_step:
            raise RaybranchError(f"step {step} is not after the head of branch {self.branch!r} (step {self._last_step})")
        t0 = time.perf_counter()
        c = capture(step, state, self.rules, self._pool, self.device, slices=slices, tags=tags, snapshot=snapshot,
                    rank=self.parts.rank)
        self.timings["capture_s"] += time.perf_counter() - t0
        self._last_step = step
        if self._pipeline is None:
            try:
                self._process(c)
            except BaseException as exc:
                self._reset_after_failure(exc)
                self._last_step = None
                raise
            finally:
                c.release()
        else:
            self._pipeline.submit(c)
            self.timings["blocked_s"] = self._pipeline.blocked_s
            if c.tags:
                self.flush()
        return f"{self.run}/{self.branch}/{step}"

    def restore(self, step: int | None = None, branch: str | None = None) -> dict:
        """{"model": state_dict, "optimizer": state_dict | None, "extra": …, "rng": …, "step": …}.
        The open group is committed first, so every saved step can be restored."""
        self.flush()
        return self.reader.restore(branch or self.branch, step)

    def log(self, branch: str | None = None) -> list[dict]:
        """Every committed checkpoint of the branch, oldest first; a forked branch starts with
        its fork point (kind "fork")."""
        self.flush()
        lin = Lineage(self.store, self.run, branch or self.branch)
        return branch_log(lin)

    def head(self) -> dict | None:
        """The log record of the newest step saved (committed once :meth:`flush` returns)."""
        self.flush()
        self._load_head()
        return None if self._head is None else log_record({**self._head, "run": self.run}, self.branch, None)

    def fork(self, branch: str, step: int | None = None, **overrides) -> "Checkpointer":
        """A new branch whose history is this branch up to ``step`` (shared, not copied)."""
        check_name("branch", branch)
        self.flush()
        lin = Lineage(self.store, self.run, self.branch)
        src = lin.entry(step)
        fork = {"branch_id": src["branch_id"], "branch": lin.branch_name_of(src["branch_id"]), "step": src["step"], "seq": src["seq"]}
        create_fork(self.store, self.run, branch, fork, self.segment_size or PAGE_SIZE, self.parts)
        kwargs = {**self._settings, "parts": self.parts, **overrides}
        return Checkpointer(self.store, self.run, branch, **kwargs)

    @property
    def epoch(self) -> int | None:
        """This writer's epoch on the branch (None before its first save)."""
        return None if self._writer is None else self._writer.epoch

    def acquire(self) -> int:
        """Register as the branch's writer now (a restarted worker taking over; or, after a
        FencedError, taking the branch back on purpose); returns the epoch."""
        if self._pipeline is not None:
            self._pipeline.wait()
        self._fenced = self._lapsed = None
        self._load_head()
        self._last_step = None if self._head is None else self._head["step"]
        return self._writer.epoch

    def flush(self) -> None:
        """Commit every step saved so far (wait for the pipeline); raise a failure behind it."""
        if self._pipeline is not None:
            self._pipeline.wait(self._commit_group)
        elif self._group:
            try:
                self._commit_group()
            except BaseException as exc:
                self._reset_after_failure(exc)
                raise
        self._raise_failure()

    def close(self) -> None:
        """flush, and stop the pipeline's thread (a later save starts it again)."""
        try:
            self.flush()
        finally:
            if self._pipeline is not None:
                self._pipeline.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._pipeline is not None:
            self._pipeline.close()

    # -- the pipeline's side ------------------------------------------------------------------
    def _process(self, c: Capture) -> None:
        """Encode one capture (in capture order) into the open group; commit when its window closes."""
        if c.ready is not None:  # asynchronous copies off a GPU
            c.ready.synchronize()
            c.check_finite()
        if not self._loaded:
            self._load_head()
        enc = self._enc
        kind = enc.kind(self._head, c.layout_hash, exact=c.want_exact)
        t0, c0 = time.perf_counter(), time.thread_time()
        rows, refused = [], None if c.refusal is None else NonFiniteError(c.refusal)
        try:
            if refused is None:
                with enc.stream():
                    rows, pending = enc.rows(c.step, kind, c.flats, c.exact)  # raises on NaN/Inf: nothing changes
        except NonFiniteError as exc:
            if self.parts.world == 1:
                raise
            refused = exc
        self.timings["encode_s"] += time.perf_counter() - t0
        self.timings["encode_cpu_s"] += time.thread_time() - c0
        self.timings["lossy_bytes"] = enc.lossy_bytes
        nbytes = self._group.nbytes + sum(len(r.payload) for r in rows)
        due, full = (self._due_in() or 1.0) <= 0, nbytes >= MAX_GROUP_BYTES
        if self.parts.world > 1:  # every rank refuses, or closes the group, at the same step
            full, due = agree_step(self.parts, c.step, refused, nbytes, due), False
        writer = self._writer
        if c.layout_hash != enc.layout_hash:
            self._group.layouts[c.layout_hash] = c.layout_bytes  # written with the group that first names it
        entry = {
            "step": c.step,
            **enc.entry_fields(kind, writer.bid, c.step, self._head),
            "layout": c.layout_hash,
            "slices": c.slices,
            "tags": c.tags,
            "meta": c.meta,
            "time": c.time,
        }
        # the reconstruction advances at capture order; a group that fails to commit rebuilds it from the store
        enc.advance(pending, own_view(c.layout, self.parts.rank), c.flats, c.layout_hash, writer.bid, c.step)
        self._head = {**entry, "branch_id": writer.bid}
        self._group.add(entry, rows)
        if len(self._group) >= self.flush_every or kind != "delta" or c.tags or full or due:
            self._commit_group()

    def _due_in(self) -> float | None:
        """Seconds until the open group's window closes (None: no group, or no time limit)."""
        if not self._group or self.flush_seconds is None:
            return None
        return self._group.opened + self.flush_seconds - time.monotonic()

    def _commit_group(self) -> None:
        """One blob and one commit for the open group. On failure the group is lost (the error
        names its steps) and the in-memory state is rebuilt from the last commit."""
        group = self._group
        if not group:
            return
        self._group = OpenGroup()
        t1 = time.perf_counter()
        writer = self._writer
        span = describe_steps(group.steps)
        seal_s = self.sealer.seconds
        try:
            found = writer.found_committed
            if self.parts.world > 1:
                commit_parts(self.store, self.run, writer, group, self.retry, self.parts, on_retry=self._count_retry)
            else:
                commit_group(self.store, self.run, writer, group, self.retry, on_retry=self._count_retry)
            self.timings["found_committed"] += writer.found_committed - found
        except RaybranchError as exc:
            if isinstance(exc, FencedError):  # stays fenced: only acquire() takes the branch back
                self._fenced = f"{span} of branch {self.branch!r} not committed: {exc}"
                raise FencedError(self._fenced) from None
            self._lapsed = (writer.epoch, writer.writer_id, writer.bid)
            raise type(exc)(f"{span} of branch {self.branch!r} not committed: {exc}") from None
        try:  # the commit stands; a seal cut short (store error) is finished by the next commit
            if self.parts.rank == 0:
                self.sealer.seal_due(writer)
        except RaybranchError as exc:
            warnings.warn(f"branch {self.branch!r}: {span} committed, but sealing "
                          f"of a full page failed; the next commit retries it: {exc}", stacklevel=3)
        self.timings["compact_s"] += self.sealer.seconds - seal_s
        self.timings["write_s"] += time.perf_counter() - t1 - (self.sealer.seconds - seal_s)

    def _count_retry(self) -> None:
        self.timings["retries"] += 1

    def _reset_after_failure(self, exc: BaseException) -> None:
        """After a failure behind the training thread, the next save rebuilds the in-memory state
        from the last commit. A failure while encoding leaves the steps before it in the open
        group: they are committed now (or, if that fails too, named as lost)."""
        if self._group and self._writer is not None and not self._fenced:
            steps = self._group.steps
            try:
                self._commit_group()
            except BaseException:  # noqa: BLE001 - reported with the first failure
                self._lost = steps
        self._group = OpenGroup()
        if self._writer is not None and self._lapsed is None and not self._fenced:
            self._lapsed = (self._writer.epoch, self._writer.writer_id, self._writer.bid)
        self._loaded, self._writer, self._head = False, None, None

    def _raise_failure(self) -> None:
        """Raise what failed behind the training thread (once), naming the steps not committed."""
        if self._pipeline is None or not self._pipeline.failed:
            return
        self._pipeline.wait()  # the captures queued behind the failure are dropped by now
        exc, step, dropped = self._pipeline.take_failure()
        self._last_step = None if self._head is None else self._head["step"]  # None: the next save reloads the head
        lost, self._lost = self._lost, []
        raise failure_error(exc, step, f"branch {self.branch!r}", lost, dropped) from None

    # -- internals ----------------------------------------------------------------------------
    def _load_head(self) -> None:
        """Become the branch's writer (creating the branch if it is new) and, for an existing
        branch, rebuild the encoders' reconstructions from its head."""
        if self._loaded:
            return
        if self._fenced:
            raise FencedError(f"{self._fenced} (this Checkpointer stays fenced; acquire() takes the branch back)")
        try:
            self._writer = load_writer(self.store, self.run, self.branch, self.segment_size or PAGE_SIZE, self._lapsed, self.parts)
        except LapsedWriterFenced as exc:
            self._fenced = str(exc)
            raise
        self._lapsed = None
        self._enc = StateEncoder(self.params, self.key_every, self.standalone_every, self.device, self.restore_budget_s)
        self.reader, head = read_head(self.store, self.run, self._writer, self.reader)
        if head is not None:
            acc, exact, layout, last, base, base_state, keys, base_exact = head
            self._enc.load(own_view(layout, self.parts.rank), last["layout"], acc, exact, base, base_state, keys, base_exact)
            self._head = last
        self._loaded = True  # only once the head is really loaded: a failed read is retried by the next save


def open_checkpointer(uri: str, run: str, branch: str = "main", **kwargs) -> Checkpointer:
    return Checkpointer(open_store(uri), run, branch, **kwargs)


__all__ = ["DEFAULT_FLUSH_EVERY", "DEFAULT_FLUSH_SECONDS", "DEFAULT_KEY_EVERY", "DEFAULT_MAX_PENDING", "Checkpointer",
           "log_record", "open_checkpointer"]
