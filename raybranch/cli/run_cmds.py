"""``raybranch runs | branches | init | train | mark | quarantine | report``: runs that live in
the store, operated one command at a time (each also runs as ``ray job submit -- raybranch …``;
``--ray`` trains the branches on Ray Train workers of the cluster the command runs on).

A command killed in the middle resumes from the store when it is run again. Bad input (an
unknown run, a slice out of range, a mark contradicting an earlier one) is one line on stderr
and exit status 2, with nothing changed.
"""
from __future__ import annotations

import json
import os
import sys


def _store(args):
    from ..store.store import open_store

    return open_store(args.store)


def _print_json(doc) -> None:
    json.dump(doc, sys.stdout, indent=1, default=str)
    print()


def _runner(args, store):
    if not getattr(args, "ray", False):
        from ..runs.runner import LocalRunner

        return LocalRunner()
    from ..cluster.runner import RayRunner
    from ..cluster.train import connect
    from ..runs.context import RunContext

    connect()
    return RayRunner.for_run(RunContext(store, args.run))


def _hooks(args):
    from ..branches.data import Hooks

    if getattr(args, "json", False):
        return Hooks()
    return Hooks(phase=lambda p: print(f"… {p}", file=sys.stderr, flush=True), log=lambda m: print(m, file=sys.stderr))


def _cmd_runs(args) -> int:
    from ..runs.listing import format_runs, list_runs

    records = list_runs(_store(args))
    if args.json:
        _print_json(records)
    else:
        print(format_runs(records) if records else "no runs")
    return 0


def _cmd_branches(args) -> int:
    from ..runs.listing import branch_tree, format_tree

    records = branch_tree(_store(args), args.run)
    if args.json:
        _print_json(records)
    else:
        print(format_tree(records))
    return 0


def _cmd_init(args) -> int:
    import dataclasses

    from ..config.files import load_branches_config
    from ..errors import RunError
    from ..export import load_state_dict
    from ..runs.ops import init_run

    cfg, job = load_branches_config(args.config, args.overrides)
    start = None
    if args.start is not None:
        try:
            start = load_state_dict(args.start)
        except ValueError as exc:
            raise RunError(f"--from: {exc}") from None
    ray = {k: v for k, v in dataclasses.asdict(job).items() if k not in ("store", "out")}
    out = init_run(_store(args), args.run, cfg, args.mechanism, start=start, start_source=None if start is None else os.path.basename(args.start),
                   ray=ray, hooks=_hooks(args))
    if args.json:
        _print_json(out)
    else:
        verb = "created" if out["created"] else "already there, resumed"
        print(f"run {args.run} ({out['mechanism']}, {out['slices']} dataset slices): {verb}; main and clean start at the "
              f"branch point (step 0); served → main/0; {out['seconds']:.1f} s")
    return 0


def _data(args, store):
    if args.data is None:
        return None
    from ..data.files import read_image_slice
    from ..runs.context import RunContext

    return read_image_slice(args.data, RunContext(store, args.run).data.meta)


def _trained(out: dict) -> str:
    parts = [f"{b} trained slice(s) {','.join(map(str, s))}" for b, s in out["trained"].items() if s]
    return "; ".join(parts) or "nothing to train"


def _heads(out: dict) -> str:
    s = out["served"]
    served = "" if s is None else f"; served → {s['branch']}/{s['step']}"
    return f"heads: main {out['heads']['main']}, clean {out['heads']['clean']}{served}"


def _cmd_train(args) -> int:
    from ..runs.ops import train_slice

    store = _store(args)
    data = _data(args, store)
    out = train_slice(store, args.run, args.slice, _runner(args, store), data=data, hooks=_hooks(args))
    if args.json:
        _print_json(out)
    else:
        print(f"slice {args.slice} of {args.run}: {_trained(out)} ({out['runner']}, {out['seconds']:.1f} s); {_heads(out)}")
    return 0


def _cmd_mark(args) -> int:
    from ..runs.ops import mark_slice

    store = _store(args)
    decision = "verified" if args.verified else "poisoned"
    out = mark_slice(store, args.run, args.slice, decision, _runner(args, store), hooks=_hooks(args))
    if args.json:
        _print_json(out)
    else:
        what = "marked" if out["new"] else "was already marked"
        print(f"slice {args.slice} of {args.run} {what} {decision}; clean: {_trained(out)}; {_heads(out)}")
    return 0


