"""Writer processes of the fault cases: a fork server that forks writers from one warm process
(torch imported once), and a direct spawner for cases that need a fresh interpreter.

No pickle anywhere: writer processes get their arguments as JSON and answer in text lines.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass


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
