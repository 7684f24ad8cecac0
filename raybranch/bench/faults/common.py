"""What the fault cases share: the writer's model and its deterministic training, digests of
restored state, object kinds of store paths, writer processes (a fork server), and checks.

No pickle anywhere: writer processes get their arguments as JSON and answer in text lines.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

SEED = 7
SNAPSHOT_EVERY = 8
AWS_VARS_TO_CLEAR = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


# -- the model a writer checkpoints -----------------------------------------------------------
class Trainer:
    """A small MLP with BatchNorm (float buffers and an int64 counter) and SGD with momentum,
    trained on random batches from a seeded generator: the state after step ``s`` is the same in
    every process, so any process can rebuild what a killed writer saved."""

    def __init__(self, seed: int = SEED):
        import torch
        from torch import nn

        torch.set_num_threads(1)
        self.torch, self.nn = torch, nn
        g = torch.Generator().manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(32, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))
        with torch.no_grad():
            for p in self.model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        self.gen = g
        self.step = -1

    def advance_to(self, step: int) -> "Trainer":
        """Train until the state is the one saved at ``step`` (one SGD step per step)."""
        if step < self.step:
            raise ValueError(f"trainer is at step {self.step}, cannot go back to {step}")
        while self.step < step:
            x = self.torch.randn(16, 32, generator=self.gen)
            y = self.torch.randint(0, 10, (16,), generator=self.gen)
            self.opt.zero_grad()
            self.nn.functional.cross_entropy(self.model(x), y).backward()
            self.opt.step()
            self.step += 1
        return self


def ckpt_kwargs(segment_size: int = 3, flush_every: int = 1) -> dict:
    # LC: its coding is a function of (u_t, ũ_{t−1}) alone, so a writer resumed after a kill codes
    # the next step exactly as the uninterrupted reference run did, which these checks compare.
    # The uniform codec's rate control also keeps in-memory state (the last u, σ, κ).
    # background=False: the save pipeline runs inside save() (as the checkpoint actor runs it), so
    # a writer's store operations, its kill points and its "saved" events follow its saves in
    # order, a commit a save closes is made before it returns, and no thread exists at a fork.
    # One attempt per group commit: the cases measure the store's own retries (``retry_deadline``:
    # the outage case checks that a save fails within about it), which the group commit's retries
    # would multiply.
    from ...checkpoint.group import RetryPolicy

    return dict(codec="lc", segment_size=segment_size, flush_every=flush_every, snapshot_every=SNAPSHOT_EVERY, save_rng=False,
                background=False, retry=RetryPolicy(attempts=1))


# -- digests ----------------------------------------------------------------------------------
def _feed(h, obj) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        h.update(f"A{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _feed(h, v)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def digest(obj) -> str:
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()[:24]


def restored_digest(state: dict) -> str:
    """Digest of what a restore hands the user (model, optimizer, extra); not its metadata."""
    return digest({k: state.get(k) for k in ("model", "optimizer", "extra")})


def recon_digest(groups: dict, exact: dict) -> str:
    """Digest of a reconstruction: flat float32 per lossy group and the exact tensors."""
    import torch

    flat = {g: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v) for g, v in groups.items()}
    return digest({"groups": flat, "exact": dict(exact)})


def writer_recon_digest(ckpt) -> str:
    """What a Checkpointer's encoders hold as the reconstruction of its last save."""
    return recon_digest({g: e.recon for g, e in ckpt._enc.encoders.items()}, ckpt._enc.last_exact)


def store_recon_digests(store, run: str, branch: str, steps) -> dict[int, str]:
    """The same digest per step, rebuilt from the store by one fresh Reader (steps that do not
    restore are left out)."""
    from ...checkpoint.restore import Reader
    from ...errors import RaybranchError
    from ...ledger.lineage import Lineage

    reader, out = Reader(store, run), {}
    lin = Lineage(store, run, branch)
    for s in steps:
        try:
            acc, exact, _, _ = reader.recon(lin, s)
        except RaybranchError:
            continue
        out[s] = recon_digest(acc, exact)
    return out


# -- store paths ------------------------------------------------------------------------------
KINDS = ("blob", "layout", "commit", "page", "top", "ref", "link", "branch")


