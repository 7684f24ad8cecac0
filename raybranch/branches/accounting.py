"""Bytes of a run: the ``torch.save`` baseline and what each branch is charged.

Byte attribution: a branch is charged its own ledger documents (its ref
``refs/branches/<name>.json`` and everything under ``branches/<id>/``: branch.json, commits,
pages, top.json) and the blobs its own checkpoints reference (a blob referenced more than once —
the segment blob of a compacted page — is charged once, to the first branch named). History a
fork shares stays with the branch that wrote it; a fork pays only its ref and its own commits.
``checkpoints`` counts a branch's own checkpoints (the branch point is main's step 0); the
``settle`` re-saves at slice ends (:mod:`raybranch.train.loop`) are counted apart.
"""
from __future__ import annotations

import io

import torch
from torch import nn

from ..ledger.lineage import Lineage
from ..ledger.records import branch_dir, ref_key
from ..store.store import Store
from ..train.loop import SETTLE_TAG


def torch_save_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())`` (the baseline of every ratio)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def attribute_bytes(store: Store, run: str, branches: list[str]) -> tuple[dict[str, dict], int, int]:
    """({branch: {"bytes_stored", "checkpoints", "settle_checkpoints"}}, shared bytes, total
    bytes under the run) — the rule is in the module docstring."""
    charged: set[str] = set()
    out = {}
    for b in branches:
        lin = Lineage(store, run, b)
        own = lin.log.all_entries()  # the branch's own checkpoints: not its parent's before the fork
        settle = sum(1 for e in own if SETTLE_TAG in e.get("tags", []))
        blob_bytes = 0
        for e in own:
            for p in e["parts"]:  # a compacted page's steps share one segment blob: charged once
                h, size = p["blob"]
                if h not in charged:
                    charged.add(h)
                    blob_bytes += int(size)
        ref = store.stat(ref_key(run, b))
        docs = store.total_bytes(branch_dir(run, lin.log.bid)) + (ref.size if ref is not None else 0)
        out[b] = {"bytes_stored": blob_bytes + docs, "checkpoints": len(own) - settle, "settle_checkpoints": settle}
    total = store.total_bytes(run)
    return out, total - sum(v["bytes_stored"] for v in out.values()), total


__all__ = ["attribute_bytes", "torch_save_bytes"]
