"""Checkpointer: a compressed checkpoint of a branch at every step, restorable at any step.

    ckpt = Checkpointer(store, run="exp1", branch="main", bits=3)
    ckpt.save(step, model, optimizer=None, extra=None)   # -> "exp1/main/<step>"
    state = ckpt.restore(step=None)                       # latest if None
    ckpt.log()                                            # every committed checkpoint

Per checkpoint, floating-point model tensors (the *lossy group*) are LC-coded against the
previous reconstruction (:mod:`raybranch.codec.delta`); integer buffers, tensors under
``min_lossy_numel`` entries, names matching ``exact`` and (by default) optimizer state are
stored losslessly, and only when they changed. The first checkpoint of a branch is an exact
snapshot; later snapshots only when ``snapshot_every`` asks for them (a snapshot is a cache of a
reconstruction the deltas already determine: it bounds restore time and costs ratio, see
docs/DECISIONS.md).

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

from ..codec.delta import DeltaEncoder
from ..codec.lc import LCParams
from ..codec.streams import encode_exact
from ..errors import ConflictError, FencedError, NonFiniteError, NotFoundError, RaybranchError
from ..ledger.branch import BranchLog, BranchWriter
from ..ledger.lineage import Lineage, create_branch
from ..ledger.pages import Sealer
from ..ledger.records import PAGE_SIZE, check_name, layout_key
from ..ledger.refs import read_branch_ref
from ..store.blob import Row, write_blob
from ..store.store import Store, json_bytes, open_store
from . import state as st
from .compact import compact_rows
from .history import branch_log, log_record
from .restore import Reader


class Checkpointer:
    def __init__(
        self,
        store: Store | str,
        run: str,
        branch: str = "main",
        *,
        bits: int = 3,
        granularity: str = "global",
        value: str = "mean",
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
        self.params = LCParams(bits=bits, granularity=granularity, value=value)
        if snapshot_every is not None and snapshot_every < 1:
            raise RaybranchError(f"snapshot_every must be a positive number of checkpoints, got {snapshot_every}")
        if segment_size < 0:
            raise RaybranchError(f"segment_size must be >= 0 (0 = pages of {PAGE_SIZE} commits, never compacted), got {segment_size}")
        if optimizer_codec not in ("exact", "lc"):
            raise RaybranchError(f"optimizer_codec must be 'exact' or 'lc', got {optimizer_codec!r}")
        if not isinstance(flush_every, int) or flush_every < 1:
            raise RaybranchError(f"flush_every must be a positive number of saves per commit, got {flush_every!r}")
        self.snapshot_every = snapshot_every
        self.segment_size = segment_size
        self.flush_every = flush_every
        self.exact_patterns = [re.compile(p) for p in exact]
        self.min_lossy_numel = min_lossy_numel
        self.optimizer_codec = optimizer_codec
        self.save_rng = save_rng
        self.device = torch.device(device) if device is not None else None
        self.reader = Reader(self.store, self.run)
        self.sealer = Sealer(compact_rows if segment_size else None)
        self._writer: BranchWriter | None = None
        self._encoders: dict[str, DeltaEncoder] = {}
        self._layout_hash: str | None = None
        self._last_exact: dict[str, torch.Tensor] = {}
        self._head: dict | None = None  # the head step's entry
        self._loaded = False
        self._group: list[tuple[dict, list[Row]]] = []  # saved, not yet committed
        self._new_layouts: dict[str, bytes] = {}  # layouts the open group names that no commit of ours has yet
        self._fenced: str | None = None  # why this writer was fenced (it stays so until acquire())
        self._lapsed: tuple | None = None  # (epoch, writer id, branch id) held before a failed commit
        self.timings = {"encode_s": 0.0, "write_s": 0.0, "compact_s": 0.0, "lossy_bytes": 0}

    # -- public API ---------------------------------------------------------------------------
    def save(self, step: int, model, optimizer=None, extra: dict | None = None, *, slices=None, tags=None, snapshot: bool = False) -> str:
        """Commit a checkpoint of ``model`` (module or state_dict) at ``step``; returns its id.

        Nothing is written when any tensor holds NaN/Inf (:class:`NonFiniteError`) or when the
        step does not come after the branch's head. A newer writer of the branch makes this raise
        :class:`~raybranch.errors.FencedError`.
        """
        step = int(step)
        tensors, meta = self._collect(model, optimizer, extra)
        if not self._loaded:  # becoming the writer writes (the branch, or a fence commit): refuse NaN/Inf before that
            for n, t in tensors.items():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise NonFiniteError(f"tensor {n!r} holds NaN or Inf at step {step}; nothing was saved")
        self._load_head()
        if self._head is not None and step <= self._head["step"]:
            raise RaybranchError(f"step {step} is not after the head of branch {self.branch!r} (step {self._head['step']})")
        layout, groups, exact_names = self._layout(tensors, _buffer_names(model))
        flats = {g: torch.cat([tensors[n].reshape(-1).float() for n in names]) for g, names in groups.items()}
        for n in exact_names:
            t = tensors[n]
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise NonFiniteError(f"tensor {n!r} holds NaN or Inf at step {step}; nothing was saved")

        layout_bytes = json_bytes(layout)
        layout_hash = hashlib.sha256(layout_bytes).hexdigest()
        depth = 0 if self._head is None else self._head["depth"] + 1
        is_snapshot = (
            snapshot
            or self._head is None
            or layout_hash != self._layout_hash
            or (self.snapshot_every is not None and depth >= self.snapshot_every)
        )
        t0 = time.perf_counter()
        rows: list[Row] = []
        pending: dict[str, torch.Tensor] = {}
        if is_snapshot:
            depth = 0
            for g, flat in flats.items():
                if not bool(torch.isfinite(flat).all()):
                    bad = next(n for n in groups[g] if not bool(torch.isfinite(tensors[n]).all()))
                    raise NonFiniteError(f"tensor {bad!r} holds NaN or Inf at step {step}; nothing was saved")
                arr = flat.cpu().numpy()
                rows.append(Row(step, g, "recon", "float32", (arr.size,), encode_exact(arr)))
        else:
            for g, flat in flats.items():
                payload, tables, q = self._encoders[g].encode(flat)  # raises on NaN/Inf: nothing written yet
                pending[g] = q
                rows.append(Row(step, g, "lc", "float32", (flat.numel(),), payload, tables))
                self.timings["lossy_bytes"] += flat.numel() * 4
        changed = {}
        for n in exact_names:
            t = tensors[n]
            prev = self._last_exact.get(n)
            if is_snapshot or prev is None or prev.shape != t.shape or not torch.equal(prev, t.to(prev.device)):
                changed[n] = t
                rows.append(Row(step, n, "exact", st.dtype_name(t.dtype), tuple(t.shape), encode_exact(st.to_numpy(t))))
        self.timings["encode_s"] += time.perf_counter() - t0

        writer = self._writer
        if layout_hash != self._layout_hash:
            self._new_layouts[layout_hash] = layout_bytes  # written with the group that first names it
        entry = {
            "step": step,
            "kind": "snapshot" if is_snapshot else "delta",
            "base": [writer.bid, step] if is_snapshot else self._head["base"],
            "depth": depth,
            "codec": self.params.to_json(),
            "layout": layout_hash,
            "slices": list(slices or []),
            "tags": list(tags or []),
            "meta": meta,
            "time": round(time.time(), 3),
        }
        # the reconstruction advances at capture; a group that fails to commit rebuilds it from the store
        if is_snapshot or layout_hash != self._layout_hash:
            self._reset_encoders(layout, flats)
        else:
            for g, q in pending.items():
                self._encoders[g].advance(q)
        self._layout_hash = layout_hash
        for n, t in changed.items():
            self._last_exact[n] = t.detach().clone()
        self._head = {**entry, "branch_id": writer.bid}
        self._group.append((entry, rows))
        if len(self._group) >= self.flush_every or is_snapshot or tags:
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
        kwargs = dict(
            bits=self.params.bits, granularity=self.params.granularity, value=self.params.value,
            snapshot_every=self.snapshot_every, segment_size=self.segment_size,
            exact=[p.pattern for p in self.exact_patterns], min_lossy_numel=self.min_lossy_numel,
            optimizer_codec=self.optimizer_codec, save_rng=self.save_rng, device=self.device, flush_every=self.flush_every,
        )
        kwargs.update(overrides)
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
    def _collect(self, model, optimizer, extra) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = st.model_tensors(model)
        for k in tensors:
            if k.split("/", 1)[0] in ("optim", "rng", "extra"):
                raise RaybranchError(f"model state key {k!r} clashes with raybranch's reserved prefixes")
        meta: dict = {}
        if optimizer is not None:
            ot, om = st.optimizer_tensors(optimizer)
            tensors.update(ot)
            meta["optimizer"] = om
        if self.save_rng if self.save_rng is not None else optimizer is not None:
            rt, rm = st.rng_tensors()
            tensors.update(rt)
            meta["rng"] = rm
        if extra:
            et, em = st.extra_tensors(extra)
            tensors.update(et)
            meta["extra"] = em
        return tensors, meta

    def _is_lossy(self, name: str, t: torch.Tensor) -> bool:
        if not t.is_floating_point() or t.numel() < self.min_lossy_numel:
            return False
        if name.startswith(("rng/", "extra/")):
            return False
        if name.startswith("optim/") and self.optimizer_codec != "lc":
            return False
        return not any(p.search(name) for p in self.exact_patterns)

    def _layout(self, tensors: dict[str, torch.Tensor], buffers: set[str]) -> tuple[dict, dict[str, list[str]], list[str]]:
        """Lossy groups: "model" (parameters), "buffers" (float buffers such as BatchNorm running
        statistics, whose scale has nothing to do with the weights': global buckets over both
        would spend every bucket on the statistics), "optim" (opt-in)."""
        groups: dict[str, list[str]] = {}
        exact: list[str] = []
        for n, t in tensors.items():
            if self._is_lossy(n, t):
                g = "optim" if n.startswith("optim/") else "buffers" if n in buffers else "model"
                groups.setdefault(g, []).append(n)
            else:
                exact.append(n)
        layout = {
            "groups": {
                g: {
                    "names": names,
                    "shapes": [list(tensors[n].shape) for n in names],
                    "dtypes": [st.dtype_name(tensors[n].dtype) for n in names],
                    "sizes": [tensors[n].numel() for n in names],
                }
                for g, names in groups.items()
            },
            "exact": exact,
            "model_keys": [n for n in tensors if not n.startswith(("optim/", "rng/", "extra/"))],
        }
        return layout, groups, exact

    def _reset_encoders(self, layout: dict, flats: dict[str, torch.Tensor]) -> None:
        self._encoders = {}
        for g, group in layout["groups"].items():
            dev = self.device or flats[g].device
            enc = DeltaEncoder(group["names"], group["sizes"], self.params, dev)
            enc.reset(flats[g])
            self._encoders[g] = enc

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
        lin = Lineage(self.store, self.run, log=self._writer.log)
        if lin.head_step is not None:
            for attempt in range(8):  # the writer we fenced may still be sealing a page: read again
                try:
                    acc, exact, layout, last = self.reader.recon(lin, lin.head_step)
                    break
                except NotFoundError:
                    if attempt == 7:
                        raise
                    self._writer.log.open()
                    self.reader = Reader(self.store, self.run)
                    lin = Lineage(self.store, self.run, log=self._writer.log)
            flats = {g: torch.from_numpy(a) for g, a in acc.items()}
            self._reset_encoders(layout, flats)
            self._layout_hash = last["layout"]
            self._last_exact = dict(exact)
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


_STAT_BUFFER = re.compile(r"(^|\.)running_(mean|var)$")


def _buffer_names(model) -> set[str]:
    """Float buffers of a module; for a plain state_dict, BatchNorm-style running statistics."""
    if isinstance(model, torch.nn.Module):
        return {n for n, _ in model.named_buffers()}
    return {n for n in model if _STAT_BUFFER.search(n)}


def open_checkpointer(uri: str, run: str, branch: str = "main", **kwargs) -> Checkpointer:
    return Checkpointer(open_store(uri), run, branch, **kwargs)


__all__ = ["Checkpointer", "log_record", "open_checkpointer"]
