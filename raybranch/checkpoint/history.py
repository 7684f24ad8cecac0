"""A branch's history as log records: what ``Checkpointer.log()`` and ``raybranch log`` show."""
from __future__ import annotations

from ..ledger.lineage import Lineage


def log_record(e: dict, branch: str, prev: list | None) -> dict:
    """What ``log()`` and ``raybranch log`` show of a checkpoint."""
    return {
        "id": f"{e.get('run', '')}/{branch}/{e['step']}".lstrip("/"),
        "branch": branch,
        "step": e["step"],
        "kind": e["kind"],
        "parent": prev,
        "depth": e.get("depth", 0),
        "bytes": sum(p["blob"][1] for p in e.get("parts", [])),
        "slices": e.get("slices", []),
        "tags": e.get("tags", []),
        "time": e.get("time"),
        "commit": e.get("seq"),
        "compacted": any(p["name"] == "segment" for p in e.get("parts", [])),
    }


def branch_log(lin: Lineage, tail: int | None = None) -> list[dict]:
    """The log records of a branch: its fork point (if forked), then its own checkpoints; with
    ``tail``, only its newest ``tail`` checkpoints (reads bounded by ``tail``, not the branch)."""
    out: list[dict] = []
    prev = None
    f = lin.fork
    if tail is not None:
        entries = lin.log.last_entries(tail + 1)
        if len(entries) > tail:
            prev, entries = [lin.name, entries[0]["step"]], entries[1:]
        elif f is not None:
            prev = [lin.name, f["step"]]
        return [{**log_record({**e, "run": lin.run}, lin.name, p), "id": f"{lin.run}/{lin.name}/{e['step']}"}
                for e, p in zip(entries, [prev] + [[lin.name, e["step"]] for e in entries[:-1]])]
    if f is not None:
        src = lin.parent().entry(f["step"])
        out.append({**log_record({**src, "kind": "fork", "parts": [], "tags": ["fork"], "slices": []}, lin.name, [f["branch"], f["step"]]), "depth": src.get("depth", 0)})
        prev = [lin.name, f["step"]]
    for e in lin.log.all_entries():
        out.append(log_record({**e, "run": lin.run}, lin.name, prev))
        prev = [lin.name, e["step"]]
    for r in out:
        r["id"] = f"{lin.run}/{lin.name}/{r['step']}"
    return out
