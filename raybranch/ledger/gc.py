"""Garbage collection: delete what no branch, kept checkpoint or young object needs.

One pass over a run (``raybranch gc``):

1. retention (:mod:`raybranch.checkpoint.retention`) thins the sealed pages of branches that have
   a policy;
2. *kept branches* are the live ones, the ones they were forked from (transitively), and
   deleted or renamed ones whose tombstone is younger than the grace period;
3. everything a kept branch's newest page generations and commit records name (blobs,
   layouts) is *referenced*;
4. deleted: the directories of branches that are not kept, superseded page generations, commit
   records a page already holds (never a branch's newest, never a takeover's), and blobs and layouts nothing
   references — each only when its modification time is older than the grace period.

Safe against a concurrent writer: a writer writes its blobs and new layouts (or refreshes an
existing one's time, :meth:`raybranch.store.store.Store.put_blob`) right before the commit that
names them, and commits within seconds, so an object that an in-flight commit will reference is younger than the grace
period (default one hour) and stays. Use a grace period longer than any commit can take.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..errors import NotFoundError
from ..store.store import Store, decode_json
from .records import (
    PAGE_FORMAT, branch_dir, commits_dir, expand_steps, pages_dir, parse_page_key, seq_of_commit_key, unseal,
)
from .pages import takeover
from .refs import read_branch_ref

GRACE_S = 3600.0


@dataclass
class GcReport:
    freed_bytes: int = 0
    deleted: dict[str, int] = field(default_factory=lambda: dict(blobs=0, layouts=0, pages=0, commits=0, branches=0, temporaries=0))
    kept_young: int = 0
    thinned_steps: int = 0


def collect(store: Store, run: str, grace_s: float = GRACE_S, dry_run: bool = False, now: float | None = None,
            thin=None) -> GcReport:
    """One gc pass over ``run``; ``thin(store, run, now) -> steps dropped`` applies retention
    first (:func:`raybranch.checkpoint.retention.apply_retention`)."""
    now = time.time() if now is None else now
    old = now - grace_s
    rep = GcReport()
    if thin is not None and not dry_run:
        rep.thinned_steps = thin(store, run, now)
    refs = {}
    for info in store.list(f"{run}/refs/branches"):
        ref = read_branch_ref(store, run, info.base_name.removesuffix(".json"))
        if ref is not None:
            refs[ref.doc["name"]] = ref.doc
    bids = set(store.list_dirs(f"{run}/branches"))
    kept = {d["branch_id"] for d in refs.values() if d["state"] == "live" or d["time"] > old}
    fork_of = {bid: _fork_source(store, run, bid) for bid in bids}
    todo = list(kept)
    while todo:
        src = fork_of.get(todo.pop())
        if src and src not in kept:
            kept.add(src)
            todo.append(src)
    referenced: set[str] = set()
    layouts: set[str] = set()

    def drop(info, kind):
        if info.mtime >= old:
            rep.kept_young += 1
            return
        rep.deleted[kind] += 1
        rep.freed_bytes += info.size
        if not dry_run:
            store.delete(info.rel)

    for bid in sorted(bids):
        infos = store.list(branch_dir(run, bid), recursive=True)
        if bid not in kept and all(i.mtime < old for i in infos):  # dead, or a creation that never got its ref
            rep.deleted["branches"] += 1
            for i in sorted(infos, key=lambda i: i.rel.endswith("branch.json")):  # branch.json last
                drop(i, "pages" if parse_page_key(i.rel) else "commits")
            if not dry_run:
                store.prune(branch_dir(run, bid))
            continue
        for attempt in range(10):  # a writer sealing a page deletes records under our feet: list again
            try:
                _scan_branch(store, run, bid, infos, referenced, layouts, drop)
                break
            except NotFoundError:
                if attempt == 9:
                    raise
                infos = store.list(branch_dir(run, bid), recursive=True)
    for info in store.list(f"{run}/blobs"):
        if info.base_name.removesuffix(".arrow") not in referenced:
            drop(info, "blobs")
    for info in store.list(f"{run}/layouts"):
        if info.base_name.removesuffix(".json") not in layouts:
            drop(info, "layouts")
    for info in store.temporaries(run):  # left by a writer killed mid-write (local disk only)
        drop(info, "temporaries")
    return rep


def _fork_source(store: Store, run: str, bid: str) -> str | None:
    from .records import commit_key

    rel = commit_key(run, bid, 0)
    try:
        doc = decode_json(rel, store.read_bytes(rel), False)
        return (doc.get("fork") or {}).get("branch_id")
    except NotFoundError:  # sealed: commit 0 is in the first page
        pass
    for info in store.list(pages_dir(run, bid)):
        if info.base_name.startswith("000000000000-"):
            doc = expand_steps(decode_json(info.rel, store.read_bytes(info.rel), True))
            return (doc["commits"][0].get("fork") or {}).get("branch_id")
    return None


def _scan_branch(store, run, bid, infos, referenced: set, layouts: set, drop) -> None:
    pages: dict[tuple[int, int], list] = {}
    for i in infos:
        parsed = parse_page_key(i.rel)
        if parsed:
            pages.setdefault(parsed[:2], []).append((parsed[2], i))
    sealed: dict[int, dict] = {}  # seq → the commit header its page holds
    for (a, b), gens in pages.items():
        gens.sort(key=lambda g: g[0])
        for _, i in gens[:-1]:
            drop(i, "pages")
        doc = expand_steps(unseal(decode_json(gens[-1][1].rel, store.read_bytes(gens[-1][1].rel), True), gens[-1][1].rel, PAGE_FORMAT))
        sealed.update((h["seq"], h) for h in doc["commits"])
        _refs(doc["steps"], referenced, layouts)
    prefix = commits_dir(run, bid) + "/"
    records = sorted((seq_of_commit_key(i.rel), i) for i in infos if i.rel.startswith(prefix) and seq_of_commit_key(i.rel) is not None)
    newest = records[-1][0] if records else None
    for seq, i in records:
        if seq in sealed and seq != newest:
            if not takeover(sealed[seq]):  # a takeover's record keeps stale writers refused
                drop(i, "commits")
        elif seq not in sealed:
            doc = expand_steps(decode_json(i.rel, store.read_bytes(i.rel), False))
            _refs([{**e, "parts": doc["parts"]} for e in doc["steps"]], referenced, layouts)


def _refs(steps: list[dict], referenced: set, layouts: set) -> None:
    for e in steps:
        layouts.add(e["layout"])
        for p in e["parts"]:
            referenced.add(p["blob"][0])
