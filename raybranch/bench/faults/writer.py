"""The writer process of the fault cases, and the fork server that starts writers quickly.

    python -m raybranch.bench.faults.writer run '<json args>'   # one writer in this process
    python -m raybranch.bench.faults.writer serve               # JSON requests on stdin: spawn/poll

A writer opens a Checkpointer on ``uri``/``run``/``branch`` and saves the deterministic training
states of :class:`~raybranch.bench.faults.common.Trainer` from ``start`` (default: after the
branch's head) for ``steps`` steps. It appends one event line per fact to ``events`` (plain
``os.write`` to an O_APPEND file, so a SIGKILL loses nothing already written)::

    ready                               Checkpointer built, nothing saved yet
    b <i> <phase> <op> <kind> <rel>     store mutation i starts (phase: create/register/commit/seal/compact)
    a <i>                               store mutation i returned
    saved <step> <recon digest> <open>  save() returned; <open> saves are not committed yet
    epoch <n>                           registered as the branch's writer with epoch n
    warning <Category> <message>        a warning (e.g. a seal that failed after its commit)
    error <Type> <message>              the save (or acquire) raised
    done

Instrumentation, in this process only: the store back end's mutating calls and ``seal_page``/
compaction are wrapped to log those events and, with ``kill_at`` = [i, "before"|"after"], to
SIGKILL this process at exactly that store operation.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import traceback

_MUTATIONS = ("write", "create", "cas", "delete", "touch")


class Events:
    def __init__(self, path: str):
        # "-": standard output (a pipe: no file-size limit applies to it)
        self.fd = 1 if path == "-" else os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def __call__(self, *words) -> None:
        line = " ".join(" ".join(str(w).split()) for w in words)
        os.write(self.fd, (line + "\n").encode())


class Tap:
    """Wraps a store's back end: logs every mutation; optionally SIGKILLs at one of them."""

    def __init__(self, store, ev: Events, kill_at=None):
        self.ev, self.n, self.phase = ev, 0, "create"
        self.kill_at = (int(kill_at[0]), kill_at[1]) if kill_at else None
        backend = store.backend
        for name in _MUTATIONS:
            setattr(backend, name, self._wrap(name, getattr(backend, name)))

    def _die(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def _wrap(self, op, fn):
        from .common import kind_of

        def wrapped(rel, *a, **kw):
            self.n += 1
            i = self.n
            self.ev("b", i, self.phase, op, kind_of(rel), rel)
            if self.kill_at == (i, "before"):
                self._die()
            out = fn(rel, *a, **kw)
            self.ev("a", i)
            if self.kill_at == (i, "after"):
                self._die()
            return out
        return wrapped

    def in_phase(self, phase, fn):
        def wrapped(*a, **kw):
            prev, self.phase = self.phase, phase
            try:
                return fn(*a, **kw)
            finally:
                self.phase = prev
        return wrapped


def run(args: dict) -> int:
    import raybranch.ledger.pages as pages
    from raybranch.checkpoint import checkpointer as ckmod
    from raybranch.checkpoint import part_commit as pmod
    from raybranch.checkpoint import writer as wmod
    from raybranch.errors import RaybranchError
    from raybranch.ledger.branch import BranchWriter
    from raybranch.store.store import open_store

    from .common import Trainer, ckpt_kwargs, writer_recon_digest

    ev = Events(args["events"])
    import warnings

    def show(message, category, *_a, **_k) -> None:
        ev("warning", category.__name__, str(message).replace("\n", "\\n"))
    warnings.showwarning = show
    store = open_store(args["uri"])
    tap = Tap(store, ev, args.get("kill_at"))
    pages.seal_page = tap.in_phase("seal", pages.seal_page)
    pmod.create_branch = tap.in_phase("create", pmod.create_branch)  # fork()
    wmod.create_branch = tap.in_phase("create", wmod.create_branch)  # a new branch's first save
    register = BranchWriter.register.__func__
    BranchWriter.register = classmethod(tap.in_phase("register", register))
    ck = ckmod.Checkpointer(store, args["run"], args.get("branch", "main"),
                            **ckpt_kwargs(args.get("segment_size", 3), args.get("flush_every", 1)))
    ck.sealer.rewrite = tap.in_phase("compact", ck.sealer.rewrite) if ck.sealer.rewrite else None
    tr = Trainer(args.get("seed", 7))
    ev("ready")
    try:
        if args.get("acquire"):
            tap.phase = "register"
            ev("epoch", ck.acquire())
        start = args.get("start")
        if start is None:
            head = ck.head()
            start = 0 if head is None else head["step"] + 1
        for step in range(start, start + args.get("steps", 10_000)):
            tap.phase = "commit"
            ck.save(step, tr.advance_to(step).model, tr.opt)
            if ck.epoch is not None and not args.get("_epoch_said"):
                args["_epoch_said"] = True
                ev("epoch", ck.epoch)
            ev("saved", step, writer_recon_digest(ck), len(ck._group))
        tap.phase = "commit"
        ck.close()
    except RaybranchError as exc:
        ev("error", type(exc).__name__, str(exc).replace("\n", "\\n"))
        return 1
    ev("done")
    return 0


def _warm_up(Trainer, ckpt_kwargs) -> None:
    """Run one save before forking, so that what torch and raybranch import lazily on first use
    (torch._dynamo alone takes seconds) is loaded once here, not in every writer."""
    import shutil
    import tempfile

    from raybranch.checkpoint.checkpointer import Checkpointer
    from raybranch.store.store import open_store

    d = tempfile.mkdtemp(prefix="rb-faults-warm-")
    try:
        tr = Trainer()
        ck = Checkpointer(open_store("file://" + d), "warm", **ckpt_kwargs(2, 1))
        for s in range(3):
            ck.save(s, tr.advance_to(s).model, tr.opt)
        ck.restore(1)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    import threading

    if threading.active_count() != 1:
        raise RuntimeError(f"{threading.active_count()} threads before fork: forking would be unsafe")


def serve() -> int:
    """Fork a writer per ``{"spawn": args, "env": {...}, "log": path}``; ``{"poll": pid}`` answers
    its exit status (negative: the signal) or null while it runs."""
    import torch  # noqa: F401 - imported once here, inherited by every fork

    torch.set_num_threads(1)
    import boto3  # noqa: F401
    import raybranch.checkpoint.checkpointer  # noqa: F401
    import raybranch.ledger.verify  # noqa: F401

    from .common import Trainer, ckpt_kwargs

    _warm_up(Trainer, ckpt_kwargs)
    status: dict[int, int] = {}
    for line in sys.stdin:
        req = json.loads(line)
        if "ping" in req:
            reply = {"pong": os.getpid()}
        elif "spawn" in req:
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                code = 3
                try:
                    fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                    os.dup2(fd, 1)
                    os.dup2(fd, 2)
                    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                    sys.stdout = os.fdopen(1, "w", buffering=1)
                    sys.stderr = os.fdopen(2, "w", buffering=1)
                    os.environ.update(req.get("env") or {})
                    if req.get("fsize") is not None:
                        from .spawn import fsize_limit

                        fsize_limit(req["fsize"])()
                    code = run(req["spawn"])
                except BaseException:  # noqa: BLE001 - a writer's crash is its exit status
                    traceback.print_exc()
                finally:
                    os._exit(code)
            reply = {"pid": pid}
        elif "poll" in req:
            pid = int(req["poll"])
            if pid not in status:
                try:
                    got, st = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    got, st = pid, -255 << 8
                if got:
                    status[pid] = -os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)
            reply = {"status": status.get(pid)}
        else:
            reply = {"error": f"unknown request {sorted(req)}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        return serve()
    if argv[:1] == ["run"] and len(argv) == 2:
        import torch

        torch.set_num_threads(1)
        return run(json.loads(argv[1]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