def kind_of(rel: str) -> str:
    name = rel.rsplit("/", 1)[-1]
    if name.startswith(".lock-"):
        return "lock"
    if ".tmp-" in name:
        return "tmp"
    if "/blobs/" in f"/{rel}" and name.endswith(".arrow"):
        return "blob"
    if "/layouts/" in f"/{rel}":
        return "layout"
    if "/commits/" in rel:
        return "commit"
    if "/pages/" in rel:
        return "page"
    if name == "top.json":
        return "top"
    if "/refs/branches/" in rel:
        return "ref"
    if "/refs/links/" in rel:
        return "link"
    if name == "branch.json":
        return "branch"
    return "other"


def local_tmp_files(root: str) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if ".tmp-" in f]


def committed_steps(store, run: str, branch: str = "main") -> list[int]:
    """Steps the branch's log shows (what a reader sees); [] when the branch does not exist."""
    from ...errors import NotFoundError
    from ...ledger.lineage import Lineage

    try:
        return [e["step"] for e in Lineage(store, run, branch).all_entries()]
    except NotFoundError:
        return []


def restore_all(store, run: str, branch: str, steps: list[int]) -> tuple[dict[int, str], dict[int, str]]:
    """({step: digest}, {step: error}) restoring every step with one fresh Reader (on ``store``, a
    Store or a URI); an error that is not a RaybranchError is prefixed ``CRASH``."""
    from ...checkpoint.restore import Reader
    from ...store.store import open_store

    from ...errors import RaybranchError

    reader = Reader(open_store(store) if isinstance(store, str) else store, run)
    ok, bad = {}, {}
    for s in steps:
        try:
            ok[s] = restored_digest(reader.restore(branch, s))
        except RaybranchError as exc:
            bad[s] = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - every failure is a counted outcome
            bad[s] = f"CRASH {type(exc).__name__}: {exc}"
    return ok, bad


def verify_problems(store, run: str | None = None) -> list[str]:
    """verify's problems (a crash of verify itself is reported as a problem, prefixed)."""
    from ...ledger.verify import verify_store

    try:
        return list(verify_store(store, run).problems)
    except Exception as exc:  # noqa: BLE001
        return [f"VERIFY RAISED {type(exc).__name__}: {exc}"]


class Reference:
    """The uninterrupted run: what every step must restore to (restore digest and recon digest)."""

    def __init__(self, workdir: str, steps: int, seed: int = SEED):
        from ...checkpoint.checkpointer import Checkpointer
        from ...store.store import open_store

        uri = "file://" + os.path.join(workdir, "reference")
        tr = Trainer(seed)
        ck = Checkpointer(open_store(uri), "ref", **ckpt_kwargs(4, 1))
        self.recon: dict[int, str] = {}
        for s in range(steps):
            ck.save(s, tr.advance_to(s).model, tr.opt)
            self.recon[s] = writer_recon_digest(ck)
        ck.close()
        self.restored, bad = restore_all(uri, "ref", "main", list(range(steps)))
        if bad:
            raise RuntimeError(f"the reference run does not restore: {bad}")
        self.steps = steps


