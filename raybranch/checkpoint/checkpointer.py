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

Each save is one commit of the branch's log (:mod:`raybranch.ledger`): the blob, then the commit
record, created only if absent. The first save registers the Checkpointer as the branch's writer
(a fence commit with a new epoch): from then on an older writer of the branch is refused with
:class:`~raybranch.errors.FencedError`. Every ``segment_size`` commits are sealed into a page and
their blobs compacted into one segment blob (:mod:`raybranch.checkpoint.compact`), which removes
per-file overhead and recompresses the streams with a slower, stronger zstd level.
"""
from __future__ import annotations

import hashlib
import re
import time
import warnings

import torch

from ..codec.modes import make_params
from ..errors import ConflictError, FencedError, NonFiniteError, NotFoundError, RaybranchError
from ..ledger.branch import BranchLog, BranchWriter
from ..ledger.lineage import Lineage, create_branch
from ..ledger.pages import Sealer
from ..ledger.records import PAGE_SIZE, check_name, layout_key
from ..ledger.refs import read_branch_ref
from ..store.blob import Row, write_blob
from ..store.store import Store, json_bytes, open_store
from .compact import compact_rows
from .encode import StateEncoder
from .layout import LayoutRules, buffer_names
from .history import branch_log, log_record
from .restore import Reader


DEFAULT_KEY_EVERY = 256  # deltas between key frames (docs/DECISIONS.md: the ratio/restore frontier)


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
        segment_size: int = 64,
        exact: tuple[str, ...] | list[str] = (),
        min_lossy_numel: int = 8,
        optimizer_codec: str = "exact",
        save_rng: bool | None = None,
        device: torch.device | str | None = None,
        flush_every: int = 1,
    ):
        self.store = open_store(store) if isinstance(store, str) else store
        self.run = check_name("run", run)
        self.branch = check_name("branch", branch)
        self.params = make_params(codec, residual=residual, bits=bits, granularity=granularity, value=value)
        if restore_budget_s is not None:
            if key_every is not None or snapshot_every is not None:
                raise RaybranchError("give key_every (deltas) or restore_budget_s (seconds), not both")
            if not isinstance(restore_budget_s, (int, float)) or not restore_budget_s > 0:
                raise RaybranchError(f"restore_budget_s must be a positive number of seconds, got {restore_budget_s!r}")
        if key_every is None:
            key_every = snapshot_every if snapshot_every is not None else DEFAULT_KEY_EVERY
        if not isinstance(key_every, int) or key_every < 1:
            raise RaybranchError(f"key_every must be a positive number of checkpoints, got {key_every!r}")
        if not isinstance(standalone_every, int) or standalone_every < 1:
            raise RaybranchError(f"standalone_every must be a positive number of exact checkpoints, got {standalone_every!r}")
        if segment_size < 0:
            raise RaybranchError(f"segment_size must be >= 0 (0 = pages of {PAGE_SIZE} commits, never compacted), got {segment_size}")
        if optimizer_codec not in ("exact", "lc"):
            raise RaybranchError(f"optimizer_codec must be 'exact' or 'lc', got {optimizer_codec!r}")
        if not isinstance(flush_every, int) or flush_every < 1:
            raise RaybranchError(f"flush_every must be a positive number of saves per commit, got {flush_every!r}")
        self.key_every, self.standalone_every, self.restore_budget_s = key_every, standalone_every, restore_budget_s
        self.segment_size = segment_size
        self.flush_every = flush_every
        self.rules = LayoutRules(tuple(re.compile(p) for p in exact), min_lossy_numel, optimizer_codec, save_rng)
        self.device = torch.device(device) if device is not None else None
        self._settings = dict(codec=codec, residual=residual, bits=bits, granularity=granularity, value=value,
                              key_every=None if restore_budget_s is not None else key_every,
                              restore_budget_s=restore_budget_s, standalone_every=standalone_every, segment_size=segment_size,
                              exact=list(exact), min_lossy_numel=min_lossy_numel, optimizer_codec=optimizer_codec,
                              save_rng=save_rng, device=device, flush_every=flush_every)
        self.reader = Reader(self.store, self.run)
        self.sealer = Sealer(compact_rows if segment_size else None)
        self._writer: BranchWriter | None = None
        self._enc = StateEncoder(self.params, key_every, standalone_every, self.device, restore_budget_s)
        self._head: dict | None = None  # the head step's entry
        self._loaded = False
        self._group: list[tuple[dict, list[Row]]] = []  # saved, not yet committed
        self._new_layouts: dict[str, bytes] = {}  # layouts the open group names that no commit of ours has yet
        self._fenced: str | None = None  # why this writer was fenced (it stays so until acquire())
        self._lapsed: tuple | None = None  # (epoch, writer id, branch id) held before a failed commit
        self.timings = {"encode_s": 0.0, "write_s": 0.0, "compact_s": 0.0, "lossy_bytes": 0}

    # -- public API ---------------------------------------------------------------------------
    def save(self, step: int, model, optimizer=None, extra: dict | None = None, *, slices=None, tags=None,
             snapshot: bool | None = None) -> str:
        """Commit a checkpoint of ``model`` (module or state_dict) at ``step``; returns its id.

        ``snapshot``: True makes it exact (a key frame), False lossy even when tagged; None
        (default): exact when it carries tags.

        Nothing is written when any tensor holds NaN/Inf (:class:`NonFiniteError`) or when the
        step does not come after the branch's head. A newer writer of the branch makes this raise
        :class:`~raybranch.errors.FencedError`.
        """
        step = int(step)
        tensors, meta = self.rules.collect(model, optimizer, extra)
        if not self._loaded:  # becoming the writer writes (the branch, or a fence commit): refuse NaN/Inf before that
            for n, t in tensors.items():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise NonFiniteError(f"tensor {n!r} holds NaN or Inf at step {step}; nothing was saved")
        self._load_head()
        if self._head is not None and step <= self._head["step"]:
            raise RaybranchError(f"step {step} is not after the head of branch {self.branch!r} (step {self._head['step']})")
        layout, groups, exact_names = self.rules.layout(tensors, buffer_names(model))
        flats = {g: torch.cat([tensors[n].reshape(-1).float() for n in names]) for g, names in groups.items()}
        for n in exact_names:
            t = tensors[n]
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise NonFiniteError(f"tensor {n!r} holds NaN or Inf at step {step}; nothing was saved")

        layout_bytes = json_bytes(layout)
        layout_hash = hashlib.sha256(layout_bytes).hexdigest()
        enc = self._enc
        kind = enc.kind(self._head, layout_hash, exact=bool(tags) if snapshot is None else snapshot)
        t0 = time.perf_counter()
        rows, pending = enc.rows(step, kind, flats, groups, tensors, exact_names)  # raises on NaN/Inf: nothing written yet
        self.timings["encode_s"] += time.perf_counter() - t0
        self.timings["lossy_bytes"] = enc.lossy_bytes

        writer = self._writer
        if layout_hash != enc.layout_hash:
            self._new_layouts[layout_hash] = layout_bytes  # written with the group that first names it
        entry = {
            "step": step,
            **enc.entry_fields(kind, writer.bid, step, self._head),
            "layout": layout_hash,
            "slices": list(slices or []),
            "tags": list(tags or []),
            "meta": meta,
            "time": round(time.time(), 3),
        }
        # the reconstruction advances at capture; a group that fails to commit rebuilds it from the store
        enc.advance(pending, layout, flats, layout_hash, writer.bid, step)
        self._head = {**entry, "branch_id": writer.bid}
        self._group.append((entry, rows))
        if len(self._group) >= self.flush_every or kind != "delta" or tags:
            self._commit_group()
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
        self._load_head()
        return None if self._head is None else log_record({**self._head, "run": self.run}, self.branch, None)

    def fork(self, branch: str, step: int | None = None, **overrides) -> "Checkpointer":
        """A new branch whose history is this branch up to ``step`` (shared, not copied)."""
        check_name("branch", branch)
        self.flush()
        lin = Lineage(self.store, self.run, self.branch)
        src = lin.entry(step)
        fork = {"branch_id": src["branch_id"], "branch": lin.branch_name_of(src["branch_id"]), "step": src["step"], "seq": src["seq"]}
        create_branch(self.store, self.run, branch, fork=fork, page_size=self.segment_size or PAGE_SIZE)
        kwargs = {**self._settings, **overrides}
        return Checkpointer(self.store, self.run, branch, **kwargs)

    @property
    def epoch(self) -> int | None:
        """This writer's epoch on the branch (None before its first save)."""
        return None if self._writer is None else self._writer.epoch

    def acquire(self) -> int:
        """Register as the branch's writer now (a restarted worker taking over; or, after a
        FencedError, taking the branch back on purpose); returns the epoch."""
        self._fenced = self._lapsed = None
        self._load_head()
        return self._writer.epoch

    def flush(self) -> None:
        """Commit the open group (the saves since the last commit) now."""
        if self._group:
            self._commit_group()

    def close(self) -> None:
        """Commit the open group; pages are sealed as they fill up, so nothing else is left."""
        self.flush()

    def _commit_group(self) -> None:
        """One blob and one commit for the open group. On failure the group is lost (the error
        names its steps) and the in-memory state is rebuilt from the last commit by the next save."""
        group, self._group = self._group, []
        t1 = time.perf_counter()
        writer = self._writer
        steps = [e["step"] for e, _ in group]
        span = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}..{steps[-1]}"
        try:
            for h, doc in self._new_layouts.items():  # right before the commit, like the blob: gc's grace covers both
                if not self.store.create(layout_key(self.run, h), doc):
                    self.store.touch(layout_key(self.run, h))
            rows = [r for _, rs in group for r in rs]
            blob = write_blob(rows, {"run": self.run, "branch_id": writer.bid, "steps": [steps[0], steps[-1]]})
            h, size = self.store.put_blob(self.run, blob)
            seal_s = self.sealer.seconds
            writer.commit([e for e, _ in group], [{"name": "0", "blob": [h, size]}],
                          slices=sorted({k for e, _ in group for k in e["slices"]}))
        except RaybranchError as exc:
            self._lapsed = (writer.epoch, writer.writer_id, writer.bid)
            self._loaded, self._writer, self._head = False, None, None
            self._new_layouts.clear()  # the reload from the last commit names its own
            if isinstance(exc, FencedError):  # stays fenced: only acquire() takes the branch back
                self._fenced = f"{span} of branch {self.branch!r} not committed: {exc}"
                raise FencedError(self._fenced) from None
            raise type(exc)(f"{span} of branch {self.branch!r} not committed: {exc}") from None
        self._new_layouts.clear()
        try:  # the commit stands; a seal cut short (store error) is finished by the next commit
            self.sealer.seal_due(writer)
        except RaybranchError as exc:
            warnings.warn(f"branch {self.branch!r}: {span} committed, but sealing "
                          f"(compaction) of a full page failed; the next commit retries it: {exc}", stacklevel=3)
        self.timings["compact_s"] += self.sealer.seconds - seal_s
        self.timings["write_s"] += time.perf_counter() - t1 - (self.sealer.seconds - seal_s)

    # -- internals ----------------------------------------------------------------------------
    def _load_head(self) -> None:
        """Become the branch's writer (creating the branch if it is new) and, for an existing
        branch, rebuild the encoders' reconstructions from its head."""
        if self._loaded:
            return
        if self._fenced:
            raise FencedError(f"{self._fenced} (this Checkpointer stays fenced; acquire() takes the branch back)")
        ref = read_branch_ref(self.store, self.run, self.branch)
        if ref is None or not ref.live:
            try:
                self._writer = create_branch(self.store, self.run, self.branch, page_size=self.segment_size or PAGE_SIZE)
            except ConflictError:  # created by another process just now: take it over
                ref = read_branch_ref(self.store, self.run, self.branch)
        if self._writer is None and self._lapsed is not None:
            self._writer = self._rejoin(ref)  # after a failed commit: the same epoch, or fenced
        if self._writer is None:
            self._writer = BranchWriter.register(BranchLog(self.store, self.run, ref.doc["branch_id"], self.branch))
        self._lapsed = None
        self._enc = StateEncoder(self.params, self.key_every, self.standalone_every, self.device, self.restore_budget_s)
        lin = Lineage(self.store, self.run, log=self._writer.log)
        if lin.head_step is not None:
            for attempt in range(8):  # the writer we fenced may still be sealing a page: read again
                try:
                    acc, exact, layout, last = self.reader.recon(lin, lin.head_step)
                    base, base_state, keys = self.reader.exact_base(lin, lin.head_step)
                    break
                except NotFoundError:
                    if attempt == 7:
                        raise
                    self._writer.log.open()
                    self.reader = Reader(self.store, self.run)
                    lin = Lineage(self.store, self.run, log=self._writer.log)
            self._enc.load(layout, last["layout"], acc, exact, base, base_state, keys)
            self._head = last
        self._loaded = True  # only once the head is really loaded: a failed read is retried by the next save


    def _rejoin(self, ref) -> BranchWriter:
        """Continue under the epoch this writer held before a failed commit: a store error is no
        reason to take the branch back from a newer writer that registered meanwhile."""
        epoch, writer_id, bid = self._lapsed
        if ref is None or not ref.live or ref.doc["branch_id"] != bid:
            raise FencedError(f"branch {self.branch!r} of run {self.run!r} was replaced while this writer (epoch {epoch}) was cut off")
        log = BranchLog(self.store, self.run, bid, self.branch).open()
        if log.head["epoch"] > epoch:
            self._fenced = (f"branch {self.branch!r} of run {self.run!r}: writer epoch {epoch} was fenced by epoch "
                            f"{log.head['epoch']} while its commit failed")
            raise FencedError(self._fenced)
        return BranchWriter(log, epoch, writer_id)


def open_checkpointer(uri: str, run: str, branch: str = "main", **kwargs) -> Checkpointer:
    return Checkpointer(open_store(uri), run, branch, **kwargs)


__all__ = ["Checkpointer", "log_record", "open_checkpointer"]
