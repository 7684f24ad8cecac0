"""Branches by name: create and fork them, and resolve steps along a branch's lineage.

A fork shares its source's history up to the fork step without copying anything: the fork's
commit 0 names ``{branch_id, step, seq}`` of the source, and a step at or before the fork step
resolves in the source (recursively, for a fork of a fork).
"""
from __future__ import annotations

import time
import uuid

from ..errors import ConflictError, NotFoundError, RaybranchError
from ..store.store import Store, json_bytes
from .branch import BranchLog, BranchWriter, PageInfo, resolved
from .records import (
    BRANCH_FORMAT, COMMIT_FORMAT, PAGE_SIZE, branch_doc_key, check_name, commit_key, commits_dir, page_bounds, seal,
    seq_of_commit_key, stored,
)
from .refs import create_branch_ref, live_branch_id


def create_branch(store: Store, run: str, name: str, fork: dict | None = None, page_size: int = PAGE_SIZE,
                  retention: dict | None = None) -> BranchWriter:
    """A new branch ``name`` (optionally forked at ``fork`` = {branch_id, branch, step, seq}); returns
    its first writer (epoch 1). Objects: branch.json, commit 0, then the ref (the visible step)."""
    check_name("run", run)
    check_name("branch", name)
    if not 1 <= int(page_size) <= 100_000:
        raise RaybranchError(f"page_size must be 1..100000 commits, got {page_size}")
    bid = f"{name}.{uuid.uuid4().hex[:10]}"
    now = round(time.time(), 3)
    store.create(branch_doc_key(run, bid), json_bytes(seal(
        {"format": BRANCH_FORMAT, "run": run, "branch_id": bid, "name": name, "fork": fork, "page_size": int(page_size), "time": now})))
    writer_id = uuid.uuid4().hex[:16]
    root = stored({
        "format": COMMIT_FORMAT, "run": run, "branch_id": bid, "seq": 0, "parent": None, "epoch": 1, "writer": writer_id,
        "world_size": 1, "kind": "fork" if fork else "root", "fork": fork, "page_size": int(page_size), "parts": [],
        "steps": [], "tail": [], "slices": [], "tags": {}, "time": now,
        "totals": {"commits": 1, "steps": 0, "bytes": 0, "first_step": None, "own_last_step": None,
                   "last_step": None if fork is None else fork["step"]},
    })
    if not store.create(commit_key(run, bid, 0), json_bytes(root)):
        raise ConflictError(f"branch id {bid} already has commits")  # a 40-bit random id collided
    try:
        create_branch_ref(store, run, name, bid, retention)
    except ConflictError:
        raise ConflictError(f"branch {name!r} already exists in run {run!r}") from None
    log = BranchLog(store, run, bid, name)
    log.head, log.tail_seqs = root, [0]
    log._commits[0] = root
    return BranchWriter(log, 1, writer_id)


class Lineage:
    """A branch and, through its fork point, the branches it grew from."""

    def __init__(self, store: Store, run: str, name: str | None = None, bid: str | None = None, log: BranchLog | None = None):
        self.store, self.run = store, run
        if log is None:
            bid = bid or live_branch_id(store, run, name)
            log = BranchLog(store, run, bid, name).open()
        self.log = log
        self._parent: Lineage | None = None

    @property
    def name(self) -> str:
        return self.log.name

    @property
    def fork(self) -> dict | None:
        return self.log.fork

    def parent(self) -> "Lineage | None":
        f = self.fork
        if f is None:
            return None
        if self._parent is None:
            self._parent = Lineage(self.store, self.run, log=open_at(self.store, self.run, f["branch_id"], f["seq"], f.get("branch")))
        return self._parent

    @property
    def head_step(self) -> int | None:
        return self.log.totals["last_step"]

    def entry(self, step: int | None = None) -> dict:
        """The entry of ``step`` (the head step if None) along the lineage."""
        if step is None:
            step = self.head_step
            if step is None:
                raise NotFoundError(f"branch {self.name!r} of run {self.run!r} has no checkpoints yet")
        step = int(step)
        f = self.fork
        if f is not None and step <= f["step"]:
            return self.parent().entry(step)
        return self.log.entry(step)

    def entries_between(self, lo: int, hi: int) -> list[dict]:
        f = self.fork
        out = []
        if f is not None and lo <= f["step"]:
            out = self.parent().entries_between(lo, min(hi, f["step"]))
        if f is None or hi > f["step"]:
            out += self.log.entries_between(max(lo, f["step"] + 1) if f else lo, hi)
        return out

    def all_entries(self) -> list[dict]:
        """Every checkpoint of the lineage, oldest first (the parent's up to the fork point)."""
        f = self.fork
        out = [] if f is None else [e for e in self.parent().all_entries() if e["step"] <= f["step"]]
        return out + self.log.all_entries()

    def branch_name_of(self, bid: str) -> str:
        lin: Lineage | None = self
        while lin is not None:
            if lin.log.bid == bid:
                return lin.name
            lin = lin.parent()
        return bid


def open_at(store: Store, run: str, bid: str, seq: int, name: str | None = None) -> BranchLog:
    """A branch's log as far as commit ``seq`` (a fork source): its sealed pages up to the one that
    holds ``seq``, or that commit and the unsealed ones before it. Reads: top.json, then a page or
    the commit (retried once when the commit was sealed in between)."""
    for _ in range(3):
        log = BranchLog(store, run, bid, name or bid.rsplit(".", 1)[0])
        top = log._read_top()
        pages = [PageInfo(*row) for row in top["pages"]] if top else []
        holding = [p for p in pages if p.first_seq <= seq <= p.last_seq]
        if holding:
            p = holding[0]
            log.pages = [q for q in pages if q.last_seq <= p.last_seq]
            log.sealed_through = p.last_seq
            log.head = next(c for c in log.page(p.first_seq, p.last_seq)["commits"] if c["seq"] == seq) | {"steps": []}
            return log
        log.pages = pages
        log.sealed_through = pages[-1].last_seq if pages else -1
        try:
            log.head = log.commit(seq)
        except NotFoundError:
            continue  # sealed since top.json was read
        first = page_bounds(seq, log.head["page_size"])[0]
        log.tail_seqs = [r[0] for r in log.head.get("tail", [])] + [seq]
        if first > log.sealed_through + 1:  # older pages left unsealed by a crash: list their commits
            start = commit_key(run, bid, log.sealed_through) if log.sealed_through >= 0 else commits_dir(run, bid) + "/"
            older = [s for s in (seq_of_commit_key(i.rel) for i in store.list_after(commits_dir(run, bid), start)) if s is not None and s < first]
            log.tail_seqs = sorted(set(older) | set(log.tail_seqs))
        return log
    raise NotFoundError(f"commit {seq} of branch {bid} of run {run!r} is missing from {store.uri}")


__all__ = ["Lineage", "create_branch", "open_at", "resolved"]
