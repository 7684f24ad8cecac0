"""The writer's in-memory coding state of a branch, and the rows of one checkpoint.

Every checkpoint is one of

* a **delta**: each lossy group coded against the encoders' reconstruction ũ (the codec of
  :mod:`raybranch.codec.modes`); restoring it applies the deltas since the chain's base;
* a **key frame**: the lossy groups' exact state u_t coded against the previous exact state
  (:mod:`raybranch.codec.exact`), which the writer keeps in memory; ũ restarts at u_t;
* a **snapshot**: the exact state standalone (byte-grouped zstd).

Key frames come every ``key_every`` deltas and at every exact checkpoint asked for (tags, branch
points, ``snapshot=True``); every ``standalone_every``-th exact checkpoint is a snapshot, so a
restore decodes at most ``standalone_every`` exact states and ``key_every`` deltas.
Exact tensors (integer buffers, flagged or tiny tensors, extras such as a Delta-LoRA anchor)
are stored when they change, and at every snapshot: a key frame, which depends on the exact
states back to a snapshot anyway, does not re-store the unchanged ones (a Delta-LoRA model's
anchor is most of its bytes; re-storing it at every key frame cost LeNet-5 on 80×1.25 a third
of its ratio).
"""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from ..codec.exact import encode_against
from ..codec.modes import ROW_KIND, Params, apply_rows, new_encoder, params_to_json
from ..codec.streams import encode_exact
from ..store.blob import Row
from . import state as st


MAX_KEY_EVERY = 4096
CALIBRATION_DELTAS = 5


