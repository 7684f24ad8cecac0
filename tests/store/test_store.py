"""The store interface on a local directory and on a real S3 server (SeaweedFS, see conftest)."""
from __future__ import annotations

import os
import socket
import time
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest

from raybranch.errors import CorruptBlobError, NotFoundError, StoreError
from raybranch.store.blob import Row, read_blob, write_blob
from raybranch.store.store import TMP_MARK, blob_hash, open_store

BACKENDS = ["file_uri", "s3_uri"]


@pytest.fixture(params=BACKENDS)
def store(request):
    return open_store(request.getfixturevalue(request.param))


def rels(store, rel_dir="", recursive=True) -> list[str]:
    return sorted(i.path[len(store.root) + 1 :] for i in store.list(rel_dir, recursive=recursive))


def test_write_read_list_delete(store):
    store.write_bytes("r/a/one.bin", b"hello")
    store.write_bytes("r/a/two.bin", b"")
    store.write_bytes("r/b/three.bin", bytes(range(256)) * 1000)
    assert store.read_bytes("r/a/one.bin") == b"hello"
    assert store.read_bytes("r/a/two.bin") == b""
    assert store.read_bytes("r/b/three.bin") == bytes(range(256)) * 1000
    assert store.exists("r/a/one.bin") and not store.exists("r/a/nope.bin")
    assert store.size("r/b/three.bin") == 256000
    assert rels(store, "r/a", recursive=False) == ["r/a/one.bin", "r/a/two.bin"]
    assert rels(store, "r") == ["r/a/one.bin", "r/a/two.bin", "r/b/three.bin"]
    assert store.list_dirs("r") == ["a", "b"]
    assert store.total_bytes("r") == 5 + 0 + 256000
    assert store.list("does/not/exist") == []

    store.write_bytes("r/a/one.bin", b"replaced")  # overwrite
    assert store.read_bytes("r/a/one.bin") == b"replaced"

    store.delete("r/a/one.bin")
    assert not store.exists("r/a/one.bin")
    assert rels(store, "r") == ["r/a/two.bin", "r/b/three.bin"]
    store.delete("r/a/one.bin")  # deleting what is gone is fine


def test_missing_file_not_found(store):
    with pytest.raises(NotFoundError) as ei:
        store.read_bytes("r/none.bin")
    assert "r/none.bin" in str(ei.value) and "\n" not in str(ei.value)
    with pytest.raises(NotFoundError):
        store.size("r/none.bin")


def test_json_documents(store):
    doc = {"b": [1, 2.5, None], "a": {"x": "y"}}
    store.write_json("r/doc.json", doc)
    store.write_json("r/doc.json.zst", doc)
    assert store.read_json("r/doc.json") == doc
    assert store.read_json("r/doc.json.zst") == doc
    assert store.read_bytes("r/doc.json") == b'{"a":{"x":"y"},"b":[1,2.5,null]}'  # canonical
    store.write_bytes("r/bad.json", b'{"a": ')
    store.write_bytes("r/bad.json.zst", b"not zstd")
    for rel in ("r/bad.json", "r/bad.json.zst"):
        with pytest.raises(CorruptBlobError) as ei:
            store.read_json(rel)
        assert rel in str(ei.value) and "\n" not in str(ei.value)


def test_blob_stored_once_and_verified(store):
    data = os.urandom(5000)
    h1, n1 = store.put_blob("r", data)
    h2, n2 = store.put_blob("r", bytes(data))
    assert (h1, n1) == (h2, n2) == (blob_hash(data), 5000)
    assert rels(store, "r/blobs") == [f"r/blobs/{h1}.arrow"]
    store.put_blob("r", data + b"!")
    assert len(rels(store, "r/blobs")) == 2
    assert store.get_blob("r", h1, 5000) == data
    with pytest.raises(CorruptBlobError):
        store.get_blob("r", h1, 4999)  # wrong size
    with pytest.raises(NotFoundError) as ei:
        store.get_blob("r", "0" * 64)
    assert "'r'" in str(ei.value)


