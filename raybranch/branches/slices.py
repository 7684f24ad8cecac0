"""Slice bookkeeping in the store: which checkpoint ends which data slice of a branch.

Slices are numbered from 1 (slice 1 is the first to arrive after the branch point). The branch
point is the checkpoint tagged ``branch-point``; the end of slice k is the checkpoint tagged
``slice-end:k`` (its entry also lists ``slices=[k]``). A branch's *lineage*
(:class:`raybranch.ledger.Lineage`) is its own checkpoints plus, through its fork point, its
parent's lineage up to that step — so a branch forked from ``main`` sees ``main``'s slice ends
before the fork.

Every function takes a ``Lineage`` (``Lineage(store, run, branch)``, or ``reader.lineage(branch)``;
an unknown branch raises ``NotFoundError`` naming the run's branches there). A Lineage is what
the branch held when it was opened: open a new one to see later checkpoints.

``step_before_slice(lin, k)`` is the branch as it was before slice k arrived:

    k = 1                                  → the branch point (or the lineage's first checkpoint)
    slice-end:(k−1) on the lineage         → its step
    else (k−1 was skipped, e.g. on clean)  → the latest slice end with id < k, or the branch point,
                                             provided the lineage reached a slice ≥ k

and a ``NotFoundError`` when the lineage never got that far.
"""
from __future__ import annotations

import re

from ..errors import NotFoundError, RaybranchError
from ..ledger.lineage import Lineage

BRANCH_POINT_TAG = "branch-point"
_SLICE_END = re.compile(r"^slice-end:(\d+)$")


def slice_end_tag(k: int) -> str:
    """The tag of the checkpoint that ends slice ``k``."""
    return f"slice-end:{int(k)}"


def lineage(lin: Lineage) -> list[dict]:
    """Every checkpoint the branch's history holds, oldest first (the parent's up to the fork
    point, then the branch's own), each entry with ``branch``: the name of the branch that wrote it."""
    names: dict[str, str] = {}
    out = []
    for e in lin.all_entries():
        bid = e["branch_id"]
        if bid not in names:
            names[bid] = lin.branch_name_of(bid)
        out.append({**e, "branch": names[bid]})
    return out


def slice_ends(lin: Lineage) -> dict[int, int]:
    """{slice id: step of its slice-end checkpoint} along the branch's lineage."""
    return _ends(lin.all_entries())


def _ends(entries: list[dict]) -> dict[int, int]:
    ends: dict[int, int] = {}
    for e in entries:
        for t in e.get("tags", []):
            m = _SLICE_END.match(t)
            if m:
                ends[int(m.group(1))] = e["step"]
    return ends


def branch_point_step(lin: Lineage) -> int:
    """Step of the checkpoint tagged ``branch-point`` on the lineage (else its first checkpoint)."""
    return _branch_point(lin, lin.all_entries())


def _branch_point(lin: Lineage, hist: list[dict]) -> int:
    if not hist:
        raise NotFoundError(f"branch {lin.name!r} of run {lin.run!r} has no checkpoints yet")
    tagged = [e["step"] for e in hist if BRANCH_POINT_TAG in e.get("tags", [])]
    return tagged[-1] if tagged else hist[0]["step"]


def step_before_slice(lin: Lineage, k: int) -> int:
    """The step of the end of slice k−1 on the branch (slice 1: the branch point); see the module
    docstring for skipped slices. Raises NotFoundError when the branch never reached slice k."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise RaybranchError(f"--before-slice K needs a slice number K ≥ 1 (slices count from 1), got {k!r}")
    hist = lin.all_entries()
    if k == 1:
        return _branch_point(lin, hist)
    ends = _ends(hist)
    if k - 1 in ends:
        return ends[k - 1]
    if not any(s >= k for s in ends):
        have = ", ".join(str(s) for s in sorted(ends)) or "none"
        raise NotFoundError(f"branch {lin.name!r} of run {lin.run!r} has no end of slice {k - 1} (slice ends: {have})")
    earlier = [s for s in ends if s < k]
    return ends[max(earlier)] if earlier else _branch_point(lin, hist)


__all__ = ["BRANCH_POINT_TAG", "branch_point_step", "lineage", "slice_end_tag", "slice_ends", "step_before_slice"]
