"""The local-disk back end: durable, atomic writes and exclusive creates on a POSIX file system.

* ``write``: a temporary file in the target's directory, ``fsync``, ``rename`` over the target,
  ``fsync`` of the directory. After a power cut the target holds the old or the new bytes.
* ``create``: the same temporary file, then ``link(tmp, target)``, which fails when the target
  exists (the exclusive create), then ``fsync`` of the directory: only then has it happened.
* ``cas``: an ``flock`` on a lock file beside the target serialises compare-and-swap writers;
  the tag of an object is the sha256 of its bytes.
* New directories are fsynced into their parents, up to the store root.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import uuid

from ..errors import ConflictError, NotFoundError, StoreError
from .objects import TMP_MARK, ObjInfo, RequestStats, one_line


def tag_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


class LocalBackend:
    is_local = True

    def __init__(self, root: str, stats: RequestStats):
        self.root = root
        self.stats = stats

    def _p(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    # -- durability ---------------------------------------------------------------------------
    def _ensure_dir(self, d: str) -> None:
        if os.path.isdir(d):
            return
        missing = []
        while not os.path.isdir(d):
            missing.append(d)
            d = os.path.dirname(d)
        for m in reversed(missing):
            try:
                os.mkdir(m)
            except FileExistsError:
                pass
            _fsync_dir(os.path.dirname(m))

    def _tmp(self, path: str, data: bytes) -> str:
        self._ensure_dir(os.path.dirname(path))
        tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            _unlink(tmp)
            raise
        return tmp

    # -- operations ---------------------------------------------------------------------------
    def read(self, rel: str) -> bytes:
        self.stats.add("get")
        try:
            with open(self._p(rel), "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFoundError(f"{rel} does not exist") from None

    def read_tagged(self, rel: str) -> tuple[bytes, str]:
        data = self.read(rel)
        return data, tag_of(data)

    def write(self, rel: str, data: bytes) -> None:
        path = self._p(rel)
        self.stats.add("put")
        try:
            tmp = self._tmp(path, data)
            os.replace(tmp, path)
            _fsync_dir(os.path.dirname(path))
        except OSError as exc:
            raise _write_error(rel, exc) from None

    def create(self, rel: str, data: bytes) -> bool:
        path = self._p(rel)
        self.stats.add("put")
        try:
            tmp = self._tmp(path, data)
            try:
                os.link(tmp, path)
                created = True
            except FileExistsError:
                created = False
            finally:
                _unlink(tmp)
            _fsync_dir(os.path.dirname(path))
            return created
        except OSError as exc:
            raise _write_error(rel, exc) from None

    def touch(self, rel: str) -> None:
        try:
            os.utime(self._p(rel))
        except FileNotFoundError:
            raise NotFoundError(f"{rel} does not exist") from None

    def cas(self, rel: str, data: bytes, expect: str | None) -> str:
        path = self._p(rel)
        self._ensure_dir(os.path.dirname(path))
        lock = os.path.join(os.path.dirname(path), f".lock-{os.path.basename(path)}")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = tag_of(self.read(rel))
            except NotFoundError:
                current = None
            if current != expect:
                raise ConflictError(f"{rel} changed under us (expected {expect or 'absent'}, found {current or 'absent'})")
            self.write(rel, data)
            return tag_of(data)
        finally:
            os.close(fd)

    def delete(self, rel: str) -> None:
        self.stats.add("delete")
        try:
            os.unlink(self._p(rel))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StoreError(f"cannot delete {rel}: {one_line(exc)}") from None

    def temporaries(self, rel_dir: str) -> list[ObjInfo]:
        """Temporary files a killed writer left under ``rel_dir`` (gc deletes the old ones)."""
        out = []
        for d, _, files in os.walk(self._p(rel_dir)):
            for f in files:
                if TMP_MARK in f:
                    path = os.path.join(d, f)
                    try:
                        st = os.stat(path)
                    except FileNotFoundError:
                        continue
                    out.append(ObjInfo(os.path.relpath(path, self.root), st.st_size, st.st_mtime, self.root))
        return out

    def prune(self, rel_dir: str) -> None:
        """Remove empty directories under and including ``rel_dir`` (never the root)."""
        top = self._p(rel_dir)
        for d, _, _ in sorted(os.walk(top), key=lambda x: -len(x[0])):
            if d != self.root:
                try:
                    os.rmdir(d)
                except OSError:
                    pass

    def stat(self, rel: str) -> ObjInfo | None:
        self.stats.add("head")
        try:
            st = os.stat(self._p(rel))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return ObjInfo(rel, st.st_size, st.st_mtime, self.root)

    def list(self, rel_dir: str, recursive: bool) -> list[ObjInfo]:
        out: list[ObjInfo] = []
        self._walk(rel_dir, recursive, None, out)
        return sorted(out, key=lambda i: i.rel)

    def list_after(self, rel_dir: str, start_after: str) -> list[ObjInfo]:
        """Objects under ``rel_dir`` (recursively) whose path sorts after ``start_after``;
        subtrees that sort wholly before it are not read."""
        out: list[ObjInfo] = []
        self._walk(rel_dir, True, start_after, out)
        return sorted((i for i in out if i.rel > start_after), key=lambda i: i.rel)

    def list_dirs(self, rel_dir: str) -> list[str]:
        self.stats.add("list")
        try:
            with os.scandir(self._p(rel_dir)) as it:
                return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _walk(self, rel_dir: str, recursive: bool, start_after: str | None, out: list[ObjInfo]) -> None:
        self.stats.add("list")
        try:
            with os.scandir(self._p(rel_dir)) as it:
                entries = sorted(it, key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            return
        for e in entries:
            if e.name.startswith(".") or TMP_MARK in e.name:
                continue
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            if e.is_dir(follow_symlinks=False):
                if recursive and (start_after is None or not _before(rel, start_after)):
                    self._walk(rel, recursive, start_after, out)
            elif e.is_file(follow_symlinks=False):
                try:
                    st = e.stat()
                except FileNotFoundError:
                    continue
                out.append(ObjInfo(rel, st.st_size, st.st_mtime, self.root))

    def reachable(self) -> None:
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise StoreError(f"store path {self.root} is not a directory")


def _before(rel_dir: str, start_after: str) -> bool:
    """True when every path under directory ``rel_dir`` sorts at or before ``start_after``."""
    prefix = rel_dir + "/"
    return not start_after.startswith(prefix) and prefix < start_after


def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _write_error(rel: str, exc: OSError) -> StoreError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return StoreError(f"cannot write {rel}: no space left (file size limit or disk full: {one_line(exc)})")
    return StoreError(f"cannot write {rel}: {one_line(exc)}")
