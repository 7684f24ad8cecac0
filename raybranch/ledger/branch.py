"""One branch's commit log: open it in a bounded number of reads, resolve any step, commit.

A branch is a sequence of commits ``0, 1, 2, …`` (docs/FORMAT.md). Commit ``n`` is created only if
absent and names commit ``n − 1``'s checksum as its parent, so two writers extending the same
head race for the same key and exactly one wins. Every ``page_size`` commits are *sealed* into a
page (:mod:`raybranch.ledger.pages`), after which their commit records are deleted; the branch's
``top.json`` lists the pages with their step ranges.

Opening a branch reads: its ``top.json`` (1 GET), the commit keys after the last sealed commit
(1 LIST on S3; one directory read per 1000-commit shard locally), and the head commit (1 GET).
The head commit carries the step ranges of the unsealed commits of its page (``tail``), the
branch's running totals and its fork point, so any step then resolves with one more GET (its
page, or its commit). A stale ``top.json`` (a crash between sealing and rewriting it) shows as a
gap in the commit keys and costs one LIST of the pages.
"""
from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from ..errors import ConflictError, FencedError, NotFoundError
from ..store.store import Store, decode_json, json_bytes
from .records import (
    COMMIT_FORMAT, PAGE_FORMAT, TOP_FORMAT, commit_key, commits_dir, expand_steps, page_bounds, page_key, pages_dir,
    parse_page_key, seq_of_commit_key, stored, top_key, unseal,
)



@dataclass(frozen=True)
class PageInfo:
    first_seq: int
    last_seq: int
    gen: int
    first_step: int | None
    last_step: int | None
    n_steps: int
    bytes: int

    def row(self) -> list:
        return [self.first_seq, self.last_seq, self.gen, self.first_step, self.last_step, self.n_steps, self.bytes]


