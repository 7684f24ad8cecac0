"""Compaction, the one rewrite left: a sealed page's steps → one segment blob.

Per-step blobs pay a fixed cost each (Arrow schema and footer, a file) and are compressed with a
fast zstd level on the training path. When the ledger seals a page
(:mod:`raybranch.ledger.pages`) it calls :func:`compact_rows` with the page's step entries; every
LC stream is recompressed at :data:`raybranch.codec.streams.COMPACT_LEVEL` into one Arrow blob
whose rows keep their steps. The decoded content is unchanged, so restores are bit-identical
before and after; the page names the new blob, and the per-step blobs are deleted after the page
and top.json are written.
"""
from __future__ import annotations

import numpy as np

from ..codec.modes import LOSSY_KINDS, stream_bound
from ..codec.streams import COMPACT_LEVEL, recompress
from ..store.blob import Row, read_blob, write_blob
from ..store.store import Store
from . import state as st


def _bound(r: Row) -> int:
    n = int(np.prod(r.shape, dtype=np.int64))
    if r.kind in LOSSY_KINDS:
        return stream_bound(r.kind, n)
    return n * st.numpy_storage_dtype(r.dtype).itemsize


def compact_rows(store: Store, run: str, bid: str, entries: list[dict]) -> list[dict]:
    """Write the rows of ``entries`` (resolved step entries of one page) as one blob; its parts."""
    rows: list[Row] = []
    seen: set[str] = set()
    for e in entries:
        for p in e["parts"]:
            h, size = p["blob"]
            if h in seen:
                continue
            seen.add(h)
            for r in read_blob(store.get_blob(run, h, size), f"blob {h}")[0]:
                if r.kind in LOSSY_KINDS:  # exact rows (optimizer moments, …) gain little and cost much at this level
                    r.payload = recompress(r.payload, _bound(r), COMPACT_LEVEL)
                rows.append(r)
    steps = {e["step"] for e in entries}
    rows = [r for r in rows if r.step in steps]
    h, size = store.put_blob(run, write_blob(rows, {"run": run, "branch_id": bid, "segment": [min(steps), max(steps)]}))
    return [{"name": "segment", "blob": [h, size]}]