class StateEncoder:
    """``restore_budget_s``: instead of a fixed ``key_every``, key frames as often as it takes for
    the deltas a restore applies to fit that many seconds: the writer times the decoding of its
    first :data:`CALIBRATION_DELTAS` deltas (a sparse add each, off the store) and sets
    key_every = ⌊budget / median decode time⌋, within 1..MAX_KEY_EVERY."""

    def __init__(self, params: Params, key_every: int, standalone_every: int, device: torch.device | None,
                 restore_budget_s: float | None = None):
        self.params, self.standalone_every, self.device = params, standalone_every, device
        self.restore_budget_s = restore_budget_s
        self.key_every = MAX_KEY_EVERY if restore_budget_s is not None else key_every
        self._decode_s: list[float] = []
        self.mode = params_to_json(params)["mode"]
        self.encoders: dict = {}
        self.layout_hash: str | None = None
        self.ref: dict[str, np.ndarray] | None = None  # lossy groups' last exact state (the next key frame's reference)
        self.ref_at: list | None = None                # [branch id, step] of it
        self.keys_since_snapshot = 0
        self.last_exact: dict[str, torch.Tensor] = {}
        self.ref_exact: dict[str, torch.Tensor] = {}  # the exact tensors as of self.ref's checkpoint
        self.lossy_bytes = 0
        self._stream = None  # the CUDA stream the pipeline encodes on (a CUDA encoder only)

    def stream(self):
        """On a CUDA encoder, a stream of the pipeline's own: its kernels do not queue behind (or
        ahead of) the training's on the default stream."""
        if self.device is None or self.device.type != "cuda":
            return contextlib.nullcontext()
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(self._stream)

    def kind(self, head: dict | None, layout_hash: str, exact: bool) -> str:
        """"delta", "key" or "snapshot" for the next checkpoint."""
        if head is None or layout_hash != self.layout_hash or self.ref is None:
            return "snapshot"
        if not exact and head["depth"] + 1 < self.key_every:
            return "delta"
        return "snapshot" if self.keys_since_snapshot + 1 >= self.standalone_every else "key"

    def rows(self, step: int, kind: str, flats: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> tuple[list[Row], dict]:
        """(rows of the checkpoint, what :meth:`advance` needs) for the lossy groups ``flats``
        and the ``exact`` tensors, which a capture has checked for NaN/Inf already. A delta whose
        encoder refuses (an overflowing delta: NonFiniteError) changes nothing."""
        rows: list[Row] = []
        pending: dict = {"kind": kind, "q": {}, "changed": {}, "flats": None}
        if kind == "delta":
            for g, flat in flats.items():
                payload, table, q = self.encoders[g].encode(flat)  # raises on NaN/Inf
                pending["q"][g] = q
                rows.append(Row(step, g, ROW_KIND[self.mode], "float32", (flat.numel(),), payload, table))
                self.lossy_bytes += flat.numel() * 4
            if self.restore_budget_s is not None and len(self._decode_s) < CALIBRATION_DELTAS:
                self._calibrate(rows)
        else:
            arrays = {}
            for g, flat in flats.items():
                arrays[g] = flat.detach().cpu().numpy().copy()
            for g, a in arrays.items():
                if kind == "key":
                    rows.append(Row(step, g, "key", "float32", (a.size,), encode_against(a, self.ref[g])))
                else:
                    rows.append(Row(step, g, "recon", "float32", (a.size,), encode_exact(a)))
            pending["flats"] = arrays
        for n, t in exact.items():
            # a delta against the chain's last values; a key frame against its ref's (what a
            # restore finds along the refs); a snapshot stores them all
            prev = (self.last_exact if kind == "delta" else self.ref_exact).get(n)
            if kind == "snapshot" or prev is None or prev.shape != t.shape or not torch.equal(prev, t.to(prev.device)):
                pending["changed"][n] = t
                rows.append(Row(step, n, "exact", st.dtype_name(t.dtype), tuple(t.shape), encode_exact(st.to_numpy(t))))
        return rows, pending

    def _calibrate(self, rows: list[Row]) -> None:
        t0 = time.perf_counter()
        for r in rows:
            apply_rows(np.zeros(int(np.prod(r.shape)), np.float32), [(r.kind, r.payload, r.table, self.params)],
                       self.encoders[r.name].sizes)
        self._decode_s.append(time.perf_counter() - t0)
        per_delta = float(np.median(self._decode_s))
        self.key_every = int(min(MAX_KEY_EVERY, max(1, self.restore_budget_s // max(per_delta, 1e-9))))

    def entry_fields(self, kind: str, bid: str, step: int, head: dict | None) -> dict:
        fields = {
            "kind": kind,
            "base": [bid, step] if kind != "delta" else head["base"],
            "depth": 0 if kind != "delta" else head["depth"] + 1,
            "codec": params_to_json(self.params),
        }
        if kind == "key":
            fields["ref"] = list(self.ref_at)
        return fields

    def advance(self, pending: dict, layout: dict, flats: dict[str, torch.Tensor], layout_hash: str, bid: str, step: int) -> None:
        """Move the in-memory state past a checkpoint whose rows were formed (capture)."""
        kind = pending["kind"]
        if kind == "delta":
            for g, q in pending["q"].items():
                self.encoders[g].advance(q)
        else:
            self.reset(layout, flats)
            self.ref, self.ref_at = pending["flats"], [bid, step]
            self.keys_since_snapshot = 0 if kind == "snapshot" else self.keys_since_snapshot + 1
        self.layout_hash = layout_hash
        for n, t in pending["changed"].items():
            self.last_exact[n] = t  # a capture's own copy
        if kind != "delta":
            self.ref_exact = dict(self.last_exact)

    def reset(self, layout: dict, flats: dict[str, torch.Tensor]) -> None:
        self.encoders = {}
        for g, group in layout["groups"].items():
            enc = new_encoder(group["names"], group["sizes"], self.params, self.device or flats[g].device)
            enc.reset(flats[g])
            self.encoders[g] = enc

    def load(self, layout: dict, layout_hash: str, recon: dict[str, np.ndarray], exact: dict[str, torch.Tensor],
             base: dict, base_state: dict[str, np.ndarray], keys: int,
             base_exact: dict[str, torch.Tensor] | None = None) -> None:
        """Continue a branch from its head: ũ from the store, and the exact state its chain starts
        at (lossy groups ``base_state``, exact tensors ``base_exact``; None: the next key frame
        stores every exact tensor)."""
        self.reset(layout, {g: torch.from_numpy(a) for g, a in recon.items()})
        self.layout_hash = layout_hash
        self.last_exact = dict(exact)
        self.ref_exact = dict(base_exact or {})
        same_layout = base["layout"] == layout_hash
        self.ref = {g: base_state[g] for g in layout["groups"]} if same_layout and base_state is not None else None  # a part's groups
        self.ref_at = [base["branch_id"], base["step"]]
        self.keys_since_snapshot = keys + (base["kind"] == "key")
