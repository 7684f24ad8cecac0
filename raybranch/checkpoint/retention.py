"""Retention: keep every step of a branch's recent past, then only exact and tagged steps.

A branch's policy lives in its ref (``{"keep_steps": N, "keep_days": D}``, either or both; a step
is *recent* if it is among the last N steps or younger than D days). ``raybranch gc`` applies it:

* the cutoff is the newest exact checkpoint (snapshot or key frame) of a sealed page at or before
  the oldest recent step — every step after it decodes from it or from a later exact one, so
  nothing at or after it loses its chain; a key frame there is materialized as a standalone
  snapshot first (the key frames after it are coded against it, or against later ones);
* each sealed page holding steps before the cutoff is rewritten as a new generation
  (:func:`raybranch.ledger.pages.replace_page`) holding only its snapshots, its tagged steps and
  the steps other branches fork from or links point at (and its steps from the cutoff on, as
  they are); a kept lossy step before the cutoff is *materialized*:
  its reconstruction ũ_t is stored exactly, as a snapshot, so it restores bit for bit as before;
* the blobs the old generation named are then unreferenced, and gc frees them after the grace period.
"""
from __future__ import annotations

import time

from ..codec.streams import encode_exact
from ..ledger.lineage import Lineage
from ..ledger.pages import replace_page
from ..ledger.records import check_name
from ..ledger.refs import list_links, read_branch_ref, update_branch_ref
from ..store.blob import Row, write_blob
from ..store.store import Store
from . import state as st
from .restore import EXACT_KINDS, Reader

DAY_S = 86400.0


def set_policy(store: Store, run: str, branch: str, keep_steps: int | None, keep_days: float | None) -> dict | None:
    """Record (or with both None, clear) a branch's retention policy; returns it."""
    for what, v in (("keep_steps", keep_steps), ("keep_days", keep_days)):
        if v is not None and not v > 0:
            from ..errors import RaybranchError

            raise RaybranchError(f"{what} must be positive, got {v}")
    policy = None if keep_steps is None and keep_days is None else {"keep_steps": keep_steps, "keep_days": keep_days}
    update_branch_ref(store, run, check_name("branch", branch), retention=policy)
    return policy


def protected_steps(store: Store, run: str) -> dict[str, set[int]]:
    """{branch id: steps other branches fork from or links point at}."""
    out: dict[str, set[int]] = {}
    for t in list_links(store, run).values():
        out.setdefault(t["branch_id"], set()).add(t["step"])
    for info in store.list(f"{run}/refs/branches"):
        ref = read_branch_ref(store, run, info.base_name.removesuffix(".json"))
        if ref is None or ref.doc["state"] == "deleted":
            continue
        f = Lineage(store, run, bid=ref.doc["branch_id"]).fork
        if f:
            out.setdefault(f["branch_id"], set()).add(f["step"])
    return out


def apply_retention(store: Store, run: str, now: float | None = None) -> int:
    """Thin every live branch that has a policy; returns how many steps were dropped."""
    now = time.time() if now is None else now
    protected = None
    dropped = 0
    for info in store.list(f"{run}/refs/branches"):
        ref = read_branch_ref(store, run, info.base_name.removesuffix(".json"))
        if ref is None or not ref.live or not ref.doc.get("retention"):
            continue
        protected = protected_steps(store, run) if protected is None else protected
        lin = Lineage(store, run, ref.doc["name"])
        dropped += thin_branch(store, run, lin, ref.doc["retention"], protected.get(lin.log.bid, set()), now)
    return dropped


def _cutoff(entries: list[dict], policy: dict, now: float, sealed_up_to: int) -> int | None:
    if not entries:
        return None
    cuts = []
    if policy.get("keep_steps"):
        k = int(policy["keep_steps"])
        cuts.append(entries[-k]["step"] if k <= len(entries) else entries[0]["step"])
    if policy.get("keep_days"):
        young = [e["step"] for e in entries if e["time"] >= now - float(policy["keep_days"]) * DAY_S]
        cuts.append(young[0] if young else entries[-1]["step"] + 1)
    oldest_recent = min(cuts)
    exact = [e["step"] for e in entries if e["kind"] in EXACT_KINDS and e["step"] <= min(oldest_recent, sealed_up_to)]
    return exact[-1] if exact else None


def thin_branch(store: Store, run: str, lin: Lineage, policy: dict, protected: set[int], now: float) -> int:
    log = lin.log
    entries = log.all_entries()
    sealed = [p.last_step for p in log.pages if p.last_step is not None]
    cutoff = _cutoff(entries, policy, now, max(sealed)) if sealed else None
    if cutoff is None:
        return 0
    reader = Reader(store, run)
    pages = [p for p in log.pages if p.first_step is not None and p.first_step <= cutoff]

    def materialize(e: dict) -> bool:
        return (e["step"] < cutoff and e["kind"] != "snapshot" and (e["tags"] or e["step"] in protected)) or \
               (e["step"] == cutoff and e["kind"] == "key")

    # materialize first, while every chain is whole: a rewritten page drops deltas later steps were built on
    recons = {e["step"]: reader.recon(lin, e["step"])
              for p in pages for e in log.page(p.first_seq, p.last_seq)["steps"] if materialize(e)}
    dropped = 0
    for p in pages:
        page = log.page(p.first_seq, p.last_seq)
        keep = [e for e in page["steps"] if e["step"] >= cutoff or e["kind"] == "snapshot" or e["tags"] or e["step"] in protected]
        if len(keep) == len(page["steps"]) and not any(materialize(e) for e in keep):
            continue
        rows: list[Row] = []
        kept = []
        for e in keep:
            if not materialize(e) and (e["kind"] == "snapshot" or e["step"] >= cutoff):  # as they are: their chains start at or after the cutoff
                rows += reader.blobs.step_rows(e)
                kept.append(e)
            else:  # materialize ũ_t: it restores exactly as before, without its chain
                acc, exact, _, _ = recons[e["step"]]
                rows += [Row(e["step"], g, "recon", "float32", (a.size,), encode_exact(a)) for g, a in acc.items()]
                rows += [Row(e["step"], n, "exact", st.dtype_name(t.dtype), tuple(t.shape), encode_exact(st.to_numpy(t)))
                         for n, t in exact.items()]
                kept.append({**{k: v for k, v in e.items() if k != "ref"}, "kind": "snapshot", "base": [log.bid, e["step"]], "depth": 0})
        parts = []
        if rows:
            h, size = store.put_blob(run, write_blob(rows, {"run": run, "branch_id": log.bid, "retained": [p.first_seq, p.last_seq]}))
            parts = [{"name": "retained", "blob": [h, size]}]
        replace_page(store, log, page, [{**e, "parts": parts} for e in kept])
        dropped += len(page["steps"]) - len(keep)
    return dropped
