"""Slice bookkeeping in the store: which checkpoint ends which data slice of a branch.

Slices are numbered from 1 (slice 1 is the first to arrive after the branch point). The branch
point is the checkpoint tagged ``branch-point``; the end of slice k is the checkpoint tagged
``slice-end:k`` (its manifest also lists ``slices=[k]``). A branch's *lineage* is its own
checkpoints plus, through the ``ref`` manifest at its fork point, its parent's lineage up to
that step — so a branch forked from ``main`` sees ``main``'s slice ends before the fork.

``step_before_slice(index, branch, k)`` is the branch as it was before slice k arrived:

    k = 1                                  → the branch point (or the lineage's first checkpoint)
    slice-end:(k−1) on the lineage         → its step
    else (k−1 was skipped, e.g. on clean)  → the latest slice end with id < k, or the branch point,
                                             provided the lineage reached a slice ≥ k

and a ``NotFoundError`` when the lineage never got that far.
"""
from __future__ import annotations

import re

from ..checkpoint.manifest import RunIndex
from ..errors import NotFoundError, RaybranchError

BRANCH_POINT_TAG = "branch-point"
_SLICE_END = re.compile(r"^slice-end:(\d+)$")


def slice_end_tag(k: int) -> str:
    """The tag of the checkpoint that ends slice ``k``."""
    return f"slice-end:{int(k)}"


def lineage(index: RunIndex, branch: str) -> list[dict]:
    """Every checkpoint a branch's history holds, oldest first: the parent lineage up to the
    fork point (followed through ``ref`` manifests), then the branch's own checkpoints."""
    entries = index.entries(branch, refresh=True)
    if not entries:
        known = ", ".join(index.branches()) or "none"
        raise NotFoundError(f"run {index.run!r} has no branch {branch!r} (branches: {known})")
    out: list[dict] = []
    first = entries[min(entries)]
    if first["kind"] == "ref":
        pb, ps = first["parent"]
        out = [e for e in lineage(index, pb) if e["step"] <= ps]
    out += [e for e in entries.values() if e["kind"] != "ref"]
    return out


def slice_ends(index: RunIndex, branch: str) -> dict[int, int]:
    """{slice id: step of its slice-end checkpoint} along the branch's lineage."""
    ends: dict[int, int] = {}
    for e in lineage(index, branch):
        for t in e.get("tags", []):
            m = _SLICE_END.match(t)
            if m:
                ends[int(m.group(1))] = e["step"]
    return ends


def branch_point_step(index: RunIndex, branch: str) -> int:
    """Step of the checkpoint tagged ``branch-point`` on the lineage (else its first checkpoint)."""
    hist = lineage(index, branch)
    tagged = [e["step"] for e in hist if BRANCH_POINT_TAG in e.get("tags", [])]
    return tagged[-1] if tagged else hist[0]["step"]


def step_before_slice(index: RunIndex, branch: str, k: int) -> int:
    """The step of the end of slice k−1 on ``branch`` (slice 1: the branch point); see the module
    docstring for skipped slices. Raises NotFoundError when the branch never reached slice k."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise RaybranchError(f"--before-slice K needs a slice number K ≥ 1 (slices count from 1), got {k!r}")
    if k == 1:
        return branch_point_step(index, branch)
    ends = slice_ends(index, branch)
    if k - 1 in ends:
        return ends[k - 1]
    if not any(s >= k for s in ends):
        have = ", ".join(str(s) for s in sorted(ends)) or "none"
        raise NotFoundError(f"branch {branch!r} of run {index.run!r} has no end of slice {k - 1} (slice ends: {have})")
    earlier = [s for s in ends if s < k]
    return ends[max(earlier)] if earlier else branch_point_step(index, branch)


__all__ = ["BRANCH_POINT_TAG", "branch_point_step", "lineage", "slice_end_tag", "slice_ends", "step_before_slice"]
