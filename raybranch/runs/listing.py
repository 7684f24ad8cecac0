"""What a store holds, run by run and branch by branch, as records and as printed tables.

``list_runs(store)`` gives one record per run; ``branch_tree(store, run)`` one per live branch of a
run, parents before children; ``format_runs`` / ``format_tree`` print them as tables. Only live
branch refs are listed (renamed and deleted names are tombstones). A branch's parent is the branch
id its fork record names, shown under that id's *current* live name: the fork record (and so
:meth:`Lineage.branch_name_of`) keeps the name the parent had when the fork was made. Ray-free.
"""
from __future__ import annotations

import re

from ..branches.accounting import attribute_bytes
from ..branches.slices import slice_ends
from ..errors import NotFoundError
from ..ledger.lineage import Lineage
from ..ledger.refs import list_links, live_branches
from ..ledger.verify import runs
from ..store.store import Store

_SLICE_END = re.compile(r"^slice-end:(\d+)$")


def list_runs(store: Store) -> list[dict]:
    """One record per run of the store, sorted by run name ([] for an empty store):

    ``run``; ``branches``: its live branch names, sorted; ``steps``: checkpoints committed by its
    live branches themselves (a fork's shared history counts once, on the branch that wrote it;
    a deleted branch's steps not at all); ``bytes``: every byte under ``<run>/`` (also run.json,
    slices/, reports/, _ray/ and tombstones); ``links``: {link name: target {"branch", "branch_id",
    "step"}} as stored (``branch`` is the name when the link last moved); ``has_run_json``.
    """
    out = []
    for run in sorted(runs(store)):
        live = live_branches(store, run)
        steps = sum(Lineage(store, run, name, bid).log.totals["steps"] for name, bid in live.items())
        out.append({"run": run, "branches": list(live), "steps": steps, "bytes": store.total_bytes(run),
                    "links": list_links(store, run), "has_run_json": store.exists(f"{run}/run.json")})
    return out


def branch_tree(store: Store, run: str) -> list[dict]:
    """One record per live branch of ``run``, in tree order (depth first from the roots, parents
    before children, siblings by name); NotFoundError naming the store's runs for an unknown run.

    Each record: ``branch``, ``branch_id``; ``parent``: {"branch": the parent id's live name (its
    id if it has none), "step": fork step} or None; ``head``: the lineage's head step (a fork with
    no checkpoints of its own: the fork step; None for an empty root); ``checkpoints``: checkpoints
    it committed itself; ``slices``: sorted ids of the slice ends on its lineage (its own and its
    parents' up to the fork point); ``own_slices``: those it committed; ``tags``: sorted tags of its
    own checkpoints except slice-end ones; ``bytes``: bytes charged to it by
    :func:`~raybranch.branches.accounting.attribute_bytes` (a blob shared with a branch earlier in
    the tree is charged there); ``links``: sorted names of the links whose target is this branch id.
    """
    found = runs(store)
    if run not in found:
        raise NotFoundError(f"run {run!r} does not exist in {store.uri} (runs: {', '.join(sorted(found)) or 'none'})")
    live = live_branches(store, run)
    name_of = {bid: name for name, bid in live.items()}
    lins = {name: Lineage(store, run, name, bid) for name, bid in live.items()}
    links: dict[str, list[str]] = {}
    for link, target in list_links(store, run).items():
        links.setdefault(target.get("follows", target.get("branch_id")), []).append(link)  # the branch served, not its fork point

    children: dict[str | None, list[str]] = {}
    for name, lin in lins.items():
        f = lin.fork
        key = f["branch_id"] if f is not None and f["branch_id"] in name_of else None  # a dead parent: a root
        children.setdefault(key, []).append(name)
    order: list[str] = []

    def visit(name: str) -> None:
        order.append(name)
        for child in sorted(children.get(live[name], [])):
            visit(child)

    for root in sorted(children.get(None, [])):
        visit(root)

    charged, _, _ = attribute_bytes(store, run, order)
    out = []
    for name in order:
        lin, bid = lins[name], live[name]
        f = lin.fork
        own_tags = lin.log.head.get("tags", {})
        own_slices = sorted(int(m.group(1)) for m in map(_SLICE_END.match, own_tags) if m)
        out.append({
            "branch": name, "branch_id": bid,
            "parent": None if f is None else {"branch": name_of.get(f["branch_id"], f["branch_id"]), "step": f["step"]},
            "head": lin.head_step,
            "checkpoints": lin.log.totals["steps"],
            "slices": sorted(slice_ends(lin)),
            "own_slices": own_slices,
            "tags": sorted(t for t in own_tags if not _SLICE_END.match(t)),
            "bytes": charged[name]["bytes_stored"],
            "links": sorted(links.get(bid, [])),
        })
    return out


def human_bytes(n: int) -> str:
    """``n`` bytes as "812 B", "3.4 KiB", "1.2 MiB", "5.0 GiB"."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # unreachable


def _ids(xs: list[int]) -> str:
    return ",".join(str(x) for x in xs) or "-"


def format_runs(records: list[dict]) -> str:
    """A table of :func:`list_runs` records, one run a line under a header ("no runs" when empty)."""
    if not records:
        return "no runs"
    w = max(4, *(len(r["run"]) for r in records))
    lines = [f"{'run':<{w}}  {'branches':>8}  {'steps':>7}  {'bytes':>10}  links"]
    for r in records:
        links = " ".join(f"{k}→{t['branch']}@{t['step']}" for k, t in sorted(r["links"].items())) or "-"
        lines.append(f"{r['run']:<{w}}  {len(r['branches']):>8}  {r['steps']:>7}  {human_bytes(r['bytes']):>10}  {links}"
                     + ("" if r["has_run_json"] else "  (no run.json)"))
    return "\n".join(lines)


def format_tree(records: list[dict]) -> str:
    """A table of :func:`branch_tree` records: each child indented under its parent as
    ``└ name @fork_step``, then head, checkpoints, lineage slices, bytes and ``← links``."""
    if not records:
        return "no branches"
    depth: dict[str, int] = {}
    labels = []
    for r in records:
        p = r["parent"]
        d = depth[p["branch"]] + 1 if p is not None and p["branch"] in depth else 0
        depth[r["branch"]] = d
        if p is None:
            labels.append(r["branch"])
        elif d == 0:  # its parent is no live branch: say where it forked from
            labels.append(f"{r['branch']} @{p['branch']}/{p['step']}")
        else:
            labels.append(f"{'  ' * d}└ {r['branch']} @{p['step']}")
    w = max(14, *(len(s) for s in labels))
    lines = []
    for label, r in zip(labels, records):
        head = "-" if r["head"] is None else str(r["head"])
        links = f"  ← {', '.join(r['links'])}" if r["links"] else ""
        lines.append(f"{label:<{w}}  head {head:>6}  {r['checkpoints']:>5} ckpts  slices {_ids(r['slices']):<10}"
                     f"  {human_bytes(r['bytes']):>10}{links}")
    return "\n".join(lines)


__all__ = ["branch_tree", "format_runs", "format_tree", "human_bytes", "list_runs"]
