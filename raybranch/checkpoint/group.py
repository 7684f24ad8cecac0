"""Group commit: the rows of many steps written as one blob and committed as one record.

A group is open from its first step until its window closes: ``flush_every`` steps,
``flush_seconds`` since its first step, :data:`MAX_GROUP_BYTES` of encoded rows, an exact
checkpoint (key frame, snapshot, tagged step), or ``flush()``/``close()``. What a crash can lose
is the open group and the captures queued behind it, and nothing committed: a group is written
once (blob, then the commit record, created only if absent) at the compression level its streams
were encoded with, and never rewritten on the training path.

Store errors during a commit are retried (:class:`RetryPolicy`): the blob is content-addressed
(writing it again is harmless) and a commit record that an earlier attempt created before its
reply was lost is recognised as this writer's own (:meth:`raybranch.ledger.branch.BranchWriter.commit`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..errors import RaybranchError, StoreError
from ..ledger.branch import BranchWriter
from ..ledger.records import layout_key
from ..store.blob import Row, write_blob
from ..store.store import Store

MAX_GROUP_BYTES = 64 << 20  # encoded rows per group: bounds the writer's memory and the blob's size


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all; after the k-th failure sleep min(cap_s, base_s · 2^(k−1)) s."""

    attempts: int = 8
    base_s: float = 0.2
    cap_s: float = 5.0

    def __post_init__(self):
        if self.attempts < 1 or self.base_s < 0 or self.cap_s < 0:
            raise RaybranchError(f"retry policy needs attempts >= 1 and delays >= 0, got {self}")

    def delay(self, failures: int) -> float:
        return min(self.cap_s, self.base_s * 2.0 ** (failures - 1))

    def run(self, fn, on_retry=lambda: None, what: str = "commit"):
        """``fn()``, again after each store error (``on_retry()``, then the delay); the last one
        is raised as a StoreError naming ``what``."""
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except (StoreError, OSError) as exc:
                if attempt == self.attempts:
                    raise StoreError(f"{what} failed after {attempt} attempts: {' '.join(str(exc).split())}") from None
                on_retry()
                time.sleep(self.delay(attempt))
        return None


@dataclass
class OpenGroup:
    """Steps encoded and not yet committed: their entries and rows, and the layouts first named."""

    entries: list[dict] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    layouts: dict[str, bytes] = field(default_factory=dict)
    nbytes: int = 0
    opened: float | None = None  # monotonic time of its first step

    def add(self, entry: dict, rows: list[Row]) -> None:
        if not self.entries:
            self.opened = time.monotonic()
        self.entries.append(entry)
        self.rows += rows
        self.nbytes += sum(len(r.payload) for r in rows)

    @property
    def steps(self) -> list[int]:
        return [e["step"] for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)


def commit_group(store: Store, run: str, writer: BranchWriter, group: OpenGroup, retry: RetryPolicy,
                 on_retry=lambda: None) -> None:
    """Write the group's layouts and blob and commit its steps; store errors retried
    (``writer.found_committed`` counts the records an attempt had created already)."""
    steps = group.steps
    blob = write_blob(group.rows, {"run": run, "branch_id": writer.bid, "steps": [steps[0], steps[-1]]})

    def attempt() -> None:
        write_layouts(store, run, group.layouts)  # right before the commit, like the blob: gc's grace covers both
        h, size = store.put_blob(run, blob)
        writer.commit(group.entries, [{"name": "0", "blob": [h, size]}], slices=sorted({k for e in group.entries for k in e["slices"]}))

    retry.run(attempt, on_retry)


def write_layouts(store: Store, run: str, layouts: dict[str, bytes]) -> None:
    """The layouts a group first names: created, or refreshed (gc's grace) when they exist."""
    for h, doc in layouts.items():
        if not store.create(layout_key(run, h), doc):
            store.touch(layout_key(run, h))


__all__ = ["MAX_GROUP_BYTES", "OpenGroup", "RetryPolicy", "commit_group", "write_layouts"]