class BranchLog:
    """The read side of one branch id. :meth:`open` loads the head; entries are fetched on demand."""

    def __init__(self, store: Store, run: str, bid: str, name: str | None = None):
        self.store, self.run, self.bid = store, run, bid
        self.name = name or bid
        self.head: dict | None = None
        self.pages: list[PageInfo] = []
        self.sealed_through = -1
        self.tail_seqs: list[int] = []  # commit records present after the sealed pages
        self._commits: OrderedDict[int, dict] = OrderedDict()
        self._pages: OrderedDict[tuple[int, int], dict] = OrderedDict()

    # -- opening ------------------------------------------------------------------------------
    def open(self, attempts: int = 8) -> "BranchLog":
        """Load the head (see the module docstring). A commit record that vanishes between the
        LIST and its GET was sealed into a page meanwhile: read again."""
        for i in range(attempts):
            try:
                return self._open()
            except NotFoundError:
                if i == attempts - 1:
                    raise
        return self

    def _open(self) -> "BranchLog":
        self._commits.clear()
        self._pages.clear()
        top = self._read_top()
        self.pages = [PageInfo(*row) for row in top["pages"]] if top else []
        self.sealed_through = self.pages[-1].last_seq if self.pages else -1
        start = commit_key(self.run, self.bid, self.sealed_through - 1) if self.sealed_through >= 1 else commits_dir(self.run, self.bid) + "/"
        seqs = sorted(s for s in (seq_of_commit_key(i.rel) for i in self.store.list_after(commits_dir(self.run, self.bid), start)) if s is not None)
        gap = seqs and (seqs[0] > self.sealed_through + 1 or any(b - a > 1 for a, b in zip(seqs, seqs[1:])))
        if gap or (not seqs and self.sealed_through < 0):  # top.json lags the pages
            self._find_pages_after_top()
        self.tail_seqs = [s for s in seqs if s > self.sealed_through]
        if seqs and seqs[-1] >= self.sealed_through:
            self.head = self.commit(seqs[-1])
        elif self.sealed_through >= 0:
            last = self.pages[-1]
            self.head = self.page(last.first_seq, last.last_seq)["commits"][-1] | {"steps": []}
        else:
            raise NotFoundError(f"branch {self.name!r} of run {self.run!r} has no commits in {self.store.uri}")
        return self

    def _read_top(self) -> dict | None:
        try:
            doc = self.store.read_json(top_key(self.run, self.bid))
        except NotFoundError:
            return None
        return unseal(doc, top_key(self.run, self.bid), TOP_FORMAT)

    def _find_pages_after_top(self) -> None:
        start = page_key(self.run, self.bid, self.pages[-1].first_seq, self.pages[-1].last_seq, 999) if self.pages else pages_dir(self.run, self.bid) + "/"
        newest: dict[tuple[int, int], int] = {}
        for info in self.store.list_after(pages_dir(self.run, self.bid), start):
            parsed = parse_page_key(info.rel)
            if parsed:
                a, b, g = parsed
                newest[(a, b)] = max(g, newest.get((a, b), -1))
        for (a, b), g in sorted(newest.items()):
            doc = self.page(a, b, g)
            self.pages.append(page_info(doc))
        if self.pages:
            self.sealed_through = self.pages[-1].last_seq

    # -- documents ----------------------------------------------------------------------------
    def commit(self, seq: int) -> dict:
        if seq not in self._commits:
            rel = commit_key(self.run, self.bid, seq)
            self._commits[seq] = expand_steps(unseal(self.store.read_json(rel), rel, COMMIT_FORMAT))
            while len(self._commits) > 256:
                self._commits.popitem(last=False)
        return self._commits[seq]

    def page(self, first: int, last: int, gen: int | None = None) -> dict:
        if (first, last) not in self._pages:
            gen = self._gen_of(first, last) if gen is None else gen
            rel = page_key(self.run, self.bid, first, last, gen)
            try:
                doc = self.store.read_json(rel)
            except NotFoundError:  # superseded by a newer generation since the top was read
                gen = self._newest_gen(first, last)
                rel = page_key(self.run, self.bid, first, last, gen)
                doc = self.store.read_json(rel)
            self._pages[(first, last)] = expand_steps(unseal(doc, rel, PAGE_FORMAT))
            while len(self._pages) > 64:
                self._pages.popitem(last=False)
        return self._pages[(first, last)]

    def _gen_of(self, first: int, last: int) -> int:
        for p in self.pages:
            if p.first_seq == first:
                return p.gen
        return self._newest_gen(first, last)

    def _newest_gen(self, first: int, last: int) -> int:
        prefix = page_key(self.run, self.bid, first, last, 0)[: -len("000.json.zst")]  # …/<first>-<last>.g
        after = prefix[: -len(".g")]  # sorts just before every generation of this page
        gens = [parse_page_key(i.rel)[2] for i in self.store.list_after(pages_dir(self.run, self.bid), after) if i.rel.startswith(prefix)]
        if not gens:
            raise NotFoundError(f"page {first}-{last} of branch {self.name!r} of run {self.run!r} is missing")
        return max(gens)

    # -- what the head tells ------------------------------------------------------------------
    @property
    def head_seq(self) -> int:
        return self.head["seq"]

    @property
    def fork(self) -> dict | None:
        return self.head.get("fork")

    @property
    def totals(self) -> dict:
        return self.head["totals"]

    @property
    def page_size(self) -> int:
        return self.head["page_size"]

    # -- resolving steps ----------------------------------------------------------------------
    def _tail_ranges(self) -> list[tuple[int, int, int]]:
        """(seq, first step, last step) of every unsealed commit with steps, oldest first."""
        known = {s: (a, b) for s, a, b in self.head.get("tail", [])}
        steps = self.head.get("steps", [])
        if steps:
            known[self.head["seq"]] = (steps[0]["step"], steps[-1]["step"])
        out = []
        for s in self.tail_seqs:
            if s in known:
                out.append((s, *known[s]))
            elif s < page_bounds(self.head["seq"], self.page_size)[0]:  # an older page not sealed (after a crash)
                c = self.commit(s)
                if c["steps"]:
                    out.append((s, c["steps"][0]["step"], c["steps"][-1]["step"]))
        return out

    def own_range(self) -> tuple[int, int] | None:
        t = self.totals
        return None if t["first_step"] is None else (t["first_step"], t["own_last_step"])

    def entries_between(self, lo: int, hi: int) -> list[dict]:
        """This branch's own entries with lo ≤ step ≤ hi, in step order (resolved: seq, parts)."""
        out: list[dict] = []
        for p in self.pages:
            if p.first_step is not None and p.first_step <= hi and p.last_step >= lo:
                out += [e for e in self.page(p.first_seq, p.last_seq)["steps"] if lo <= e["step"] <= hi]
        for seq, a, b in self._tail_ranges():
            if a <= hi and b >= lo:
                c = self.commit(seq) if seq != self.head["seq"] else self.head
                out += [resolved(self.bid, c, e) for e in c["steps"] if lo <= e["step"] <= hi]
        return out

    def entry(self, step: int) -> dict:
        found = self.entries_between(step, step)
        if not found:
            rng = self.own_range()
            have = "none" if rng is None else f"{rng[0]}..{rng[1]}"
            raise NotFoundError(f"branch {self.name!r} of run {self.run!r} has no checkpoint at step {step} (its own steps: {have})")
        return found[0]

    def last_entries(self, n: int) -> list[dict]:
        """The newest ``n`` own entries, oldest first (reads only the pages and commits needed)."""
        out: list[dict] = []
        for seq, _, _ in reversed(self._tail_ranges()):
            c = self.commit(seq) if seq != self.head["seq"] else self.head
            out = [resolved(self.bid, c, e) for e in c["steps"]] + out
            if len(out) >= n:
                return out[-n:]
        for p in reversed(self.pages):
            if p.n_steps:
                out = list(self.page(p.first_seq, p.last_seq)["steps"]) + out
                if len(out) >= n:
                    break
        return out[-n:] if n else []

    def all_entries(self) -> list[dict]:
        rng = self.own_range()
        return [] if rng is None else self.entries_between(*rng)


