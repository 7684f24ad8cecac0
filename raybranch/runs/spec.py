"""What a run records about itself in the store, besides its checkpoints.

Layout under ``<store>/<run>/`` (beside the ledger's ``refs/``, ``branches/``, ``blobs/``,
``layouts/``; docs/FORMAT.md):

- ``run.json`` — written once by ``raybranch init`` (create-only): format, mechanism, the
  experiment config (model, dataset, slicing, seeds, codec, Delta-LoRA), the Checkpointer
  settings, and per dataset slice its size and content hash;
- ``slices/<k>.json`` — slice k has arrived (create-only): where its data come from
  (``dataset``: rebuilt from run.json's dataset and slicing, deterministic from the seed; or
  ``files``: the bytes are in the store, ``slices/<k>.safetensors``), its size and its
  content hash, checked again whenever the slice is trained;
- ``marks/<k>.json`` — the decision on slice k (create-only): ``verified`` or ``poisoned``; a
  second mark that agrees is a no-op, one that contradicts is a :class:`RunError`;
- ``records/`` — what the commands did (branch point, per-branch slice summaries, quarantines),
  for the report; ``reports/`` — the reports (json, md, PNGs) and sweep tables.

The content hash of a slice is sha256 over, in order, each tensor's dtype, shape and bytes:
images (as the model sees them for dataset slices, the stored uint8 pixels for file slices)
then labels. Nothing here is pickled.
"""
from __future__ import annotations

import hashlib
import json
import time

import torch

from ..config.classes import MECHANISMS, ExperimentConfig
from ..errors import ConflictError, NotFoundError, RunError
from ..export import read_safetensors, safetensors_bytes
from ..ledger.records import check_name
from ..store.store import Store, json_bytes

RUN_FORMAT = "raybranch-run/1"
SLICE_FORMAT = "raybranch-slice/1"
MARK_FORMAT = "raybranch-mark/1"
DECISIONS = ("verified", "poisoned")
NON_LEDGER_FILES = ("run.json",)  # under a run, beside the ledger: not checkpoint bytes
NON_LEDGER_DIRS = ("slices", "marks", "records", "reports", "_ray")


def run_json_key(run: str) -> str:
    return f"{run}/run.json"


def slice_key(run: str, k: int) -> str:
    return f"{run}/slices/{int(k):06d}.json"


def slice_data_key(run: str, k: int) -> str:
    return f"{run}/slices/{int(k):06d}.safetensors"


def mark_key(run: str, k: int) -> str:
    return f"{run}/marks/{int(k):06d}.json"


def record_key(run: str, name: str) -> str:
    return f"{run}/records/{name}.json"


