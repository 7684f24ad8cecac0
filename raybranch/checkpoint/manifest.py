"""Manifests: the commit record of a checkpoint, and the per-run index built from them.

A manifest is a small JSON document (``<run>/manifests/<branch>/<step:012d>.json``)::

    run, branch, step        where it sits
    kind                     "snapshot" (exact state), "delta" (LC deltas on its parent) or
                             "ref" (a branch's fork point: the parent checkpoint, by reference)
    parent                   [branch, step] or null
    depth                    deltas since the last snapshot on its chain
    codec                    LC parameters of its deltas
    layout                   sha256 of the layout document (which tensors, shapes, dtypes, groups)
    blob                     [sha256, size] of its Arrow blob (null for "ref")
    slices, tags, meta       data slices trained since its parent, names, JSON state
    checksum                 sha256 of the canonical JSON of everything else

Writing the manifest is the commit: blobs are written before it, so a checkpoint without a
manifest does not exist. Compaction moves many manifests into one segment document
(``<run>/segments/<branch>/<first>-<last>.json.zst``, zstd-compressed JSON) pointing at one segment blob.
"""
from __future__ import annotations

import hashlib
import re
import threading
from concurrent.futures import ThreadPoolExecutor

from ..errors import CorruptBlobError, NotFoundError, RaybranchError
from ..store.store import Store, json_bytes

MANIFEST_FORMAT = "raybranch.manifest/1"
SEGMENT_FORMAT = "raybranch.segment/1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(what: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise RaybranchError(f"{what} name {name!r} must be 1-128 characters of letters, digits, '.', '_' or '-'")
    return name


def manifest_path(run: str, branch: str, step: int) -> str:
    return f"{run}/manifests/{branch}/{step:012d}.json"


def segment_path(run: str, branch: str, first: int, last: int) -> str:
    return f"{run}/segments/{branch}/{first:012d}-{last:012d}.json.zst"


def seal(doc: dict) -> dict:
    body = {k: v for k, v in doc.items() if k != "checksum"}
    return {**body, "checksum": hashlib.sha256(json_bytes(body)).hexdigest()}


def unseal(doc: dict, where: str) -> dict:
    want = doc.get("checksum")
    body = {k: v for k, v in doc.items() if k != "checksum"}
    if want != hashlib.sha256(json_bytes(body)).hexdigest():
        raise CorruptBlobError(f"{where} is corrupt: its checksum does not match its content")
    return body


class RunIndex:
    """Every committed checkpoint of a run, by branch and step; loaded lazily, cached, refreshable."""

    def __init__(self, store: Store, run: str):
        self.store = store
        self.run = check_name("run", run)
        self._branches: dict[str, dict[int, dict]] = {}
        self.leftovers: dict[str, list[dict]] = {}  # loose manifests a segment already holds
        self._lock = threading.Lock()

    def branches(self) -> list[str]:
        return self.store.list_dirs(f"{self.run}/manifests")

    def entries(self, branch: str, refresh: bool = False) -> dict[int, dict]:
        with self._lock:
            if refresh or branch not in self._branches:
                self._branches[branch] = self._load(branch)
            return self._branches[branch]

    def add(self, entry: dict) -> None:
        with self._lock:
            self._branches.setdefault(entry["branch"], {})[entry["step"]] = entry

    def replace(self, branch: str, entries: dict[int, dict]) -> None:
        with self._lock:
            self._branches[branch] = entries

    def _load(self, branch: str) -> dict[int, dict]:
        found: dict[int, dict] = {}
        leftovers: list[dict] = []
        seg_infos = self.store.list(f"{self.run}/segments/{branch}")
        man_infos = self.store.list(f"{self.run}/manifests/{branch}")
        rels = [i.path[len(self.store.root) + 1 :] for i in seg_infos + man_infos]
        with ThreadPoolExecutor(max_workers=1 if self.store.loc.is_local else 16) as pool:
            docs = list(pool.map(self.store.read_json, rels))
        for rel, doc in zip(rels, docs):
            doc = unseal(doc, rel)
            if doc.get("format") == SEGMENT_FORMAT:
                for e in doc["entries"]:
                    found[e["step"]] = {**e, "run": self.run, "branch": branch, "segment": rel}
            elif doc["step"] in found:
                leftovers.append({**doc, "file": rel})
            else:
                found[doc["step"]] = {**doc, "file": rel}
        self.leftovers[branch] = leftovers
        return dict(sorted(found.items()))

    def get(self, branch: str, step: int | None = None) -> dict:
        entries = self.entries(branch)
        if not entries:
            entries = self.entries(branch, refresh=True)
        if not entries:
            known = ", ".join(self.branches()) or "none"
            raise NotFoundError(f"run {self.run!r} has no branch {branch!r} in {self.store.uri} (branches: {known})")
        if step is None:
            return entries[max(entries)]
        if step not in entries:
            entries = self.entries(branch, refresh=True)
        if step not in entries:
            raise NotFoundError(f"branch {branch!r} of run {self.run!r} has no checkpoint at step {step} (steps {min(entries)}..{max(entries)})")
        return entries[step]

    def chain(self, branch: str, step: int | None = None) -> list[dict]:
        """Entries from the nearest snapshot to (branch, step), in apply order; refs resolved."""
        target = self.get(branch, step)
        path = []
        e = target
        while True:
            if e["kind"] != "ref":
                path.append(e)
            if e["kind"] == "snapshot":
                break
            if e["parent"] is None:
                raise CorruptBlobError(f"checkpoint {e['branch']}/{e['step']} has no parent and is not a snapshot")
            pb, ps = e["parent"]
            e = self.get(pb, ps)
        path.reverse()
        return path
