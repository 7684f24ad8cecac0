"""The ``raybranch`` command line: runs, branches, init, train, mark, quarantine, report, log, restore,
verify, gc, branch, bench, demo, sweep."""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import RaybranchError
from .demo import add_parser as add_demo_parser
from .run_cmds import add_parsers as add_run_parsers
from .store_cmds import add_parsers as add_store_parsers
from .sweep import add_parser as add_sweep_parser


def _cmd_log(args) -> int:
    from ..checkpoint.history import branch_log
    from ..ledger.lineage import Lineage
    from ..ledger.refs import list_branch_names
    from ..store.store import open_store

    store = open_store(args.store)
    branches = [args.branch] if args.branch else list_branch_names(store, args.run)
    if not branches:
        raise _not_found(f"run {args.run!r} has no checkpoints in {store.uri}")
    records = []
    for b in branches:  # an unknown branch: NotFoundError naming the run's branches
        records += branch_log(Lineage(store, args.run, b), tail=args.tail)
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

        step = step_before_slice(reader.lineage(args.branch), args.before_slice)
    state = reader.restore(args.branch, step)
    save_state_dict(state["model"], args.output)
    print(f"restored {args.run}/{args.branch}/{state['step']} -> {args.output}")
    return 0


def _cmd_verify(args) -> int:
    from ..ledger.verify import runs, verify_store
    from ..store.store import open_store

    store = open_store(args.store)
    found = runs(store)
    if not found:
        raise _not_found(f"store {store.uri} holds no run (is the URI right?)")
    if args.run and args.run not in found:
        raise _not_found(f"run {args.run!r} does not exist in {store.uri} (runs: {', '.join(found)})")
    rep = verify_store(store, args.run)
    for p in rep.problems:
        print(f"raybranch verify: {p}", file=sys.stderr)
    c = rep.counts
    print(f"checked {c['runs']} run(s), {c['branches']} branch(es), {c['commits']} commits, {c['steps']} checkpoints, "
          f"{c['pages']} pages, {c['blobs']} blobs, {c['layouts']} layouts, {c['bytes']} bytes: "
          + ("OK" if not rep.problems else f"{len(rep.problems)} problem(s)"))
    return 1 if rep.problems else 0


def _cmd_bench(args) -> int:
    if args.what == "codec":
        from ..bench.codec.report import main as bench_main
        from ..bench.codec.trajectory import MODELS

        models = tuple(args.models.split(",")) if args.models else MODELS
        bad = [m for m in models if m not in MODELS]
        if bad:
            raise RaybranchError(f"--models: unknown {', '.join(bad)}; choose from {', '.join(MODELS)}")
        return bench_main(steps=args.steps, as_json=args.json, out=args.out, models=models, large=not args.no_large)
    raise RaybranchError(f"unknown benchmark {args.what!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raybranch", description="Compressed per-step checkpoints and branch rollback.")
    sub = p.add_subparsers(dest="cmd", required=True)
    add_run_parsers(sub)

    s = sub.add_parser("log", help="list the committed checkpoints of a run", description="List every committed checkpoint of a run (or one branch).")
    s.add_argument("--store", required=True, help="store URI: file:///path or s3://bucket/prefix?endpoint_override=...")
    s.add_argument("--run", required=True)
    s.add_argument("--branch", help="only this branch (default: all)")
    s.add_argument("--tail", type=int, metavar="N", help="only the newest N checkpoints of each branch (a few reads, whatever its length)")
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
    s.add_argument("what", choices=["codec"], help="codec: a checkpoint every step of real runs; codecs, key frames and the LC baseline")
    s.add_argument("--steps", type=int, default=1000)
    s.add_argument("--models", help="comma-separated (default: lenet5,lenet5-tanh,resnet-small)")
    s.add_argument("--no-large", action="store_true", help="skip the ResNet-50-sized restore")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--out", default=None, help="keep the stores here (default: a temporary directory)")
    s.set_defaults(fn=_cmd_bench)
    add_demo_parser(sub)
    add_sweep_parser(sub)
    add_store_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "_check"):
        args._check(args, parser)
    try:
        return int(args.fn(args) or 0)
    except RaybranchError as exc:
        print(f"raybranch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