def test_flipped_byte_in_blob_is_caught(store):
    rows = [Row(3, "model", "lc", "float32", (100,), os.urandom(300), np.arange(8, dtype=np.float32))]
    data = write_blob(rows, {"run": "r"})
    h, n = store.put_blob("r", data)
    rng = np.random.default_rng(1)
    for pos in [0, len(data) // 2, len(data) - 1, *rng.integers(0, len(data), 5).tolist()]:
        bad = bytearray(data)
        bad[pos] ^= 0x01
        store.write_bytes(f"r/blobs/{h}.arrow", bytes(bad))
        with pytest.raises(CorruptBlobError) as ei:
            store.get_blob("r", h, n)
        msg = str(ei.value)
        assert h in msg and "\n" not in msg


def test_arrow_blob_round_trip():
    table = np.linspace(-1, 1, 16, dtype=np.float32)
    rows = [
        Row(7, "model", "lc", "float32", (1000,), b"\x00\x01payload", table),
        Row(7, "bn.num_batches_tracked", "exact", "int64", (), b"\x02"),
        Row(8, "fc.bias", "exact", "bfloat16", (3, 1), b""),
    ]
    back, header = read_blob(write_blob(rows, {"run": "r", "branch": "main"}))
    assert header["run"] == "r" and header["branch"] == "main" and header["format"] == "raybranch.blob/1"
    for a, b in zip(rows, back):
        assert (a.step, a.name, a.kind, a.dtype, a.shape, a.payload) == (b.step, b.name, b.kind, b.dtype, b.shape, b.payload)
        assert (a.table is None and b.table is None) or np.array_equal(a.table, b.table)
    assert write_blob(rows, {"run": "r"}) == write_blob(rows, {"run": "r"})  # deterministic → content address is stable


@pytest.mark.parametrize("data", [b"", b"garbage", b"ARROW1" + b"\x00" * 64])
def test_unreadable_blob(data):
    with pytest.raises(CorruptBlobError) as ei:
        read_blob(data, "blob xyz")
    assert "blob xyz" in str(ei.value) and "\n" not in str(ei.value)


def test_local_write_is_atomic_and_temporaries_are_not_listed(file_uri):
    store = open_store(file_uri)
    store.write_bytes("r/blobs/a.arrow", b"abc")
    on_disk = sorted(os.listdir(os.path.join(store.root, "r", "blobs")))
    assert on_disk == ["a.arrow"]  # no temporary left behind
    # a writer killed mid-write leaves <name>.tmp-<uuid>: never listed as a blob
    with open(os.path.join(store.root, "r", "blobs", f"b.arrow{TMP_MARK}0123"), "wb") as f:
        f.write(b"half")
    assert rels(store, "r/blobs") == ["r/blobs/a.arrow"]


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_endpoint_fails_fast(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    port = _closed_port()
    t0 = time.monotonic()
    with pytest.raises(StoreError) as ei:
        open_store(f"s3://bkt/p?endpoint_override=http://127.0.0.1:{port}&region=us-east-1")
    assert time.monotonic() - t0 < 10
    msg = str(ei.value)
    assert "\n" not in msg and f"127.0.0.1:{port}" in msg


def test_missing_bucket(s3_uri):
    parts = urlsplit(s3_uri)
    query = parse_qs(parts.query)
    assert "endpoint_override" in query  # conftest hands out an explicit endpoint
    missing = f"s3://no-such-bucket-{os.getpid()}/ckpts?{parts.query}"
    with pytest.raises(StoreError) as ei:
        open_store(missing)
    msg = str(ei.value)
    assert f"no-such-bucket-{os.getpid()}" in msg and "\n" not in msg


def test_s3_bucket_is_reachable_and_empty(s3_uri):
    store = open_store(s3_uri)
    assert store.list("", recursive=True) == []
    assert not store.loc.is_local
