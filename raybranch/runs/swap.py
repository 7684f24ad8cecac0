"""The last step of a quarantine: the replayed branch becomes ``main``, and the old main is kept
under a name that says why (``main-poisoned-<k>``).

Refs move one compare-and-swap at a time, so the swap is three ref writes, each safe to repeat:

1. ``main-poisoned-<k>`` → the old main's id (created; skipped when it is there already);
2. ``main`` (still the old id) → tombstone ``renamed`` (only while it still names the old id);
3. ``main`` → the replay's id (a dead name is reused), then ``replay-<k>`` → tombstone.

A swap killed between any two writes is finished by running it again: each step looks at what
the refs name now. Between 2 and 3 there is briefly no live ``main``; readers of ``served`` are
not affected (it points at clean since the instant recovery).
"""
from __future__ import annotations

from ..errors import RunError
from ..ledger.refs import create_branch_ref, live_id, read_branch_ref, update_branch_ref
from ..store.store import Store


def swap_in_replay(store: Store, run: str, k: int, q: dict, main: str = "main") -> str:
    """Make ``q["replay"]`` the branch ``main`` (see the module docstring); returns its id."""
    old_id, old_name, replay = q["main_bid_before"], q["old_main"], q["replay"]
    replay_id = live_id(store, run, replay) or q.get("replay_bid")
    if live_id(store, run, main) == replay_id and replay_id is not None:
        _tombstone(store, run, replay, replay_id, f"became {main} (quarantine of slice {k})")
        return replay_id
    if replay_id is None:
        raise RunError(f"run {run!r}: the replay branch {replay!r} of the quarantine of slice {k} is gone")
    if live_id(store, run, main) == old_id:
        if live_id(store, run, old_name) != old_id:
            retention = read_branch_ref(store, run, main).doc.get("retention")
            create_branch_ref(store, run, old_name, old_id, retention)
        update_branch_ref(store, run, main, expect_id=old_id, state="renamed",
                          reason=f"quarantine of slice {k}: kept as {old_name}, replaced by {replay}")
    if live_id(store, run, main) is None:
        create_branch_ref(store, run, main, replay_id, read_branch_ref(store, run, replay).doc.get("retention"))
    if live_id(store, run, main) != replay_id:
        raise RunError(f"run {run!r}: branch {main!r} was moved by someone else during the quarantine of slice {k}")
    _tombstone(store, run, replay, replay_id, f"became {main} (quarantine of slice {k})")
    return replay_id


def _tombstone(store: Store, run: str, name: str, bid: str, reason: str) -> None:
    if live_id(store, run, name) == bid:
        update_branch_ref(store, run, name, expect_id=bid, state="renamed", reason=reason)


__all__ = ["swap_in_replay"]