def _cmd_quarantine(args) -> int:
    from ..runs.context import RunContext
    from ..runs.evaluate import evaluate_run
    from ..runs.ops import quarantine
    from ..runs.reports import publish, run_reports

    store = _store(args)
    hooks = _hooks(args)
    q = quarantine(store, args.run, args.slice, _runner(args, store), hooks=hooks)
    if args.export:
        with open(args.export, "wb") as f:
            f.write(store.read_bytes(q["export"]))
    report = None
    if not args.no_report:
        report = publish(store, run_reports(args.run), evaluate_run(RunContext(store, args.run, hooks=hooks)), args.out)
    if args.json:
        _print_json({**q, "report": report})
        return 0
    print(f"instant recovery: served → {q['id']} (clean's head) in {1000 * q['instant_seconds']:.1f} ms; "
          f"model: {store.path(q['export'])}" + (f" and {args.export}" if args.export else ""))
    rs = q.get("replay_seconds")
    print(f"replay: {q['replay']} forked main at step {q['from_step']}, trained slices "
          f"{','.join(map(str, q['replay_slices'])) or 'none'}" + ("" if rs is None else f" in {rs:.1f} s")
          + f"; it is now main (step {q['replay_step']}); the old main is kept as {q['old_main']}")
    if report:
        print(f"report: {store.path(run_reports(args.run))}/report.md (and report.json, plots)"
              + (f"; copy in {report['local']}" if report["local"] else ""))
    return 0


def _cmd_report(args) -> int:
    from ..errors import NotFoundError
    from ..runs.reports import fetch, publish, run_reports

    store = _store(args)
    prefix = run_reports(args.run)
    if not args.rebuild:
        try:
            paths = fetch(store, prefix, args.out)
        except NotFoundError:
            paths = None
        if paths:
            print(f"report of {args.run}: {len(paths)} file(s) from {store.path(prefix)} → {args.out}")
            return 0
    from ..runs.context import RunContext
    from ..runs.evaluate import evaluate_run

    publish(store, prefix, evaluate_run(RunContext(store, args.run, hooks=_hooks(args))), args.out)
    print(f"report of {args.run} built: {store.path(prefix)} and {args.out}")
    return 0


def add_parsers(sub) -> None:
    def common(s, run: bool = True, json_: bool = True):
        s.add_argument("--store", required=True, metavar="URI", help="file:///path or s3://bucket/prefix?endpoint_override=...")
        if run:
            s.add_argument("--run", required=True)
        if json_:
            s.add_argument("--json", action="store_true", help="print JSON records")

    s = sub.add_parser("runs", help="list the runs of a store", description="The runs of a store, with branches, steps and bytes.")
    common(s, run=False)
    s.set_defaults(fn=_cmd_runs)

    s = sub.add_parser("branches", help="the branch tree of a run",
                       description="Every live branch of a run: fork point, head, slices trained, tags, bytes, links.")
    common(s)
    s.set_defaults(fn=_cmd_branches)

    s = sub.add_parser("init", help="create a run: branch point, main and clean",
                       description="Write run.json, train the branch point (or start from a model file) as main step 0, fork clean.")
    common(s)
    s.add_argument("--config", default=None, help="YAML config (jobs/configs/*.yaml); default: the demo's settings")
    s.add_argument("--mechanism", choices=["lc", "lc+dlora"], default=None, help="default: the config's first mechanism")
    s.add_argument("--from", dest="start", metavar="MODEL", help="start from this model (.safetensors or .pt state_dict)")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.set_defaults(fn=_cmd_init)

    s = sub.add_parser("train", help="slice K arrives: main trains it, clean catches up",
                       description="Main trains slice K as it arrives; clean trains the verified slices in order and waits at "
                                   "the first slice not yet decided.")
    common(s)
    s.add_argument("--slice", type=int, required=True, metavar="K")
    s.add_argument("--data", metavar="PATH", help="a new slice from an image folder PATH/<class>/*.png (kept in the store)")
    s.add_argument("--ray", action="store_true", help="train on Ray Train workers")
    s.set_defaults(fn=_cmd_train)

    s = sub.add_parser("mark", help="record a slice as verified or poisoned",
                       description="Record the decision on slice K; clean then trains what it now can. A mark cannot be changed.")
    common(s)
    s.add_argument("--slice", type=int, required=True, metavar="K")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--verified", action="store_true")
    g.add_argument("--poisoned", action="store_true")
    s.add_argument("--ray", action="store_true", help="train clean on Ray Train workers")
    s.set_defaults(fn=_cmd_mark)

    s = sub.add_parser("quarantine", help="serve clean now, replay main without slice K",
                       description="Instant recovery (served → clean's head, exported), then replay: main forked before K "
                                   "trains the later slices without K and becomes main; the old main is kept as main-poisoned-K.")
    common(s)
    s.add_argument("--slice", type=int, required=True, metavar="K")
    s.add_argument("--ray", action="store_true", help="replay on Ray Train workers")
    s.add_argument("--export", metavar="FILE.safetensors", help="also write the served model here")
    s.add_argument("--out", metavar="DIR", help="also write the report here")
    s.add_argument("--no-report", action="store_true", help="skip the report (and its oracle retrain)")
    s.set_defaults(fn=_cmd_quarantine)

    s = sub.add_parser("report", help="write a run's report from the store",
                       description="Copy the run's report (json, md, PNGs) from the store to DIR; build it first if the "
                                   "store has none, or with --rebuild.")
    common(s, json_=False)
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--rebuild", action="store_true", help="measure again (trains the oracle and the baselines)")
    s.set_defaults(fn=_cmd_report)


__all__ = ["add_parsers"]