# -- writer processes -------------------------------------------------------------------------
@dataclass
class Child:
    pid: int
    events: str  # path of the child's event file
    log: str  # its stdout/stderr
    spawner: "object"

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float = 120.0) -> int:
        """Exit status (negative: killed by that signal); SIGKILLs it after ``timeout``."""
        return self.spawner.wait(self, timeout)

    def lines(self) -> list[str]:
        got = self.spawner.lines_of(self)
        if got is not None:
            return got
        try:
            with open(self.events, "rb") as f:
                data = f.read().decode(errors="replace")
        except FileNotFoundError:
            return []
        return data.splitlines() if data.endswith("\n") else data.splitlines()[:-1]

    def wait_for(self, word: str, timeout: float = 120.0) -> bool:
        """Block until an event line starts with ``word``; False if the child ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(line.split(" ", 1)[0] == word for line in self.lines()):
                return True
            if self.spawner.poll(self) is not None:
                return any(line.split(" ", 1)[0] == word for line in self.lines())
            time.sleep(0.005)
        return False

    def log_tail(self, n: int = 20) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return "\n".join(f.read().splitlines()[-n:])
        except FileNotFoundError:
            return ""


class ForkServer:
    """A process that has imported torch and raybranch once and forks a writer per request, so a
    writer is ready in a fraction of a second instead of the ~3 s an interpreter start costs.
    The writers are real processes (forked, not threads); they are SIGKILLed by pid."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "raybranch.bench.faults.writer", "serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._ask({"ping": 1})
        self._status: dict[int, int] = {}
        self._fifos: dict[str, tuple] = {}
        self.n = 0

    def _ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server died (rc {self.proc.poll()})")
        return json.loads(line)

    def spawn(self, args: dict, env: dict | None = None, fsize: int | None = None) -> Child:
        """A writer; with ``fsize`` it runs under RLIMIT_FSIZE = fsize bytes (SIGXFSZ ignored) and
        its events come through a FIFO, which the limit does not touch."""
        self.n += 1
        events = os.path.join(self.workdir, f"w{self.n:04d}.events")
        log = os.path.join(self.workdir, f"w{self.n:04d}.log")
        if fsize is not None:
            os.mkfifo(events)
            lines: list[str] = []

            def pump() -> None:
                with open(events, "rb") as f:  # blocks until the writer opens its end
                    for raw in f:
                        lines.append(raw.decode(errors="replace").rstrip("\n"))
            t = threading.Thread(target=pump, daemon=True)
            t.start()
            self._fifos[events] = (lines, t)
        req = {"spawn": {**args, "events": events}, "env": env or {}, "log": log}
        if fsize is not None:
            req["fsize"] = int(fsize)
        pid = self._ask(req)["pid"]
        return Child(pid, events, log, self)

    def lines_of(self, child: Child) -> list[str] | None:
        got = self._fifos.get(child.events)
        return None if got is None else list(got[0])

    def poll(self, child: Child) -> int | None:
        if child.pid not in self._status:
            st = self._ask({"poll": child.pid})["status"]
            if st is not None:
                self._status[child.pid] = st
        return self._status.get(child.pid)

    def wait(self, child: Child, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (st := self.poll(child)) is None:
            if time.monotonic() > deadline:
                child.kill()
                deadline = float("inf")
            time.sleep(0.005)
        if child.events in self._fifos:
            self._fifos[child.events][1].join(10)
        return st

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class DirectSpawner:
    """One fresh interpreter per writer (``python -m raybranch.bench.faults.writer run ARGS``),
    optionally under RLIMIT_FSIZE (set by ``preexec_fn``: the disk-full case). Its events come
    through a pipe (its stdout), which no file-size limit touches; stderr goes to a log file."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.procs: dict[int, subprocess.Popen] = {}
        self._lines: dict[int, list[str]] = {}
        self._readers: dict[int, threading.Thread] = {}
        self.n = 0

    def spawn(self, args: dict, env: dict | None = None, fsize: int | None = None) -> Child:
        self.n += 1
        log = os.path.join(self.workdir, f"d{self.n:04d}.log")
        full_env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", **(env or {}))
        with open(log, "wb") as err:
            p = subprocess.Popen([sys.executable, "-m", "raybranch.bench.faults.writer", "run",
                                  json.dumps({**args, "events": "-"})],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=full_env,
                                 preexec_fn=None if fsize is None else fsize_limit(fsize))
        self.procs[p.pid] = p
        lines = self._lines[p.pid] = []

        def pump() -> None:
            for raw in p.stdout:
                lines.append(raw.decode(errors="replace").rstrip("\n"))
        t = self._readers[p.pid] = threading.Thread(target=pump, daemon=True)
        t.start()
        return Child(p.pid, "-", log, self)

    def lines_of(self, child: Child) -> list[str]:
        return list(self._lines[child.pid])

    def poll(self, child: Child) -> int | None:
        return self.procs[child.pid].poll()

    def wait(self, child: Child, timeout: float) -> int:
        p = self.procs[child.pid]
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
        self._readers[child.pid].join(10)
        return rc

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def fsize_limit(n: int):
    """A preexec_fn: files written by the process may not grow past ``n`` bytes; SIGXFSZ is
    ignored (and stays ignored across exec), so such a write fails with EFBIG, like a full disk."""
    import resource

    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))
    return preexec


def s3_env(server) -> dict:
    return dict(server.env())


def set_s3_env(server) -> None:
    """Point this process's AWS variables at the test server (the writers inherit them)."""
    for k in AWS_VARS_TO_CLEAR:
        os.environ.pop(k, None)
    os.environ.update(server.env())


def with_query(uri: str, **opts) -> str:
    extra = "&".join(f"{k}={v}" for k, v in opts.items() if v is not None)
    if not extra:
        return uri
    return uri + ("&" if "?" in uri else "?") + extra


def one_line(s: str, n: int = 240) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[: n - 1] + "…"
