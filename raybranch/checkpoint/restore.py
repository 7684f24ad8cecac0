"""Restore: the nearest snapshot plus the LC deltas after it → the exact reconstruction ũ_t.

The step's entry (resolved along the branch's lineage, :class:`raybranch.ledger.Lineage`) names
``base``, the snapshot its chain starts from; the entries from there to the step are fetched
page by page, and the rows of each step are read from the blobs of its commit's parts.

For each lossy group, acc = ũ_snapshot (exact float32), then for every delta on the chain, in
order, acc ← acc + Q(δ) (:func:`raybranch.codec.delta.apply_delta`) — the same float32 adds the
encoder made, so the result equals the encoder's reconstruction bit for bit. Exact tensors are
taken from the newest checkpoint on the chain that stored them (unchanged ones are not re-stored).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..codec.delta import apply_delta
from ..codec.lc import LCParams
from ..codec.streams import decode_exact
from ..errors import CorruptBlobError, NotFoundError
from ..store.blob import Row, read_blob
from ..ledger.lineage import Lineage
from ..ledger.records import layout_key
from ..store.store import Store, json_bytes
from . import state as st


class BlobCache:
    """Parsed blobs by hash, rows grouped by step (a compacted segment is read and parsed once)."""

    def __init__(self, store: Store, run: str, capacity: int = 64):
        self.store, self.run, self.capacity = store, run, capacity
        self._rows: OrderedDict[str, dict[int, list[Row]]] = OrderedDict()

    def step_rows(self, entry: dict) -> list[Row]:
        """Every row of ``entry``'s step, from all the parts of its commit."""
        out: list[Row] = []
        for p in entry["parts"]:
            out += self.rows(p["blob"]).get(entry["step"], [])
        return out

    def rows(self, blob: list) -> dict[int, list[Row]]:
        h, size = blob
        if h not in self._rows:
            rows, _ = read_blob(self.store.get_blob(self.run, h, size), f"blob {h}")
            by_step: dict[int, list[Row]] = {}
            for r in rows:
                by_step.setdefault(r.step, []).append(r)
            self._rows[h] = by_step
            while len(self._rows) > self.capacity:
                self._rows.popitem(last=False)
        self._rows.move_to_end(h)
        return self._rows[h]

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


def seg_offsets(layout_group: dict, params: LCParams) -> np.ndarray | None:
    if params.granularity != "tensor" or len(layout_group["sizes"]) < 2:
        return None
    return np.concatenate([[0], np.cumsum(layout_group["sizes"])[:-1]]).astype(np.int64)


def decode_chain(chain: list[dict], blobs: BlobCache, layouts: Layouts) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor], dict]:
    """(flat reconstructions per lossy group, exact tensors, layout) of the chain's last entry.

    Decoding starts at the chain's last snapshot (retention may have turned a step inside a
    chain into one); exact tensors are looked up from the end back to the chain's start."""
    full = chain
    chain = chain[max(i for i, e in enumerate(chain) if e["kind"] == "snapshot"):]
    blobs.prefetch([p["blob"] for e in chain for p in e["parts"]])
    layout = layouts.get(chain[-1]["layout"])
    snap = chain[0]
    snap_rows = _rows_of(blobs, snap)
    acc: dict[str, np.ndarray] = {}
    for r in snap_rows:
        if r.kind == "recon":
            acc[r.name] = np.array(decode_exact(r.payload, np.float32, r.shape), copy=True)
    for g in layout["groups"]:
        if g not in acc:
            raise CorruptBlobError(f"snapshot {snap['branch_id']}/{snap['step']} lacks group {g!r}")
    for i, e in enumerate(chain[1:]):
        params = LCParams.from_json(e["codec"])
        for r in _rows_of(blobs, e):
            if r.kind != "lc":
                continue
            group = layout["groups"][r.name]
            offs = seg_offsets(group, params)
            tables = r.table.reshape(-1, params.levels)
            try:
                apply_delta(acc[r.name], r.payload, tables, offs, first=(i == 0))
            except (ValueError, IndexError) as exc:
                raise CorruptBlobError(f"delta of {e['branch_id']}/{e['step']} group {r.name!r} cannot be decoded: {exc}") from None
    exact: dict[str, torch.Tensor] = {}
    for e in reversed(full):
        for r in _rows_of(blobs, e):
            if r.kind == "exact" and r.name not in exact:
                arr = decode_exact(r.payload, st.numpy_storage_dtype(r.dtype), r.shape)
                exact[r.name] = st.from_numpy(arr, r.dtype, r.shape)
    missing = [n for n in layout["exact"] if n not in exact]
    if missing:
        raise CorruptBlobError(f"checkpoint {chain[-1]['branch_id']}/{chain[-1]['step']} lacks exact tensors {missing[:3]}")
    return acc, exact, layout


def _rows_of(blobs: BlobCache, entry: dict) -> list[Row]:
    rows = blobs.step_rows(entry)
    if not rows:
        raise CorruptBlobError(f"the blobs of step {entry['step']} (commit {entry['seq']} of {entry['branch_id']}) hold no rows for it")
    return rows


def group_tensors(flat: np.ndarray, group: dict) -> dict[str, torch.Tensor]:
    out, off = {}, 0
    t = torch.from_numpy(flat)
    for name, shape, dtype, size in zip(group["names"], group["shapes"], group["dtypes"], group["sizes"]):
        out[name] = t[off : off + size].reshape(shape).to(st.dtype_from_name(dtype), copy=True)
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
        acc, exact, layout = decode_chain(chain, self.blobs, self.layouts)
        out = assemble(acc, exact, layout, target.get("meta", {}))
        out.update(step=target["step"], branch=lin.name, run=self.run, manifest=_public(target, lin))
        return out

    def recon(self, lin: Lineage, step: int) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor], dict, dict]:
        """Raw reconstruction state (for continuing a chain): flats, exact tensors, layout, last entry."""
        target = lin.entry(step)
        chain = chain_to(lin, target)
        acc, exact, layout = decode_chain(chain, self.blobs, self.layouts)
        return acc, exact, layout, target


def chain_to(lin: Lineage, target: dict) -> list[dict]:
    """Entries from the snapshot ``target`` builds on to ``target``, in apply order."""
    base_step = target["base"][1]
    chain = lin.entries_between(base_step, target["step"])
    if not chain or chain[0]["kind"] != "snapshot" or chain[-1]["step"] != target["step"]:
        raise CorruptBlobError(f"the chain of step {target['step']} of run {lin.run!r} does not start at snapshot {base_step}")
    return chain


def _public(entry: dict, lin: Lineage) -> dict:
    return {**{k: v for k, v in entry.items() if k != "parts"}, "branch": lin.branch_name_of(entry["branch_id"])}
