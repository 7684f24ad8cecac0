"""Compaction: many per-step delta checkpoints → one segment blob + one segment document.

Per-step blobs pay a fixed cost each (Arrow schema and footer, a manifest, a file) and are
compressed with a fast zstd level on the training path. Every ``segment_size`` loose deltas of a
branch are rewritten as one Arrow blob whose rows keep their steps, with every stream
recompressed at :data:`raybranch.codec.streams.COMPACT_LEVEL`. The decoded content is unchanged,
so restores are bit-identical before and after.

Crash safety: the segment blob is written, then the segment document (the new commit of those
steps), then the loose manifests are deleted, then their blobs. Before the segment document
lands nothing has changed; after it, a loose manifest that survives a crash names the same
checkpoint as the segment entry (readers take the segment's) and is removed by the next pass.
"""
from __future__ import annotations

import numpy as np

from ..codec.streams import COMPACT_LEVEL, recompress
from ..store.blob import Row, read_blob, write_blob
from ..store.store import Store
from . import state as st
from .manifest import SEGMENT_FORMAT, RunIndex, seal, segment_path

_ENTRY_KEYS = ("step", "kind", "parent", "depth", "codec", "layout", "blob", "slices", "tags", "meta", "time")


def _bound(r: Row) -> int:
    n = int(np.prod(r.shape, dtype=np.int64))
    if r.kind == "lc":
        return (n + 7) // 8 + n
    return n * st.numpy_storage_dtype(r.dtype).itemsize


def compact_branch(store: Store, index: RunIndex, branch: str, segment_size: int, tail: bool = False) -> int:
    """Compact loose deltas of ``branch``; returns how many checkpoints moved into segments."""
    entries = index.entries(branch)
    run = index.run
    for e in index.leftovers.pop(branch, []):  # an interrupted pass: finish its deletes
        store.delete(e["file"])
        if e["blob"] and e["blob"][0] != entries[e["step"]]["blob"][0]:
            store.delete(f"{run}/blobs/{e['blob'][0]}.arrow")
    loose = [e for e in entries.values() if "file" in e and e["kind"] == "delta"]
    moved = 0
    while len(loose) >= segment_size or (tail and len(loose) >= 2):
        batch, loose = loose[:segment_size], loose[segment_size:]
        rows: list[Row] = []
        for e in batch:
            step_rows, _ = read_blob(store.get_blob(run, *e["blob"]), f"blob {e['blob'][0]}")
            for r in step_rows:
                if r.kind == "lc":  # exact rows (optimizer moments, …) gain little and cost much at this level
                    r.payload = recompress(r.payload, _bound(r), COMPACT_LEVEL)
                rows.append(r)
        first, last = batch[0]["step"], batch[-1]["step"]
        h, size = store.put_blob(run, write_blob(rows, {"run": run, "branch": branch, "segment": [first, last]}))
        seg_entries = [{**{k: e.get(k) for k in _ENTRY_KEYS}, "blob": [h, size]} for e in batch]
        rel = segment_path(run, branch, first, last)
        store.write_json(rel, seal({"format": SEGMENT_FORMAT, "run": run, "branch": branch, "first": first, "last": last, "entries": seg_entries}))
        updated = dict(entries)  # the segment is the commit of these steps now, whatever the deletes do
        for se in seg_entries:
            updated[se["step"]] = {**se, "run": run, "branch": branch, "segment": rel}
        index.replace(branch, updated)
        entries = updated
        for e in batch:
            store.delete(e["file"])
        for e in batch:
            if e["blob"][0] != h:
                store.delete(f"{run}/blobs/{e['blob'][0]}.arrow")
        moved += len(batch)
    return moved
