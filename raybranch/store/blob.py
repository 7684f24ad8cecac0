"""Arrow IPC blobs: one row per stored piece of a checkpoint.

Columns::

    step     int64          the checkpoint's step (a compacted segment holds many steps)
    name     string         tensor name, or the lossy group's name ("model", "optim")
    kind     string         "uq"    uniform-codec delta of a group (payload) + its steps per tensor
                            "lc"    LC symbol stream of a group (payload) + its bucket tables
                            "recon" a group's exact state, float32, standalone (snapshots)
                            "key"   a group's exact state coded against the previous exact one
                            "exact" one tensor, lossless (integer buffers, tiny or flagged tensors)
    dtype    string         torch dtype name
    shape    list<int64>
    table    list<float32>  "uq": steps Δ [S]; "lc": bucket tables [S × 2^bits], row-major; else null
    payload  large_binary   zstd stream (see raybranch.codec.streams)

Schema metadata ``raybranch`` holds a small JSON header (format, run, branch_id, the step or steps). Nothing is pickled:
a reader needs Arrow, JSON and zstd only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..errors import CorruptBlobError

FORMAT = "raybranch.blob/1"
ZERO_COPY_BYTES = 1 << 20  # payloads this large are read as views into the blob, not copied

SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("name", pa.string()),
        ("kind", pa.string()),
        ("dtype", pa.string()),
        ("shape", pa.list_(pa.int64())),
        ("table", pa.list_(pa.float32())),
        ("payload", pa.large_binary()),
    ]
)


@dataclass
class Row:
    step: int
    name: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    payload: bytes | pa.Buffer  # a read-only view into the blob for large payloads
    table: np.ndarray | None = None


def write_blob(rows: list[Row], header: dict) -> bytes:
    cols = {
        "step": [r.step for r in rows],
        "name": [r.name for r in rows],
        "kind": [r.kind for r in rows],
        "dtype": [r.dtype for r in rows],
        "shape": [list(r.shape) for r in rows],
        "table": [None if r.table is None else np.asarray(r.table, np.float32).ravel() for r in rows],
        "payload": [r.payload if isinstance(r.payload, bytes) else memoryview(r.payload).tobytes() for r in rows],
    }
    meta = {"raybranch": json.dumps({"format": FORMAT, **header}, separators=(",", ":"), sort_keys=True)}
    table = pa.table(cols, schema=SCHEMA.with_metadata(meta))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _binary_views(col: pa.ChunkedArray) -> list[pa.Buffer]:
    """The values of a large_binary column as slices of its data buffers (no copy; a scalar per
    value would copy it)."""
    out = []
    for arr in col.chunks:
        if arr.null_count:
            raise ValueError("a payload is null")
        offsets = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset : arr.offset + len(arr) + 1]
        data = arr.buffers()[2]
        out += [data.slice(int(a), int(b - a)) for a, b in zip(offsets[:-1], offsets[1:])]
    return out


def read_blob(data: bytes, name: str = "blob") -> tuple[list[Row], dict]:
    try:
        table = pa.ipc.open_file(pa.py_buffer(data)).read_all()
        header = json.loads(table.schema.metadata[b"raybranch"])
        if header.get("format") != FORMAT:
            raise ValueError(f"unknown format {header.get('format')!r}")
        cols = table.drop_columns(["payload"]).to_pydict()
        # zero-copy views of large payloads (a snapshot of a big model need not be copied once more)
        cols["payload"] = [b if b.size >= ZERO_COPY_BYTES else b.to_pybytes() for b in _binary_views(table.column("payload"))]
    except (pa.ArrowException, KeyError, ValueError, TypeError) as exc:
        raise CorruptBlobError(f"{name} is not a readable raybranch blob: {exc}") from None
    rows = [
        Row(
            step=cols["step"][i],
            name=cols["name"][i],
            kind=cols["kind"][i],
            dtype=cols["dtype"][i],
            shape=tuple(cols["shape"][i]),
            payload=cols["payload"][i],
            table=None if cols["table"][i] is None else np.asarray(cols["table"][i], np.float32),
        )
        for i in range(table.num_rows)
    ]
    return rows, header
