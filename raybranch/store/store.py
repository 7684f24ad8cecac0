"""The one storage interface: bytes and JSON at paths under a root, on a local disk or S3.

Operations (each back end implements them with the guarantees its docstring gives):

    read_bytes / write_bytes    GET / atomic, durable overwrite
    create(rel, data) -> bool   exclusive create: False when ``rel`` exists (If-None-Match / link)
    cas(rel, data, expect)      compare-and-swap on the object's tag (If-Match / flock)
    list / list_after / list_dirs, delete, stat

``store.stats`` counts the requests made (reads = GET + LIST pages). The format of what is stored
above this layer is docs/FORMAT.md; nothing is pickled.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import zstandard

from ..codec.streams import zstd_compress
from ..errors import CorruptBlobError, NotFoundError, StoreError
from .local import LocalBackend
from .objects import TMP_MARK, ObjInfo, RequestStats
from .s3 import S3Backend
from .uri import Location, parse_uri


_hash_pool: ThreadPoolExecutor | None = None


def _hasher() -> ThreadPoolExecutor:
    global _hash_pool
    if _hash_pool is None:
        _hash_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raybranch-sha256")
    return _hash_pool


def blob_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Store:
    def __init__(self, location: Location):
        self.loc = location
        self.fs = location.fs
        self.uri = location.uri  # to show
        self.source = location.source  # to open again elsewhere (open_store(store.source))
        self.stats = RequestStats()
        if location.is_local:
            self.backend = LocalBackend(location.root, self.stats)
        else:
            self.backend = S3Backend(location.bucket, location.prefix, dict(location.s3_kwargs or {}), self.stats,
                                     location.retry_deadline)
        self.root = self.backend.root

    def __repr__(self) -> str:
        return f"Store({self.uri})"

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # -- raw bytes ----------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        self.backend.write(rel, bytes(data))

    def create(self, rel: str, data: bytes) -> bool:
        """Write ``rel`` only if it does not exist; True when this call created it."""
        return self.backend.create(rel, bytes(data))

    def cas(self, rel: str, data: bytes, expect: str | None) -> str:
        """Replace ``rel`` only if its tag is still ``expect`` (None: only if absent); returns the new
        tag, raises :class:`~raybranch.errors.ConflictError` when another writer got there first."""
        return self.backend.cas(rel, bytes(data), expect)

    def read_bytes(self, rel: str) -> bytes:
        try:
            return self.backend.read(rel)
        except NotFoundError:
            raise NotFoundError(f"{self._shown(rel)} does not exist") from None

    def read_tagged(self, rel: str) -> tuple[bytes, str]:
        try:
            return self.backend.read_tagged(rel)
        except NotFoundError:
            raise NotFoundError(f"{self._shown(rel)} does not exist") from None

    def touch(self, rel: str) -> None:
        """Refresh ``rel``'s modification time (what gc's grace period is measured from)."""
        self.backend.touch(rel)

    def stat(self, rel: str) -> ObjInfo | None:
        return self.backend.stat(rel)

    def exists(self, rel: str) -> bool:
        return self.backend.stat(rel) is not None

    def size(self, rel: str) -> int:
        info = self.backend.stat(rel)
        if info is None:
            raise NotFoundError(f"{self._shown(rel)} does not exist")
        return info.size

    def list(self, rel_dir: str, recursive: bool = False) -> list[ObjInfo]:
        """Objects (not temporaries) under a directory, sorted by path; [] when it does not exist."""
        return self.backend.list(rel_dir, recursive)

    def list_after(self, rel_dir: str, start_after: str) -> list[ObjInfo]:
        """Objects under ``rel_dir`` whose path sorts after ``start_after``, sorted; on S3 one
        LIST from that key (pages of 1000)."""
        return self.backend.list_after(rel_dir, start_after)

    def list_dirs(self, rel_dir: str) -> list[str]:
        return self.backend.list_dirs(rel_dir)

    def delete(self, rel: str) -> None:
        self.backend.delete(rel)

    def temporaries(self, rel_dir: str) -> list[ObjInfo]:
        return self.backend.temporaries(rel_dir)

    def prune(self, rel_dir: str) -> None:
        """Drop empty directories left under ``rel_dir`` by deletes (local disk only)."""
        self.backend.prune(rel_dir)

    def total_bytes(self, rel_dir: str = "") -> int:
        """Every byte under a directory."""
        return sum(i.size for i in self.list(rel_dir, recursive=True))

    # -- content-addressed blobs ---------------------------------------------------------------
    def put_blob(self, run: str, data: bytes) -> tuple[str, int]:
        """Store bytes under their sha256; returns (hash, size). An existing blob of the same
        content has its modification time refreshed, so that gc's grace period protects it until
        the commit that references it lands."""
        h = blob_hash(data)
        rel = f"{run}/blobs/{h}.arrow"
        if self.loc.is_local:
            if not self.create(rel, data):
                self.touch(rel)
        else:
            self.write_bytes(rel, data)  # one PUT: cheaper than HEAD + PUT, and it refreshes the time
        return h, len(data)

    def get_blob(self, run: str, h: str, size: int | None = None) -> bytes:
        data, check = self.get_blob_deferred(run, h, size, background=False)
        check()
        return data

    def get_blob_deferred(self, run: str, h: str, size: int | None = None, background: bool = True) -> tuple[bytes, Callable[[], None]]:
        """(the blob's bytes, ``check``): ``check()`` raises CorruptBlobError unless their sha256
        is the blob's name. With ``background`` the hash runs on another thread meanwhile, so a
        reader can decode while it runs; nothing decoded may be handed out before ``check()``."""
        rel = f"{run}/blobs/{h}.arrow"
        try:
            data = self.read_bytes(rel)
        except NotFoundError:
            raise NotFoundError(f"blob {h[:16]}… of run {run!r} is missing from {self.uri}") from None
        if size is not None and len(data) != size:
            raise CorruptBlobError(f"blob {rel} is corrupt: it holds {len(data)} bytes, its commit says {size}")
        if background:
            future = _hasher().submit(blob_hash, data)
            digest = future.result
        else:
            value = blob_hash(data)
            digest = lambda: value  # noqa: E731

        def check() -> None:
            if digest() != h:
                raise CorruptBlobError(f"blob {rel} is corrupt: its sha256 does not match its name")

        return data, check

    # -- JSON documents ----------------------------------------------------------------------
    def write_json(self, rel: str, doc: dict) -> None:
        """JSON at ``rel``; a name ending in ``.zst`` is stored zstd-compressed."""
        self.write_bytes(rel, encode_json(rel, doc))

    def read_json(self, rel: str) -> dict:
        return decode_json(self._shown(rel), self.read_bytes(rel), rel.endswith(".zst"))

    def check_reachable(self) -> None:
        """Fail fast with one line when the endpoint, bucket or directory is not usable."""
        try:
            self.backend.reachable()
        except StoreError as exc:
            raise StoreError(f"cannot use store {self.uri}: {exc}") from None

    def _shown(self, rel: str) -> str:
        return f"{self.uri.split(' ')[0]}/{rel}"


def json_bytes(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def encode_json(rel: str, doc: dict) -> bytes:
    data = json_bytes(doc)
    return zstd_compress(data, 9) if rel.endswith(".zst") else data


def decode_json(shown: str, data: bytes, compressed: bool) -> dict:
    try:
        if compressed:
            data = zstandard.ZstdDecompressor().decompress(data, max_output_size=1 << 30)
        doc = json.loads(data)
    except (ValueError, zstandard.ZstdError):
        raise CorruptBlobError(f"{shown} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise CorruptBlobError(f"{shown} is not a JSON object")
    return doc


def open_store(uri: str, check: bool = True) -> Store:
    """Open a store by URI (``file://``, a plain path, or ``s3://bucket/prefix?...``)."""
    store = Store(parse_uri(uri))
    if check:
        store.check_reachable()
    return store


__all__ = ["ObjInfo", "Store", "TMP_MARK", "blob_hash", "decode_json", "encode_json", "json_bytes", "open_store"]
