"""The one storage interface: bytes and JSON at paths under a root, on any ``pyarrow.fs``.

Layout under the root (DESIGN.md "Store")::

    <run>/run.json                          what the run is (model, codec, data, seeds)
    <run>/blobs/<sha256>.arrow              immutable, content-addressed Arrow IPC files
    <run>/manifests/<branch>/<step>.json    one per checkpoint; written last = the commit
    <run>/segments/<branch>/<a>-<b>.json    compacted runs of checkpoints (see checkpoint.compact)

Writes are atomic: on a local disk through a temporary name and a rename, on S3 by the single
PUT (or completed multipart upload) that makes an object visible. A reader never sees half a file.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid

import pyarrow.fs as pafs
import zstandard

from ..codec.streams import zstd_compress
from ..errors import CorruptBlobError, NotFoundError, StoreError
from .uri import Location, parse_uri

TMP_MARK = ".tmp-"


def blob_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Store:
    def __init__(self, location: Location):
        self.loc = location
        self.fs = location.fs
        self.root = location.root
        self.uri = location.uri

    def __repr__(self) -> str:
        return f"Store({self.uri})"

    # -- paths --------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # -- raw bytes ----------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self.path(rel)
        try:
            if self.loc.is_local:
                self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
                tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex}"
                with self.fs.open_output_stream(tmp, compression=None) as f:
                    f.write(data)
                os.replace(tmp, path)
            else:
                with self.fs.open_output_stream(path, compression=None) as f:
                    f.write(data)
        except OSError as exc:
            raise StoreError(f"cannot write {self._shown(rel)}: {_one_line(exc)}") from None

    def read_bytes(self, rel: str) -> bytes:
        path = self.path(rel)
        try:
            with self.fs.open_input_file(path) as f:
                return f.read()
        except FileNotFoundError:
            raise NotFoundError(f"{self._shown(rel)} does not exist") from None
        except OSError as exc:
            if _is_not_found(exc):
                raise NotFoundError(f"{self._shown(rel)} does not exist") from None
            raise StoreError(f"cannot read {self._shown(rel)}: {_one_line(exc)}") from None

    def exists(self, rel: str) -> bool:
        try:
            return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound
        except OSError as exc:
            raise StoreError(f"cannot reach {self.uri}: {_one_line(exc)}") from None

    def size(self, rel: str) -> int:
        info = self.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.NotFound:
            raise NotFoundError(f"{self._shown(rel)} does not exist")
        return int(info.size)

    def list(self, rel_dir: str, recursive: bool = False) -> list[pafs.FileInfo]:
        """Files (not temporaries) under a directory; [] when it does not exist."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel_dir), allow_not_found=True, recursive=recursive))
        except OSError as exc:
            raise StoreError(f"cannot list {self._shown(rel_dir)}: {_one_line(exc)}") from None
        return [i for i in infos if i.type == pafs.FileType.File and TMP_MARK not in i.base_name]

    def list_dirs(self, rel_dir: str) -> list[str]:
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel_dir), allow_not_found=True))
        except OSError as exc:
            raise StoreError(f"cannot list {self._shown(rel_dir)}: {_one_line(exc)}") from None
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self.path(rel))
        except FileNotFoundError:
            pass
        except OSError as exc:
            if not _is_not_found(exc):
                raise StoreError(f"cannot delete {self._shown(rel)}: {_one_line(exc)}") from None

    def total_bytes(self, rel_dir: str = "") -> int:
        """Every byte under a directory: blobs, manifests, segments, run records."""
        return sum(int(i.size) for i in self.list(rel_dir, recursive=True))

    # -- content-addressed blobs ---------------------------------------------------------------
    def put_blob(self, run: str, data: bytes) -> tuple[str, int]:
        """Store bytes once under their sha256; returns (hash, size)."""
        h = blob_hash(data)
        rel = f"{run}/blobs/{h}.arrow"
        if not self.exists(rel):
            self.write_bytes(rel, data)
        return h, len(data)

    def get_blob(self, run: str, h: str, size: int | None = None) -> bytes:
        rel = f"{run}/blobs/{h}.arrow"
        try:
            data = self.read_bytes(rel)
        except NotFoundError:
            raise NotFoundError(f"blob {h[:16]}… of run {run!r} is missing from {self.uri}") from None
        if (size is not None and len(data) != size) or blob_hash(data) != h:
            raise CorruptBlobError(f"blob {rel} is corrupt: its sha256 does not match its name")
        return data

    # -- JSON documents ----------------------------------------------------------------------
    def write_json(self, rel: str, doc: dict) -> None:
        """JSON at ``rel``; a name ending in ``.zst`` is stored zstd-compressed."""
        data = json_bytes(doc)
        self.write_bytes(rel, zstd_compress(data, 9) if rel.endswith(".zst") else data)

    def read_json(self, rel: str) -> dict:
        data = self.read_bytes(rel)
        try:
            if rel.endswith(".zst"):
                data = zstandard.ZstdDecompressor().decompress(data, max_output_size=1 << 28)
            return json.loads(data)
        except (ValueError, zstandard.ZstdError):
            raise CorruptBlobError(f"{self._shown(rel)} is not valid JSON") from None

    def check_reachable(self) -> None:
        """Fail fast with one line when the endpoint, bucket or directory is not usable."""
        try:
            info = self.fs.get_file_info(self.root.split("/")[0] if not self.loc.is_local else self.root)
        except OSError as exc:
            raise StoreError(f"cannot reach store {self.uri}: {_one_line(exc)}") from None
        if not self.loc.is_local and info.type == pafs.FileType.NotFound:
            raise StoreError(f"bucket {self.root.split('/')[0]!r} does not exist at {self.uri}")

    def _shown(self, rel: str) -> str:
        return f"{self.uri.split(' ')[0]}/{rel}"


def json_bytes(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _is_not_found(exc: OSError) -> bool:
    s = str(exc)
    return "NoSuchKey" in s or "Path does not exist" in s or "not found" in s.lower()


def open_store(uri: str, check: bool = True) -> Store:
    """Open a store by URI (``file://``, a plain path, or ``s3://bucket/prefix?...``)."""
    store = Store(parse_uri(uri))
    if check:
        store.check_reachable()
    return store


__all__ = ["Store", "open_store", "blob_hash", "json_bytes"]