def content_hash(*tensors: torch.Tensor) -> str:
    """sha256 over each tensor's dtype, shape and bytes (see the module docstring)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def create_json(store: Store, rel: str, doc: dict) -> bool:
    """Write ``doc`` at ``rel`` only if nothing is there; True when this call created it."""
    return store.create(rel, json_bytes(doc))


def read_json_or_none(store: Store, rel: str) -> dict | None:
    try:
        return store.read_json(rel)
    except NotFoundError:
        return None


class RunSpec:
    """``run.json`` of a run, read from the store (:meth:`load`) or built for ``init`` (:meth:`new`)."""

    def __init__(self, doc: dict):
        self.doc = doc
        self.run: str = doc["run"]
        self.mechanism: str = doc["mechanism"]
        self.config = ExperimentConfig.from_dict(doc["experiment"])
        self.dataset_slices: list[dict] = doc["dataset_slices"]

    @classmethod
    def new(cls, run: str, config: ExperimentConfig, mechanism: str, dataset_slices: list[dict], start: dict) -> "RunSpec":
        check_name("run", run)
        if mechanism not in MECHANISMS:
            raise RunError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
        return cls({"format": RUN_FORMAT, "run": run, "mechanism": mechanism, "experiment": config.as_dict(),
                    "checkpointer": config.checkpointer_kwargs(), "dataset_slices": dataset_slices, "start": start,
                    "created": round(time.time(), 3)})

    @classmethod
    def load(cls, store: Store, run: str) -> "RunSpec":
        doc = read_json_or_none(store, run_json_key(run))
        if doc is None:
            from ..ledger.verify import runs

            have = ", ".join(runs(store)) or "none"
            raise NotFoundError(f"run {run!r} has no run.json in {store.uri} (runs: {have}); create it with `raybranch init`")
        if doc.get("format") != RUN_FORMAT:
            raise RunError(f"{run}/run.json has format {doc.get('format')!r}, expected {RUN_FORMAT!r}")
        return cls(doc)

    def create(self, store: Store) -> bool:
        """Write run.json if absent (True); if present, it must hold the same run (False), else RunError."""
        if create_json(store, run_json_key(self.run), self.doc):
            return True
        old = RunSpec.load(store, self.run)
        keys = ("mechanism", "experiment", "start")
        diff = [k for k in keys if old.doc[k] != self.doc[k]]
        if diff:
            detail = _first_difference(old.doc, self.doc, diff[0])
            raise RunError(f"run {self.run!r} already exists with another {diff[0]} ({detail}); pick another --run")
        self.doc = old.doc
        return False

    @property
    def lora(self) -> bool:
        return self.mechanism == "lc+dlora"

    @property
    def merge(self) -> str:
        return self.config.lora_merge if self.lora else "none"

    @property
    def n_dataset_slices(self) -> int:
        return len(self.dataset_slices)

    # -- slices ---------------------------------------------------------------------------------
    def arrived(self, store: Store) -> dict[int, dict]:
        """{k: slice record} of every slice that has arrived."""
        out = {}
        for info in store.list(f"{self.run}/slices"):
            if info.base_name.endswith(".json"):
                doc = store.read_json(info.rel)
                out[int(doc["slice"])] = doc
        return out

    def check_slice_id(self, k, store: Store, arriving: bool = False, files: bool = False) -> None:
        """RunError unless ``k`` names a slice this run can have: 1..n dataset slices, or (with
        files) the next slice id after every slice so far."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise RunError(f"slice {k!r} is not a slice number (slices count from 1)")
        n = self.n_dataset_slices
        if files:
            nxt = max([n, *self.arrived(store)]) + 1
            if k <= n:
                raise RunError(f"slice {k} of run {self.run!r} comes from its dataset ({self.config.dataset}, slices 1..{n}); --data adds slice {nxt}")
            if arriving and k != nxt and not store.exists(slice_key(self.run, k)):
                raise RunError(f"--data adds the next slice of run {self.run!r}, {nxt}, not {k}")
            return
        if k > n and not store.exists(slice_key(self.run, k)):
            raise RunError(f"slice {k} is out of range for run {self.run!r}: its dataset has slices 1..{n}"
                           " (a later slice needs --data PATH)")

    def record_arrival(self, store: Store, k: int, source: str, images: int, sha256: str) -> dict:
        """Create ``slices/<k>.json`` (or check the one there names the same bytes)."""
        doc = {"format": SLICE_FORMAT, "slice": int(k), "source": source, "images": int(images), "sha256": sha256,
               "arrived": round(time.time(), 3)}
        if create_json(store, slice_key(self.run, k), doc):
            return doc
        old = store.read_json(slice_key(self.run, k))
        if old["sha256"] != sha256:
            raise RunError(f"slice {k} of run {self.run!r} arrived before with other data (sha256 {old['sha256'][:12]}…, "
                           f"now {sha256[:12]}…); a slice's data never change")
        return old

    def store_file_slice(self, store: Store, k: int, pixels: torch.Tensor, labels: torch.Tensor) -> dict:
        """Keep a ``--data`` slice's bytes in the store, then record its arrival."""
        h = content_hash(pixels, labels)
        store.create(slice_data_key(self.run, k), safetensors_bytes({"pixels": pixels.contiguous(), "labels": labels.contiguous()}))
        return self.record_arrival(store, k, "files", pixels.shape[0], h)

    def load_file_slice(self, store: Store, k: int, record: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 pixels, labels) of a ``--data`` slice, its hash checked."""
        rel = slice_data_key(self.run, k)
        t = read_safetensors(store.read_bytes(rel), rel)
        if content_hash(t["pixels"], t["labels"]) != record["sha256"]:
            raise RunError(f"{rel} does not match the content hash recorded when slice {k} arrived")
        return t["pixels"], t["labels"]

    # -- marks ----------------------------------------------------------------------------------
    def marks(self, store: Store) -> dict[int, str]:
        """{k: "verified" | "poisoned"} of every decided slice."""
        out = {}
        for info in store.list(f"{self.run}/marks"):
            if info.base_name.endswith(".json"):
                doc = store.read_json(info.rel)
                out[int(doc["slice"])] = doc["decision"]
        return out

    def mark(self, store: Store, k: int, decision: str) -> bool:
        """Record ``decision`` for slice k; True when new, False when the same mark was there;
        RunError when it contradicts the earlier one or the slice has not arrived."""
        if decision not in DECISIONS:
            raise RunError(f"a mark is one of {DECISIONS}, got {decision!r}")
        if not store.exists(slice_key(self.run, k)):
            self.check_slice_id(k, store)
            raise RunError(f"slice {k} of run {self.run!r} has not arrived yet: train it first (`raybranch train --slice {k}`)")
        doc = {"format": MARK_FORMAT, "slice": int(k), "decision": decision, "time": round(time.time(), 3)}
        if create_json(store, mark_key(self.run, k), doc):
            return True
        old = store.read_json(mark_key(self.run, k))["decision"]
        if old != decision:
            raise RunError(f"slice {k} of run {self.run!r} is already marked {old}; a mark cannot be changed")
        return False


def write_record(store: Store, run: str, name: str, doc: dict, replace: bool = False) -> None:
    """A command's record under ``records/`` (create-only unless ``replace``)."""
    rel = record_key(run, name)
    if replace:
        store.write_json(rel, doc)
    elif not create_json(store, rel, doc):
        raise ConflictError(f"{rel} exists already")


def read_records(store: Store, run: str, prefix: str) -> list[dict]:
    """Every record whose name starts with ``prefix``, by name."""
    return [store.read_json(i.rel) for i in store.list(f"{run}/records")
            if i.base_name.startswith(prefix) and i.base_name.endswith(".json")]


def _first_difference(a: dict, b: dict, key: str) -> str:
    x, y = a[key], b[key]
    if isinstance(x, dict) and isinstance(y, dict):
        for k in sorted(set(x) | set(y)):
            if x.get(k) != y.get(k):
                return f"{k}: {json.dumps(x.get(k))} there, {json.dumps(y.get(k))} now"
    return f"{json.dumps(x)[:80]} there"


__all__ = ["DECISIONS", "NON_LEDGER_DIRS", "NON_LEDGER_FILES", "RUN_FORMAT", "RunSpec", "content_hash", "create_json", "mark_key",
           "read_json_or_none", "read_records", "record_key", "run_json_key", "slice_data_key", "slice_key", "write_record"]
