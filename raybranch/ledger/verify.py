"""Verify a store: every document's checksum, every commit chain, every blob's sha256.

Checked per run: branch refs and links; per branch id (live, renamed or deleted): branch.json,
every commit record and sealed page (checksums; commit n names commit n − 1's checksum as its
parent; epochs never go down; no seq is missing), top.json against the pages; every blob a step
names exists with its size, and every stored blob and layout matches its sha256. Problems are
one-line strings naming the bad object; counts say what was checked.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import RaybranchError, StoreError
from ..store.store import Store, blob_hash, decode_json, json_bytes
from .records import (
    BRANCH_FORMAT, COMMIT_FORMAT, PAGE_FORMAT, TOP_FORMAT, branch_doc_key, commits_dir, expand_steps, pages_dir, parse_page_key,
    seq_of_commit_key, top_key, unseal,
)
from .refs import list_links, read_branch_ref

RUN_DIRS = ("branches", "refs", "blobs", "layouts")


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: dict(runs=0, branches=0, orphans=0, commits=0, steps=0, pages=0, blobs=0, layouts=0, bytes=0))


def runs(store: Store) -> list[str]:
    """Runs of a store: top-level directories holding branch refs."""
    return [d for d in store.list_dirs("") if store.list_dirs(d) and "refs" in store.list_dirs(d)]


def verify_store(store: Store, run: str | None = None) -> Report:
    rep = Report()
    todo = runs(store) if run is None else [run]
    for r in todo:
        verify_run(store, r, rep)
    return rep


def _doc(store: Store, rel: str, fmt: str, rep: Report) -> dict | None:
    try:
        data = store.read_bytes(rel)
        rep.counts["bytes"] += len(data)
        return expand_steps(unseal(decode_json(rel, data, rel.endswith(".zst")), rel, fmt))
    except StoreError:
        raise
    except RaybranchError as exc:
        rep.problems.append(str(exc))
        return None


def verify_run(store: Store, run: str, rep: Report) -> None:
    rep.counts["runs"] += 1
    referenced: dict[str, tuple[int, str]] = {}
    layouts: set[str] = set()
    steps_of: dict[str, set[int]] = {}
    named: set[str] = set()
    for info in store.list(f"{run}/refs/branches"):
        name = info.base_name.removesuffix(".json")
        try:
            ref = read_branch_ref(store, run, name)
            if ref is not None:
                named.add(ref.doc["branch_id"])
        except RaybranchError as exc:
            rep.problems.append(str(exc))
    for bid in store.list_dirs(f"{run}/branches"):
        objs = store.list(f"{run}/branches/{bid}", recursive=True)
        if not objs:
            continue  # an emptied directory (a branch gc deleted)
        if bid not in named and not any(seq_of_commit_key(i.rel) == 0 or parse_page_key(i.rel) for i in objs):
            rep.counts["orphans"] += 1  # a creation cut short before its commit 0: garbage for gc, not damage
            continue
        rep.counts["branches"] += 1
        steps_of[bid] = _verify_branch(store, run, bid, objs, rep, referenced, layouts)
    try:
        for name, target in list_links(store, run).items():
            if target["step"] not in steps_of.get(target["branch_id"], set()):
                rep.problems.append(f"link {run}/refs/links/{name}.json points at step {target['step']} of {target['branch_id']}, which has no such checkpoint")
    except RaybranchError as exc:
        rep.problems.append(str(exc))
    stored = {i.base_name[: -len(".arrow")]: i for i in store.list(f"{run}/blobs") if i.base_name.endswith(".arrow")}
    for h, info in sorted(stored.items()):
        rep.counts["blobs"] += 1
        rep.counts["bytes"] += info.size
        if blob_hash(store.read_bytes(info.rel)) != h:
            rep.problems.append(f"blob {info.rel} is corrupt: its sha256 does not match its name")
    for h, (size, where) in sorted(referenced.items()):
        if h not in stored:
            rep.problems.append(f"blob {run}/blobs/{h}.arrow is missing (named by {where})")
        elif stored[h].size != size:
            rep.problems.append(f"blob {run}/blobs/{h}.arrow has {stored[h].size} bytes, {where} says {size}")
    for h in sorted(layouts):
        rel = f"{run}/layouts/{h}.json"
        rep.counts["layouts"] += 1
        try:
            data = store.read_bytes(rel)
            if blob_hash(json_bytes(decode_json(rel, data, False))) != h:
                rep.problems.append(f"layout {rel} is corrupt: its sha256 does not match its name")
        except RaybranchError as exc:
            rep.problems.append(str(exc))


def _verify_branch(store: Store, run: str, bid: str, objs: list, rep: Report, referenced: dict, layouts: set) -> set[int]:
    """``objs``: every object under the branch's directory, as listed once by the caller."""
    _doc(store, branch_doc_key(run, bid), BRANCH_FORMAT, rep)
    headers: dict[int, dict] = {}
    steps: list[tuple[int, dict]] = []
    pages: dict[tuple[int, int], int] = {}
    page_objs = [i for i in objs if i.rel.startswith(pages_dir(run, bid) + "/") and parse_page_key(i.rel)]
    for info in page_objs:
        a, b, g = parse_page_key(info.rel)
        pages[(a, b)] = max(g, pages.get((a, b), -1))
    for info in page_objs:
        parsed = parse_page_key(info.rel)
        if pages[parsed[:2]] != parsed[2]:
            continue  # a superseded generation: gc's to delete
        rep.counts["pages"] += 1
        doc = _doc(store, info.rel, PAGE_FORMAT, rep)
        if doc is None:
            continue
        for h in doc["commits"]:
            headers[h["seq"]] = h
        steps += [(e["seq"], e) for e in doc["steps"]]
    for info in objs:
        seq = seq_of_commit_key(info.rel) if info.rel.startswith(commits_dir(run, bid) + "/") else None
        if seq is None:
            continue
        doc = _doc(store, info.rel, COMMIT_FORMAT, rep)
        if doc is None:
            continue
        if seq in headers:  # a record its page also holds: they must be the same commit
            if doc["checksum"] != headers[seq]["checksum"]:
                rep.problems.append(f"commit record {info.rel} contradicts its page (a commit made after the page was sealed)")
            continue
        if doc["seq"] != seq:
            rep.problems.append(f"commit {info.rel} holds seq {doc['seq']}")
        headers[seq] = doc
        steps += [(seq, {**e, "parts": doc["parts"]}) for e in doc["steps"]]
    where = f"branch {run}/branches/{bid}"
    seqs = sorted(headers)
    rep.counts["commits"] += len(seqs)
    if not seqs:
        rep.problems.append(f"{where} has no commits")
        return set()
    missing = sorted(set(range(seqs[-1] + 1)) - set(seqs))
    if missing:
        rep.problems.append(f"{where} is missing commits {missing[:5]}{'…' if len(missing) > 5 else ''}")
    for s in seqs:
        h, prev = headers[s], headers.get(s - 1)
        if s == 0 and h["parent"] is not None:
            rep.problems.append(f"{where}: commit 0 names a parent")
        if prev is not None and h["parent"] != prev["checksum"]:
            rep.problems.append(f"{where}: commit {s} does not name commit {s - 1} as its parent")
        if prev is not None and h["epoch"] < prev["epoch"]:
            rep.problems.append(f"{where}: commit {s} has epoch {h['epoch']} after epoch {prev['epoch']}")
    last = None
    for seq, e in sorted(steps, key=lambda x: x[1]["step"]):
        if last is not None and e["step"] == last:
            rep.problems.append(f"{where}: step {e['step']} is committed twice")
        last = e["step"]
        layouts.add(e["layout"])
        for p in e["parts"]:
            referenced.setdefault(p["blob"][0], (p["blob"][1], f"{where} step {e['step']}"))
    rep.counts["steps"] += len(steps)
    top = _doc(store, top_key(run, bid), TOP_FORMAT, rep) if store.exists(top_key(run, bid)) else None
    if top is not None:
        for row in top["pages"]:
            if (row[0], row[1]) not in pages:
                rep.problems.append(f"{top_key(run, bid)} lists page {row[0]}-{row[1]}, which is missing")
    return {e["step"] for _, e in steps}
