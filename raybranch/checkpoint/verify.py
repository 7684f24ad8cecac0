"""Verify a store: every manifest's checksum, every referenced blob and layout, every stored blob's hash.

Returns problems as one-line strings naming the bad file; an empty list means everything checks out.
"""
from __future__ import annotations

import hashlib

from ..errors import RaybranchError
from ..store.store import Store, blob_hash, json_bytes
from .manifest import RunIndex


def runs(store: Store) -> list[str]:
    return store.list_dirs("")


def verify_run(store: Store, run: str) -> tuple[list[str], int]:
    """(problems, number of checkpoints checked) for one run."""
    problems: list[str] = []
    index = RunIndex(store, run)
    referenced: dict[str, int] = {}
    layouts: set[str] = set()
    checked = 0
    for branch in index.branches():
        try:
            entries = index.entries(branch, refresh=True)
        except RaybranchError as exc:
            problems.append(str(exc))
            continue
        for e in entries.values():
            checked += 1
            if e["blob"] is not None:
                referenced[e["blob"][0]] = e["blob"][1]
            layouts.add(e["layout"])
            if e["kind"] != "snapshot":
                if e["parent"] is None:
                    problems.append(f"checkpoint {run}/{branch}/{e['step']} has no parent and is not a snapshot")
                else:
                    pb, ps = e["parent"]
                    try:
                        index.get(pb, ps)
                    except RaybranchError:
                        problems.append(f"checkpoint {run}/{branch}/{e['step']} names a missing parent {pb}/{ps}")
    stored = {i.base_name[: -len(".arrow")]: i for i in store.list(f"{run}/blobs") if i.base_name.endswith(".arrow")}
    for h, info in sorted(stored.items()):
        rel = f"{run}/blobs/{h}.arrow"
        if blob_hash(store.read_bytes(rel)) != h:
            problems.append(f"blob {rel} is corrupt: its sha256 does not match its name")
    for h, size in sorted(referenced.items()):
        if h not in stored:
            problems.append(f"blob {run}/blobs/{h}.arrow is missing (referenced by a manifest)")
        elif stored[h].size != size:
            problems.append(f"blob {run}/blobs/{h}.arrow has {stored[h].size} bytes, its manifest says {size}")
    for h in sorted(layouts):
        rel = f"{run}/layouts/{h}.json"
        try:
            if hashlib.sha256(json_bytes(store.read_json(rel))).hexdigest() != h:
                problems.append(f"layout {rel} is corrupt: its sha256 does not match its name")
        except RaybranchError as exc:
            problems.append(str(exc))
    return problems, checked
