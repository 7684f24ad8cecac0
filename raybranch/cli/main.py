"""The ``raybranch`` command line: log, restore, verify, bench, demo, sweep."""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import RaybranchError
from .demo import add_parser as add_demo_parser
from .sweep import add_parser as add_sweep_parser


def _cmd_log(args) -> int:
    from ..checkpoint.checkpointer import log_record
    from ..checkpoint.manifest import RunIndex
    from ..store.store import open_store

    store = open_store(args.store)
    index = RunIndex(store, args.run)
    branches = [args.branch] if args.branch else index.branches()
    if not branches:
        raise _not_found(f"run {args.run!r} has no checkpoints in {store.uri}")
    records = []
    for b in branches:
        entries = index.entries(b, refresh=True)
        if not entries:
            raise _not_found(f"run {args.run!r} has no branch {b!r} in {store.uri} (branches: {', '.join(index.branches()) or 'none'})")
        records += [log_record(e) for e in entries.values()]
    if args.json:
        json.dump(records, sys.stdout, indent=1)
        print()
        return 0
    print(f"{'branch':<12} {'step':>8} {'kind':<9} {'parent':<20} {'bytes':>9}  slices / tags")
    for r in records:
        parent = "-" if r["parent"] is None else f"{r['parent'][0]}/{r['parent'][1]}"
        notes = " ".join([*(f"slice:{s}" for s in r["slices"]), *r["tags"]])
        print(f"{r['branch']:<12} {r['step']:>8} {r['kind']:<9} {parent:<20} {r['bytes']:>9}  {notes}")
    return 0


def _not_found(msg: str):
    from ..errors import NotFoundError

    return NotFoundError(msg)


def _cmd_restore(args) -> int:
    from ..checkpoint.restore import Reader
    from ..export import save_state_dict
    from ..store.store import open_store

    if not args.output.endswith((".safetensors", ".pt")):
        raise RaybranchError(f"--output must end in .safetensors or .pt, got {args.output!r}")
    store = open_store(args.store)
    reader = Reader(store, args.run)
    step = args.step
    if args.before_slice is not None:
        from ..branches.slices import step_before_slice

        step = step_before_slice(reader.index, args.branch, args.before_slice)
    state = reader.restore(args.branch, step)
    save_state_dict(state["model"], args.output)
    print(f"restored {args.run}/{args.branch}/{state['step']} -> {args.output}")
    return 0


def _cmd_verify(args) -> int:
    from ..checkpoint.verify import runs, verify_run
    from ..store.store import open_store

    store = open_store(args.store)
    todo = [args.run] if args.run else runs(store)
    if args.run and args.run not in runs(store):
        raise _not_found(f"run {args.run!r} does not exist in {store.uri}")
    bad = 0
    for run in todo:
        problems, checked = verify_run(store, run)
        for p in problems:
            print(f"raybranch verify: {p}", file=sys.stderr)
        bad += len(problems)
        print(f"{run}: {checked} checkpoints, {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if bad else 0


def _cmd_bench(args) -> int:
    if args.what == "codec":
        from ..bench.codec_bench import main as bench_main

        return bench_main(steps=args.steps, as_json=args.json, out=args.out)
    raise RaybranchError(f"unknown benchmark {args.what!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raybranch", description="Compressed per-step checkpoints and branch rollback.")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("log", help="list the committed checkpoints of a run", description="List every committed checkpoint of a run (or one branch).")
    s.add_argument("--store", required=True, help="store URI: file:///path or s3://bucket/prefix?endpoint_override=...")
    s.add_argument("--run", required=True)
    s.add_argument("--branch", help="only this branch (default: all)")
    s.add_argument("--json", action="store_true", help="print JSON records")
    s.set_defaults(fn=_cmd_log)

    s = sub.add_parser("restore", help="restore a checkpoint's model to a file", description="Restore a branch's model at a step (latest by default) to .safetensors or .pt.")
    s.add_argument("--store", required=True)
    s.add_argument("--run", required=True)
    s.add_argument("--branch", default="main")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--step", type=int, help="checkpoint step (default: the branch head)")
    g.add_argument("--before-slice", type=int, metavar="K", help="the branch as it was at the end of slice K-1")
    s.add_argument("--output", required=True, help="FILE.safetensors or FILE.pt")
    s.set_defaults(fn=_cmd_restore)

    s = sub.add_parser("verify", help="check every blob and manifest", description="Verify checksums of every manifest, layout and blob; exit 1 naming any bad one.")
    s.add_argument("--store", required=True)
    s.add_argument("--run", help="only this run (default: all)")
    s.set_defaults(fn=_cmd_verify)

    s = sub.add_parser("bench", help="benchmarks", description="Benchmarks that print their figures.")
    s.add_argument("what", choices=["codec"], help="codec: LeNet-5/digits, a checkpoint every step, raybranch vs the seed scheme")
    s.add_argument("--steps", type=int, default=1000)
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--out", default=None, help="keep the stores here (default: a temporary directory)")
    s.set_defaults(fn=_cmd_bench)
    add_demo_parser(sub)
    add_sweep_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except RaybranchError as exc:
        print(f"raybranch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
