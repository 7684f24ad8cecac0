"""Restore: the nearest exact state plus the deltas after it → the exact reconstruction ũ_t.

The step's entry (resolved along the branch's lineage, :class:`raybranch.ledger.Lineage`) names
``base``, the exact checkpoint its chain starts from; the entries from there to the step are
fetched page by page, and the rows of each step are read from the blobs of its commit's parts.

An exact checkpoint is a standalone snapshot (rows ``recon``) or a key frame (rows ``key``, coded
against the previous exact state, named by its ``ref``); a key frame's state is rebuilt from the
snapshot its refs lead to, one decode per key frame (at most ``standalone_every`` of them).

For each lossy group, acc = that exact state, then for every delta on the chain, in order,
acc ← acc + Q(δ) (:func:`raybranch.codec.modes.apply_rows`) — the same float32 operations the
encoder made, so the result equals the encoder's reconstruction bit for bit. Exact tensors are
taken from the newest checkpoint on the chain, or on its key frames' refs back to the snapshot,
that stored them (unchanged ones are not re-stored, not even by a key frame).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..codec.exact import decode_against
from ..codec.modes import LOSSY_KINDS, apply_rows, params_from_json
from ..codec.streams import decode_exact
from ..errors import CorruptBlobError, NotFoundError
from ..store.blob import Row, read_blob
from ..ledger.lineage import Lineage
from ..ledger.records import layout_key
from ..store.store import Store, json_bytes
from . import state as st


DEFER_HASH_BYTES = 8 << 20  # blobs this large are decoded while their sha256 runs beside


class BlobCache:
    """Parsed blobs by hash, rows grouped by step (a compacted segment is read and parsed once)."""

    def __init__(self, store: Store, run: str, capacity: int = 64):
        self.store, self.run, self.capacity = store, run, capacity
        self._rows: OrderedDict[str, dict[int, list[Row]]] = OrderedDict()
        self._checks: dict[str, object] = {}  # blobs parsed while their sha256 still runs

    def step_rows(self, entry: dict, verified: bool = True) -> list[Row]:
        """Every row of ``entry``'s step, from all the parts of its commit. ``verified=False``:
        large blobs may still be hashing; call :meth:`verify` before anything decoded leaves."""
        out: list[Row] = []
        for p in entry["parts"]:
            out += self.rows(p["blob"], verified).get(entry["step"], [])
        return out

    def rows(self, blob: list, verified: bool = True) -> dict[int, list[Row]]:
        h, size = blob
        if h not in self._rows:
            if size is not None and size >= DEFER_HASH_BYTES:
                data, self._checks[h] = self.store.get_blob_deferred(self.run, h, size)
            else:
                data = self.store.get_blob(self.run, h, size)
            try:
                rows, _ = read_blob(data, f"blob {h}")
            except CorruptBlobError:
                self.verify([h])  # a damaged blob says so by its hash first
                raise
            by_step: dict[int, list[Row]] = {}
            for r in rows:
                by_step.setdefault(r.step, []).append(r)
            self._rows[h] = by_step
            while len(self._rows) > self.capacity:
                self.verify([self._rows.popitem(last=False)[0]])
        self._rows.move_to_end(h)
        if verified:
            self.verify([h])
        return self._rows[h]

    def verify(self, hashes) -> None:
        """Wait for the hashes of these blobs; a mismatch drops the blob and raises CorruptBlobError."""
        for h in hashes:
            check = self._checks.pop(h, None)
            if check is not None:
                try:
                    check()
                except CorruptBlobError:
                    self._rows.pop(h, None)
                    raise

    def prefetch(self, blobs: list[list]) -> None:
        todo = list({b[0]: b for b in blobs if b[0] not in self._rows}.values())
        if len(todo) > 1 and not self.store.loc.is_local:
            with ThreadPoolExecutor(max_workers=min(16, len(todo))) as pool:
                list(pool.map(self.rows, todo))


class Layouts:
    def __init__(self, store: Store, run: str):
        self.store, self.run = store, run
        self._docs: dict[str, dict] = {}

    def get(self, h: str) -> dict:
        if h not in self._docs:
            try:
                doc = self.store.read_json(layout_key(self.run, h))
            except NotFoundError:
                raise NotFoundError(f"layout {h[:16]}… of run {self.run!r} is missing") from None
            if hashlib.sha256(json_bytes(doc)).hexdigest() != h:
                raise CorruptBlobError(f"layout {self.run}/layouts/{h}.json is corrupt: its sha256 does not match its name")
            self._docs[h] = doc
        return self._docs[h]


EXACT_KINDS = ("snapshot", "key")


def decode_chain(chain: list[dict], blobs: BlobCache, layouts: Layouts, refs: list[dict] = ()) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor], dict]:
    """(flat reconstructions per lossy group, exact tensors, layout) of the chain's last entry.

    ``refs``: the exact entries the chain's first one is coded against, from a standalone
    snapshot on (empty when it is one). Decoding starts at the chain's last exact entry
    (retention may have turned a step inside a chain into one); exact tensors are looked up from
    the end back to the chain's start, then through ``refs`` back to the snapshot (a key frame
    stores only the exact tensors that changed)."""
    full = chain
    start = max(i for i, e in enumerate(chain) if e["kind"] in EXACT_KINDS)
    chain = chain[start:]
    exacts = list(refs) + [chain[0]] if chain[0]["kind"] == "key" and start == 0 else [chain[0]]
    if exacts[0]["kind"] != "snapshot":
        raise CorruptBlobError(f"key frame {chain[0]['branch_id']}/{chain[0]['step']} does not lead back to a snapshot")
    blobs.prefetch([p["blob"] for e in exacts + chain[1:] for p in e["parts"]])
    layout = layouts.get(chain[-1]["layout"])
    acc = exact_state(exacts, blobs)
    for g in layout["groups"]:
        if g not in acc:
            raise CorruptBlobError(f"exact checkpoint {chain[0]['branch_id']}/{chain[0]['step']} lacks group {g!r}")
    deltas: dict[str, list] = {g: [] for g in acc}
    for e in chain[1:]:
        params = params_from_json(e["codec"])
        for r in _rows_of(blobs, e):
            if r.kind in LOSSY_KINDS:
                if r.name not in deltas:
                    raise CorruptBlobError(f"delta of {e['branch_id']}/{e['step']} names group {r.name!r}, which its exact state lacks")
                deltas[r.name].append((r.kind, r.payload, r.table, params))
    for g, rows in deltas.items():
        try:
            apply_rows(acc[g], rows, layout["groups"][g]["sizes"])
        except (ValueError, IndexError, KeyError) as exc:
            raise CorruptBlobError(f"the deltas of group {g!r} from {chain[0]['branch_id']}/{chain[0]['step']} to step "
                                   f"{chain[-1]['step']} cannot be decoded: {exc}") from None
    exact = exact_tensors(exacts[:-1] + full if len(exacts) > 1 else full, blobs)  # a key frame stores only changed ones
    missing = [n for n in layout["exact"] if n not in exact]
    if missing:
        raise CorruptBlobError(f"checkpoint {chain[-1]['branch_id']}/{chain[-1]['step']} lacks exact tensors {missing[:3]}")
    blobs.verify(p["blob"][0] for e in exacts + full for p in e["parts"])
    return acc, exact, layout


def exact_tensors(entries: list[dict], blobs: BlobCache) -> dict[str, torch.Tensor]:
    """The exact tensors as of the last of ``entries`` (in chain order): each from the newest
    entry that stored it."""
    exact: dict[str, torch.Tensor] = {}
    for e in reversed(entries):
        for r in _rows_of(blobs, e):
            if r.kind == "exact" and r.name not in exact:
                arr = decode_exact(r.payload, st.numpy_storage_dtype(r.dtype), r.shape)
                exact[r.name] = st.from_numpy(arr, r.dtype, r.shape)
    return exact


def exact_state(exacts: list[dict], blobs: BlobCache) -> dict[str, np.ndarray]:
    """The lossy groups' exact state at the last of ``exacts``: a snapshot, then key frames each
    coded against the one before (:func:`raybranch.codec.exact.decode_against`)."""
    acc: dict[str, np.ndarray] = {}
    for e in exacts:
        for r in _rows_of(blobs, e):
            try:
                if r.kind == "recon":
                    a = decode_exact(r.payload, np.float32, r.shape)
                    acc[r.name] = a if a.flags.writeable else a.copy()
                elif r.kind == "key":
                    if r.name not in acc:
                        raise ValueError("its reference lacks the group")
                    acc[r.name] = decode_against(r.payload, acc[r.name])
            except ValueError as exc:
                blobs.verify(p["blob"][0] for p in e["parts"])  # a damaged blob says so by its hash first
                raise CorruptBlobError(f"exact state of {e['branch_id']}/{e['step']} group {r.name!r} cannot be decoded: {exc}") from None
    blobs.verify(p["blob"][0] for e in exacts for p in e["parts"])
    return acc


def _rows_of(blobs: BlobCache, entry: dict) -> list[Row]:
    rows = blobs.step_rows(entry, verified=False)  # decode_chain verifies before it returns
    if not rows:
        raise CorruptBlobError(f"the blobs of step {entry['step']} (commit {entry['seq']} of {entry['branch_id']}) hold no rows for it")
    return rows


def group_tensors(flat: np.ndarray, group: dict) -> dict[str, torch.Tensor]:
    """The group's tensors; float32 ones are views of ``flat`` (which the caller hands over)."""
    out, off = {}, 0
    t = torch.from_numpy(flat)
    for name, shape, dtype, size in zip(group["names"], group["shapes"], group["dtypes"], group["sizes"]):
        out[name] = t[off : off + size].reshape(shape).to(st.dtype_from_name(dtype))
        off += size
    return out


