"""What the store back ends share: object listings, request counters, one-line errors."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

TMP_MARK = ".tmp-"


@dataclass(frozen=True)
class ObjInfo:
    """One stored object: ``rel`` is its path under the store root, ``mtime`` seconds since the epoch."""

    rel: str
    size: int
    mtime: float
    root: str = ""

    @property
    def path(self) -> str:
        return f"{self.root}/{self.rel}" if self.root else self.rel

    @property
    def base_name(self) -> str:
        return self.rel.rsplit("/", 1)[-1]


@dataclass
class RequestStats:
    """Requests a store made: ``get`` and ``list`` are the *reads* (every LIST page counts)."""

    get: int = 0
    list: int = 0
    put: int = 0
    delete: int = 0
    head: int = 0
    retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, kind: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, kind, getattr(self, kind) + n)

    @property
    def reads(self) -> int:
        return self.get + self.list

    def snapshot(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("get", "list", "put", "delete", "head", "retries")} | {"reads": self.reads}

    def reset(self) -> None:
        with self._lock:
            self.get = self.list = self.put = self.delete = self.head = self.retries = 0


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