def resolved(bid: str, commit: dict, entry: dict) -> dict:
    return {**entry, "seq": commit["seq"], "parts": commit["parts"], "branch_id": bid}


def page_info(doc: dict) -> PageInfo:
    steps = doc["steps"]
    return PageInfo(doc["first_seq"], doc["last_seq"], doc["gen"], steps[0]["step"] if steps else None,
                    steps[-1]["step"] if steps else None, len(steps), doc["bytes"])


class BranchWriter:
    """Commits to one branch under a writer epoch. Build with :meth:`register` (takes over the
    branch: fences every older writer) or :func:`raybranch.ledger.lineage.create_branch`."""

    def __init__(self, log: BranchLog, epoch: int, writer_id: str):
        self.log, self.epoch, self.writer_id = log, epoch, writer_id
        self.store, self.run, self.bid = log.store, log.run, log.bid
        self.commit_bytes = 0  # bytes of commit records written (metadata cost)
        self.found_committed = 0  # commits an earlier attempt had created (its reply lost)

    @classmethod
    def register(cls, log: BranchLog, attempts: int = 20) -> "BranchWriter":
        """Take over the branch: a *fence* commit with epoch = head's + 1. From then on every
        commit of an older writer is refused."""
        writer_id = uuid.uuid4().hex[:16]
        for _ in range(attempts):
            head = log.open().head
            w = cls(log, head["epoch"] + 1, writer_id)
            try:
                w.commit([], [], kind="fence")
                return w
            except ConflictError:
                continue  # another writer moved the head or registered: read it again
        raise ConflictError(f"could not register a writer for branch {log.name!r} of run {log.run!r}: "
                            f"{attempts} attempts lost to other writers")

    def commit(self, steps: list[dict], parts: list[dict], *, kind: str = "steps", world_size: int = 1,
               slices: list | None = None) -> dict:
        """Commit ``steps`` (entries whose rows are in the blobs ``parts``) as commit head + 1."""
        log = self.log
        head = log.head
        seq = head["seq"] + 1
        t = head["totals"]
        nbytes = sum(p["blob"][1] for p in parts)
        if steps and t["last_step"] is not None and steps[0]["step"] <= t["last_step"]:
            raise ConflictError(f"step {steps[0]['step']} is not after the head of branch {log.name!r} (step {t['last_step']})")
        first_of_page = page_bounds(seq, head["page_size"])[0]
        tail = [] if head["seq"] < first_of_page else [r for r in head.get("tail", []) if r[0] >= first_of_page]
        if head["seq"] >= first_of_page and head.get("steps"):
            tail.append([head["seq"], head["steps"][0]["step"], head["steps"][-1]["step"]])
        totals = {
            "commits": t["commits"] + 1, "steps": t["steps"] + len(steps), "bytes": t["bytes"] + nbytes,
            "first_step": t["first_step"] if t["first_step"] is not None else (steps[0]["step"] if steps else None),
            "own_last_step": steps[-1]["step"] if steps else t["own_last_step"],
            "last_step": steps[-1]["step"] if steps else t["last_step"],
        }
        doc = stored({
            "format": COMMIT_FORMAT, "run": self.run, "branch_id": self.bid, "seq": seq, "parent": head["checksum"],
            "epoch": self.epoch, "parent_epoch": head["epoch"], "writer": self.writer_id, "world_size": world_size, "kind": kind,
            "fork": head.get("fork"), "page_size": head["page_size"], "parts": parts, "steps": steps,
            "tail": tail, "totals": totals, "slices": sorted(set(head.get("slices", [])) | set(slices or [])),
            "tags": {**head.get("tags", {}), **{t: e["step"] for e in steps for t in e.get("tags", [])}},
            "time": round(time.time(), 3),
        })
        data = json_bytes(doc)
        doc = expand_steps(doc)
        rel = commit_key(self.run, self.bid, seq)
        if not self.store.create(rel, data):
            raw = self.store.read_bytes(rel)
            other = unseal(decode_json(rel, raw, False), rel, COMMIT_FORMAT)
            if not self._own_earlier_attempt(other, head, steps):
                self._refuse(other, seq, steps)
            data, doc = raw, expand_steps(other)  # an attempt whose reply was lost created it
            self.found_committed += 1
        self.commit_bytes += len(data)
        log.head = doc
        log._commits[seq] = doc
        log.tail_seqs.append(seq)
        return doc

    def _own_earlier_attempt(self, other: dict, head: dict, steps: list[dict]) -> bool:
        """The record at our next seq is this writer's: same writer and epoch, on our head, the same steps."""
        return (other.get("writer") == self.writer_id and other["epoch"] == self.epoch and other.get("parent") == head["checksum"]
                and [e["step"] for e in expand_steps(other)["steps"]] == [e["step"] for e in steps])

    def _refuse(self, other: dict, seq: int, steps: list[dict]) -> None:
        log = self.log
        what = f"steps {steps[0]['step']}..{steps[-1]['step']}" if steps else "a fence"
        if other["epoch"] > self.epoch:
            raise FencedError(f"branch {log.name!r} of run {self.run!r}: writer epoch {self.epoch} was fenced by "
                              f"epoch {other['epoch']} at commit {seq}; its commit of {what} was refused, nothing was overwritten")
        raise ConflictError(f"branch {log.name!r} of run {self.run!r}: commit {seq} ({what}) lost to another writer "
                            f"of epoch {other['epoch']}; nothing was overwritten")
