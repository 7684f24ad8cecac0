"""``raybranch gc`` and ``raybranch branch delete|rename|retention``: retention and branch refs."""
from __future__ import annotations

import argparse
import json

from ..errors import NotFoundError


def _open(args):
    from ..ledger.verify import runs
    from ..store.store import open_store

    store = open_store(args.store)
    found = runs(store)
    if args.run is not None and args.run not in found:
        raise NotFoundError(f"run {args.run!r} does not exist in {store.uri} (runs: {', '.join(found) or 'none'})")
    if not found:
        raise NotFoundError(f"store {store.uri} holds no run (is the URI right?)")
    return store, [args.run] if args.run else found


def _cmd_gc(args) -> int:
    from ..checkpoint.retention import apply_retention
    from ..ledger.gc import collect

    store, todo = _open(args)
    total = {"freed_bytes": 0, "thinned_steps": 0}
    for run in todo:
        rep = collect(store, run, grace_s=args.grace_s, dry_run=args.dry_run, thin=apply_retention)
        total["freed_bytes"] += rep.freed_bytes
        total["thinned_steps"] += rep.thinned_steps
        d = rep.deleted
        verb = "would free" if args.dry_run else "freed"
        print(f"{run}: {verb} {rep.freed_bytes} bytes ({d['blobs']} blobs, {d['layouts']} layouts, {d['pages']} pages, "
              f"{d['commits']} commit records, {d['branches']} dead branches, {d['temporaries']} temporaries); {rep.thinned_steps} steps thinned by retention; "
              f"{rep.kept_young} unreferenced objects younger than {args.grace_s:g} s kept")
    if args.json:
        print(json.dumps(total))
    return 0


def _cmd_branch(args) -> int:
    from ..checkpoint.retention import set_policy
    from ..ledger.refs import delete_branch, rename_branch

    store, _ = _open(args)
    if args.action == "delete":
        bid = delete_branch(store, args.run, args.branch, reason=args.reason or "deleted")
        print(f"deleted branch {args.run}/{args.branch} ({bid}); `raybranch gc` frees its objects after the grace period")
    elif args.action == "rename":
        bid = rename_branch(store, args.run, args.branch, args.to)
        print(f"renamed branch {args.run}/{args.branch} to {args.to} ({bid})")
    else:
        policy = set_policy(store, args.run, args.branch, args.keep_steps, args.keep_days)
        print(f"retention of {args.run}/{args.branch}: {json.dumps(policy)} (applied by `raybranch gc`)")
    return 0


def add_parsers(sub) -> None:
    s = sub.add_parser("gc", help="delete what no branch or kept checkpoint references",
                       description="Apply retention policies, then delete unreferenced blobs, layouts, superseded pages, "
                                   "sealed commit records and dead branches older than the grace period. Prints bytes freed.")
    s.add_argument("--store", required=True)
    s.add_argument("--run", help="only this run (default: all)")
    s.add_argument("--grace-s", type=float, default=3600.0, help="keep unreferenced objects younger than this (default 3600)")
    s.add_argument("--dry-run", action="store_true", help="print what would be freed; delete nothing")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_gc)

    s = sub.add_parser("branch", help="delete or rename a branch, or set its retention",
                       description="Branch operations, each one compare-and-swap of the branch's ref.")
    s.add_argument("action", choices=["delete", "rename", "retention"])
    s.add_argument("--store", required=True)
    s.add_argument("--run", required=True)
    s.add_argument("--branch", required=True)
    s.add_argument("--to", help="rename: the new name")
    s.add_argument("--reason", help="delete: why (kept in the tombstone)")
    s.add_argument("--keep-steps", type=int, help="retention: keep every step of the last N steps")
    s.add_argument("--keep-days", type=float, help="retention: keep every step of the last D days")
    s.set_defaults(fn=_cmd_branch, _check=_check_branch)


def _check_branch(args, parser: argparse.ArgumentParser) -> None:
    if args.action == "rename" and not args.to:
        parser.error("branch rename needs --to NEW")
