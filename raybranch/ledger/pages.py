"""Sealing: every ``page_size`` commits of a branch become one page, then their records go.

Order (each step is safe to crash after):

1. the optional *rewrite* (compaction) writes one new blob for the page's steps;
2. the page ``pages/<first>-<last>.g000.json.zst`` is created only if absent: from here on it is
   the record of those commits (their headers, checksums included, and their step entries);
3. ``top.json`` is rewritten with the page added (merged with what it holds: a newer page
   generation written by retention is never lost);
4. the page's commit records are deleted, except its last one (the head, when sealing runs right
   after the commit that completes the page) and any *takeover* (the first commit of a newer
   writer epoch, :func:`takeover`); the previous page's last record goes now;
5. the blobs the rewrite replaced are deleted.

A crash before 2 leaves an unreferenced blob (gc frees it); between 2 and 4, commit records that
a page also holds (readers take the page's, gc deletes them); after 4, blobs that nothing
references (gc).
"""
from __future__ import annotations

import time

from ..errors import NotFoundError
from ..store.store import Store, encode_json
from .branch import BranchLog, BranchWriter, page_info, resolved
from .records import PAGE_FORMAT, TOP_FORMAT, blob_key, commit_key, expand_steps, page_key, seal, stored, top_key, unseal


class Sealer:
    """Seals a writer's complete pages: call :meth:`seal_due` after a commit (the Checkpointer does).

    ``rewrite(store, run, bid, entries) -> parts | None`` may write the page's steps as one new
    blob (compaction) and return its parts; None keeps every commit's own blobs.
    """

    def __init__(self, rewrite=None):
        self.rewrite = rewrite
        self.seconds = 0.0

    def seal_due(self, writer: BranchWriter) -> int:
        t0 = time.perf_counter()
        log, n = writer.log, 0
        while log.sealed_through + log.page_size <= log.head_seq:
            a = log.sealed_through + 1
            seal_page(writer.store, log, a, a + log.page_size - 1, self.rewrite)
            n += 1
        self.seconds += time.perf_counter() - t0
        return n


def seal_page(store: Store, log: BranchLog, a: int, b: int, rewrite=None) -> dict:
    run, bid = log.run, log.bid
    commits = [log.commit(s) if s != log.head_seq else log.head for s in range(a, b + 1)]
    steps = [resolved(bid, c, e) for c in commits for e in c["steps"]]
    old_blobs = {p["blob"][0] for c in commits for p in c["parts"]}
    new_parts = rewrite(store, run, bid, steps) if (rewrite is not None and steps) else None
    if new_parts is not None:
        steps = [{**e, "parts": new_parts} for e in steps]
    # a header keeps what the chain needs (seq, parent, epochs, checksum, totals); not its step
    # ranges ("tail", which the page now holds) nor its parts (the steps name where their rows are)
    headers = [{k: v for k, v in c.items() if k not in ("steps", "common", "tail", "parts")} | {"n_steps": len(c["steps"])}
               for c in commits]
    blobs = {p["blob"][0]: p["blob"][1] for e in steps for p in e["parts"]}
    doc = stored({"format": PAGE_FORMAT, "run": run, "branch_id": bid, "first_seq": a, "last_seq": b, "gen": 0,
                  "commits": headers, "steps": steps, "bytes": sum(blobs.values()), "time": round(time.time(), 3)})
    rel = page_key(run, bid, a, b, 0)
    created = store.create(rel, encode_json(rel, doc))
    doc = expand_steps(doc)
    if not created:  # sealed by another writer first: theirs is the page; our rewrite is garbage
        doc = expand_steps(unseal(store.read_json(rel), rel, PAGE_FORMAT))
        if new_parts is not None:
            theirs = {p["blob"][0] for e in doc["steps"] for p in e["parts"]}  # a rewrite is deterministic: often the same blob
            for p in new_parts:
                if p["blob"][0] not in old_blobs | theirs:
                    store.delete(blob_key(run, p["blob"][0]))
    log._pages[(a, b)] = doc
    log.pages = [p for p in log.pages if p.first_seq != a] + [page_info(doc)]
    log.sealed_through = max(log.sealed_through, b)
    write_top(store, log)
    prev = [log.page(a - (b - a + 1), a - 1)["commits"][-1]] if a > 0 else []
    for c in prev + commits[:-1]:
        if not takeover(c):  # a takeover's record stays: the key a stale writer would create next
            store.delete(commit_key(run, bid, c["seq"]))
    log.tail_seqs = [s for s in log.tail_seqs if s > b]
    if created and new_parts is not None:
        keep = {p["blob"][0] for p in new_parts}
        for h in sorted(old_blobs - keep):
            store.delete(blob_key(run, h))
    return doc


def takeover(commit: dict) -> bool:
    """True for the first commit of a newer writer epoch (a fence): its record is never deleted.

    A stale writer always tries to create the commit right after its own last one, and that
    commit is the fence of the writer that took over; keeping it keeps the stale writer refused
    however long it slept, while the records in between go to their page."""
    return commit.get("parent_epoch") is not None and commit["epoch"] != commit["parent_epoch"]


def write_top(store: Store, log: BranchLog) -> None:
    """top.json = the pages the log knows, merged with those already listed (newest generation wins)."""
    rel = top_key(log.run, log.bid)
    rows = {p.first_seq: p.row() for p in log.pages}
    try:
        current = unseal(store.read_json(rel), rel, TOP_FORMAT)
        for row in current["pages"]:
            if row[0] not in rows or rows[row[0]][2] < row[2]:
                rows[row[0]] = row
    except NotFoundError:
        pass
    doc = seal({"format": TOP_FORMAT, "run": log.run, "branch_id": log.bid, "pages": [rows[k] for k in sorted(rows)],
                "time": round(time.time(), 3)})
    store.write_bytes(rel, encode_json(rel, doc))


def replace_page(store: Store, log: BranchLog, old: dict, steps: list[dict]) -> dict:
    """A new generation of a sealed page holding ``steps`` (resolved entries, their parts
    already written): created only if absent, listed in top.json, then the old generation goes.
    The commit headers (seqs, checksums, epochs) are kept, so the chain still verifies."""
    run, bid, a, b = log.run, log.bid, old["first_seq"], old["last_seq"]
    gen = old["gen"] + 1
    blobs = {p["blob"][0]: p["blob"][1] for e in steps for p in e["parts"]}
    doc = stored({"format": PAGE_FORMAT, "run": run, "branch_id": bid, "first_seq": a, "last_seq": b, "gen": gen,
                  "commits": old["commits"], "steps": steps, "bytes": sum(blobs.values()), "time": round(time.time(), 3)})
    rel = page_key(run, bid, a, b, gen)
    created = store.create(rel, encode_json(rel, doc))
    doc = expand_steps(doc)
    if not created:
        doc = expand_steps(unseal(store.read_json(rel), rel, PAGE_FORMAT))
    log._pages[(a, b)] = doc
    log.pages = sorted([p for p in log.pages if p.first_seq != a] + [page_info(doc)], key=lambda p: p.first_seq)
    write_top(store, log)
    store.delete(page_key(run, bid, a, b, old["gen"]))
    return doc
