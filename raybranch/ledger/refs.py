"""Refs: names that point somewhere and move only by compare-and-swap.

* A **branch ref** ``refs/branches/<name>.json`` maps a branch name to a branch id (the directory
  that holds the branch's commits). Fork creates one, rename moves the id to a new name and
  marks the old one ``renamed``, delete marks it ``deleted`` (a tombstone, whose time gc uses).
  It also holds the branch's retention policy.
* A **link** ``refs/links/<name>.json`` ("main", "served", …) points at a step of a branch.

Every change reads the ref with its tag (ETag / content hash) and writes the new version only
if the tag is unchanged (S3 ``If-Match``, or ``If-None-Match: *`` for a new ref; locally an
``flock``-guarded compare and rename). Of two processes moving one ref from the same version,
exactly one succeeds; the other gets :class:`~raybranch.errors.ConflictError`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from ..errors import ConflictError, NotFoundError, RaybranchError
from ..store.store import Store, decode_json, json_bytes
from .records import LINK_FORMAT, REF_FORMAT, check_name, link_key, ref_key, seal, unseal


@dataclass
class Ref:
    doc: dict
    tag: str | None  # None: the ref does not exist yet

    @property
    def live(self) -> bool:
        return self.doc.get("state") == "live"


def _read(store: Store, rel: str, fmt: str) -> Ref | None:
    try:
        data, tag = store.read_tagged(rel)
    except NotFoundError:
        return None
    return Ref(unseal(decode_json(rel, data, False), rel, fmt), tag)


def _write(store: Store, rel: str, doc: dict, prev: Ref | None) -> Ref:
    version = 0 if prev is None else prev.doc["version"] + 1
    body = seal({**doc, "version": version, "time": round(time.time(), 3)})
    data = json_bytes(body)
    tag = store.cas(rel, data, None if prev is None else prev.tag)
    return Ref(body, tag)


def read_branch_ref(store: Store, run: str, name: str) -> Ref | None:
    return _read(store, ref_key(run, check_name("branch", name)), REF_FORMAT)


def live_branch_id(store: Store, run: str, name: str) -> str:
    """The id of live branch ``name``; NotFoundError naming the run's branches otherwise."""
    ref = read_branch_ref(store, run, name)
    if ref is None or not ref.live:
        raise NotFoundError(f"run {run!r} has no branch {name!r} in {store.uri} "
                            f"(branches: {', '.join(list_branch_names(store, run)) or 'none'})")
    return ref.doc["branch_id"]


def live_id(store: Store, run: str, name: str) -> str | None:
    """The id live branch ``name`` points at; None when no live branch has that name."""
    ref = read_branch_ref(store, run, name)
    return ref.doc["branch_id"] if ref is not None and ref.live else None


def live_branches(store: Store, run: str) -> dict[str, str]:
    """{live branch name: branch id} of ``run``, by name."""
    out = {}
    for name in list_branch_names(store, run, live_only=False):
        bid = live_id(store, run, name)
        if bid is not None:
            out[name] = bid
    return dict(sorted(out.items()))


def list_branch_names(store: Store, run: str, live_only: bool = True) -> list[str]:
    names = [i.base_name[: -len(".json")] for i in store.list(f"{run}/refs/branches") if i.base_name.endswith(".json")]
    if not live_only:
        return names
    out = []
    for n in names:
        ref = read_branch_ref(store, run, n)
        if ref is not None and ref.live:
            out.append(n)
    return out


def create_branch_ref(store: Store, run: str, name: str, bid: str, retention: dict | None = None) -> Ref:
    """Point ``name`` at ``bid``; fails if a live branch of that name exists (a dead name is reused)."""
    prev = read_branch_ref(store, run, name)
    if prev is not None and prev.live:
        raise ConflictError(f"branch {name!r} already exists in run {run!r}")
    doc = {"format": REF_FORMAT, "run": run, "name": name, "branch_id": bid, "state": "live", "retention": retention, "reason": None}
    try:
        return _write(store, ref_key(run, name), doc, prev)
    except ConflictError:
        raise ConflictError(f"branch {name!r} of run {run!r} was created by another process at the same time") from None


def update_branch_ref(store: Store, run: str, name: str, expect_id: str | None = None, **changes) -> Ref:
    """Change fields of live branch ref ``name`` (state, retention, reason, branch_id) by CAS."""
    prev = read_branch_ref(store, run, name)
    if prev is None or not prev.live:
        raise NotFoundError(f"run {run!r} has no branch {name!r}")
    if expect_id is not None and prev.doc["branch_id"] != expect_id:
        raise ConflictError(f"branch {name!r} of run {run!r} now points at {prev.doc['branch_id']}, not {expect_id}")
    doc = {k: v for k, v in prev.doc.items() if k not in ("checksum", "version", "time")}
    doc.update(changes)
    return _write(store, ref_key(run, name), doc, prev)


def rename_branch(store: Store, run: str, old: str, new: str) -> str:
    """``new`` takes ``old``'s branch id, then ``old`` becomes a ``renamed`` tombstone."""
    check_name("branch", new)
    ref = read_branch_ref(store, run, old)
    if ref is None or not ref.live:
        raise NotFoundError(f"run {run!r} has no branch {old!r}")
    bid = ref.doc["branch_id"]
    create_branch_ref(store, run, new, bid, ref.doc.get("retention"))
    update_branch_ref(store, run, old, expect_id=bid, state="renamed", reason=f"renamed to {new}")
    return bid


def delete_branch(store: Store, run: str, name: str, reason: str = "deleted") -> str:
    """Mark ``name`` deleted; its commits stay until gc finds them unreachable past the grace period."""
    ref = update_branch_ref(store, run, name, state="deleted", reason=reason)
    return ref.doc["branch_id"]


def read_link(store: Store, run: str, name: str) -> Ref | None:
    return _read(store, link_key(run, check_name("link", name)), LINK_FORMAT)


def move_link(store: Store, run: str, name: str, target: dict, expect: Ref | None | str = "current") -> Ref:
    """Point link ``name`` at ``target`` ({"branch", "branch_id", "step"}).

    ``expect`` is the Ref the caller read (None: the link must not exist yet); the default
    "current" reads it now, so the move is unconditional but still atomic.
    """
    if not {"branch", "branch_id", "step"} <= set(target):
        raise RaybranchError(f"link target needs branch, branch_id and step, got {sorted(target)}")
    rel = link_key(run, check_name("link", name))
    prev = read_link(store, run, name) if expect == "current" else expect
    doc = {"format": LINK_FORMAT, "run": run, "name": name, "target": target, "state": "live"}
    try:
        return _write(store, rel, doc, prev)
    except ConflictError:
        raise ConflictError(f"link {name!r} of run {run!r} was moved by another process; read it again") from None


def list_links(store: Store, run: str) -> dict[str, dict]:
    out = {}
    for i in store.list(f"{run}/refs/links"):
        if i.base_name.endswith(".json"):
            ref = read_link(store, run, i.base_name[: -len(".json")])
            if ref is not None:
                out[ref.doc["name"]] = ref.doc["target"]
    return out