def assemble(acc: dict[str, np.ndarray], exact: dict[str, torch.Tensor], layout: dict, meta: dict) -> dict:
    """The user-facing restored state: model state_dict in its original key order, optimizer, …"""
    tensors = dict(exact)
    for g, group in layout["groups"].items():
        tensors.update(group_tensors(acc[g], group))
    model = OrderedDict((k, tensors[k]) for k in layout["model_keys"])
    optim = {k: v for k, v in tensors.items() if k.startswith("optim/")}
    rng = {k: v for k, v in tensors.items() if k.startswith("rng/")}
    extra_t = {k: v for k, v in tensors.items() if k.startswith("extra/")}
    return {
        "model": model,
        "optimizer": st.optimizer_state_dict(optim, meta["optimizer"]) if "optimizer" in meta else None,
        "rng": {"tensors": rng, "meta": meta["rng"]} if "rng" in meta else None,
        "extra": st.extra_from(extra_t, meta.get("extra", {})),
    }


class Reader:
    """Restores any committed checkpoint of a run (no Ray, no training state needed)."""

    def __init__(self, store: Store, run: str):
        self.store = store
        self.run = run
        self.blobs = BlobCache(store, run)
        self.layouts = Layouts(store, run)
        self._lineages: dict[str, Lineage] = {}

    def lineage(self, branch: str, refresh: bool = False) -> Lineage:
        if refresh or branch not in self._lineages:
            self._lineages[branch] = Lineage(self.store, self.run, branch)
        return self._lineages[branch]

    def restore(self, branch: str, step: int | None = None) -> dict:
        try:
            return self._restore(self.lineage(branch, refresh=step is None), step)  # latest: the head as it is now
        except NotFoundError:
            # the branch moved on (new commits, or pages sealed and their commit records gone): look once more
            return self._restore(self.lineage(branch, refresh=True), step)

    def _restore(self, lin: Lineage, step: int | None) -> dict:
        target = lin.entry(step)
        chain = chain_to(lin, target)
        acc, exact, layout = decode_chain(chain, self.blobs, self.layouts, key_refs(lin, chain[0]))
        out = assemble(acc, exact, layout, target.get("meta", {}))
        out.update(step=target["step"], branch=lin.name, run=self.run, manifest=_public(target, lin))
        return out

    def recon(self, lin: Lineage, step: int) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor], dict, dict]:
        """Raw reconstruction state (for continuing a chain): flats, exact tensors, layout, last entry."""
        target = lin.entry(step)
        chain = chain_to(lin, target)
        refs = key_refs(lin, chain[0])
        acc, exact, layout = decode_chain(chain, self.blobs, self.layouts, refs)
        return acc, exact, layout, target

    def exact_base(self, lin: Lineage, step: int) -> tuple[dict, dict[str, np.ndarray], int, dict[str, torch.Tensor]]:
        """(the exact entry step ``step``'s chain starts from, its lossy groups' state, how many
        key frames lead to it from its snapshot, its exact tensors): what a writer continuing the
        branch codes its next key frame against."""
        base = chain_to(lin, lin.entry(step))[0]
        refs = key_refs(lin, base)
        exacts = refs + [base] if base["kind"] == "key" else [base]
        return base, exact_state(exacts, self.blobs), len(refs), exact_tensors(exacts, self.blobs)


