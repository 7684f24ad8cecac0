"""Ray Train's files inside the store, and Ray checkpoints that point at raybranch checkpoints.

A branch's Ray Train run keeps its bookkeeping (reported checkpoints, metrics) under
``<store>/<run>/_ray/<branch>/`` (:func:`ray_storage`). The checkpoint it reports at a slice end
is a directory holding one small JSON, :data:`RAY_CHECKPOINT_FILE`, that names the raybranch
checkpoint — store URI, run, branch, step — not a copy of the model: :func:`resolve_ray_checkpoint`
reads the pointer, :func:`restore_ray_checkpoint` restores what it names from the store.
"""
from __future__ import annotations

import json
import os

import pyarrow.fs as pafs

from ..checkpoint.restore import Reader
from ..errors import RaybranchError
from ..ledger.refs import live_branches, live_id
from ..store.store import Store, open_store

RAY_CHECKPOINT_FILE = "raybranch.json"
RAY_CHECKPOINT_FORMAT = "raybranch-ray-checkpoint/1"
RAY_DIR = "_ray"


def ray_storage(store: Store, run: str) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for a run's Ray Train results: ``<store>/<run>/_ray``.

    For S3 the filesystem is the store's, minus any credentials (pyarrow pickles explicit keys
    into the object that Ray ships to its controller): each Ray process takes them from its own
    environment, as the checkpoint actor does.
    """
    path = f"{store.root}/{run}/{RAY_DIR}"
    if store.loc.is_local:
        return path, None
    fs = store.fs
    if isinstance(fs, pafs.S3FileSystem):
        rebuild, (kwargs,) = fs.__reduce__()
        kwargs = {k: v for k, v in kwargs.items() if k not in ("access_key", "secret_key", "session_token")}
        fs = rebuild(kwargs)
    return path, fs


def write_ray_checkpoint(directory: str, store_uri: str, run: str, branch: str, step: int, slice_id: int | None = None,
                         branch_id: str | None = None) -> str:
    """Write the JSON that makes ``directory`` a Ray checkpoint naming raybranch checkpoint
    ``run/branch/step`` of ``store_uri`` (and the branch's id, which a rename does not change);
    returns its path."""
    doc = {"format": RAY_CHECKPOINT_FORMAT, "store": store_uri, "run": run, "branch": branch, "step": int(step),
           "id": f"{run}/{branch}/{int(step)}", "slice": slice_id, "branch_id": branch_id}
    path = os.path.join(directory, RAY_CHECKPOINT_FILE)
    with open(path, "w") as f:
        json.dump(doc, f)
    return path


def resolve_ray_checkpoint(checkpoint) -> dict:
    """The raybranch checkpoint a ``ray.train.Checkpoint`` names: {"store", "run", "branch", "step", "id", "slice"}."""
    with checkpoint.as_directory() as d:
        path = os.path.join(d, RAY_CHECKPOINT_FILE)
        if not os.path.exists(path):
            raise RaybranchError(f"Ray checkpoint {checkpoint.path} holds no {RAY_CHECKPOINT_FILE}: not written by raybranch")
        with open(path) as f:
            doc = json.load(f)
    if doc.get("format") != RAY_CHECKPOINT_FORMAT:
        raise RaybranchError(f"Ray checkpoint {checkpoint.path} has format {doc.get('format')!r}, expected {RAY_CHECKPOINT_FORMAT!r}")
    return doc


def restore_ray_checkpoint(checkpoint, store: Store | None = None) -> dict:
    """Restore the raybranch checkpoint a Ray checkpoint names (see :meth:`Checkpointer.restore`).
    The branch is found by its id when it has been renamed since (a quarantine keeps the old main
    as ``main-poisoned-<k>``)."""
    doc = resolve_ray_checkpoint(checkpoint)
    store = store or open_store(doc["store"])
    return Reader(store, doc["run"]).restore(current_name(store, doc["run"], doc["branch"], doc.get("branch_id")), doc["step"])


def current_name(store: Store, run: str, name: str, bid: str | None) -> str:
    """The live name of branch id ``bid`` (``name`` when it still names it, or when ``bid`` is None)."""
    if bid is None or live_id(store, run, name) == bid:
        return name
    for other, other_id in live_branches(store, run).items():
        if other_id == bid:
            return other
    raise RaybranchError(f"Ray checkpoint names branch {name!r} ({bid}) of run {run!r}, which no live branch is now")


__all__ = ["RAY_CHECKPOINT_FILE", "RAY_CHECKPOINT_FORMAT", "RAY_DIR", "current_name", "ray_storage", "resolve_ray_checkpoint",
           "restore_ray_checkpoint", "write_ray_checkpoint"]