def chain_to(lin: Lineage, target: dict) -> list[dict]:
    """Entries from the exact checkpoint ``target`` builds on to ``target``, in apply order."""
    base_step = target["base"][1]
    chain = lin.entries_between(base_step, target["step"])
    if not chain or chain[0]["kind"] not in EXACT_KINDS or chain[-1]["step"] != target["step"]:
        raise CorruptBlobError(f"the chain of step {target['step']} of run {lin.run!r} does not start at exact checkpoint {base_step}")
    return chain


def key_refs(lin: Lineage, entry: dict) -> list[dict]:
    """The exact entries a key frame is coded against, oldest (a standalone snapshot) first;
    empty for anything but a key frame."""
    refs: list[dict] = []
    e = entry
    while e["kind"] == "key":
        e = lin.entry(e["ref"][1])
        if e["kind"] not in EXACT_KINDS or e["step"] >= (refs[-1] if refs else entry)["step"]:
            raise CorruptBlobError(f"key frame {entry['branch_id']}/{entry['step']} refers to step {e['step']}, not an earlier exact checkpoint")
        refs.append(e)
    return refs[::-1]


def _public(entry: dict, lin: Lineage) -> dict:
    return {**{k: v for k, v in entry.items() if k != "parts"}, "branch": lin.branch_name_of(entry["branch_id"])}
