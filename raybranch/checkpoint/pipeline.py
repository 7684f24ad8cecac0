"""The thread behind the training loop: the saves a Checkpointer captured, encoded, written and
committed in order, off the training thread.

    training thread                         pipeline thread
      capture (copy, NaN/Inf check) ─queue─▶  encode (δ vs ũ, quantize, entropy-code)
      ≤ max_pending captures queued           group: rows of many steps → one blob, one commit
                                              when the window closes (steps, seconds, exact)

Backpressure: the queue holds at most ``max_pending`` captures; ``submit`` blocks while it is
full, so a slow store slows training instead of growing memory.

Failures: the first exception the thread meets (an encode, a blob write, a commit) is kept with
the step it hit, and every capture queued after it is dropped, its step recorded: a branch never
silently skips a step. :meth:`Pipeline.take_failure` hands the failure to the training thread,
whose next ``save``, ``flush`` or ``close`` raises it (type and message kept, the dropped steps
named).

The window: when no capture arrives, the thread wakes up when ``due_in()`` says the open group's
time is up and calls ``on_idle()`` (the commit), so a paused loop does not hold saves back.

At interpreter exit every pipeline still running is drained (its queue encoded, the open group
committed), so a script that ends without ``close()`` loses nothing; a failure found then is a
warning, there being no call left to raise it from.
"""
from __future__ import annotations

import atexit
import queue
import threading
import time
import warnings
import weakref
from typing import Callable

from ..errors import RaybranchError


class _Barrier:
    """Processed after everything submitted before it; ``run`` is called on the thread."""

    def __init__(self, run: Callable[[], None] | None):
        self.run, self.done = run, threading.Event()


_STOP = object()


class Pipeline:
    """``process(item)`` runs on the thread for every submitted item, in order; ``step_of(item)``
    names an item in errors; ``on_failure(exc)`` runs on the thread after a failure (to reset
    what the failed work left in memory). ``cpu_s``: CPU seconds the thread has used."""

    def __init__(self, name: str, process: Callable[[object], None], *, max_pending: int,
                 step_of: Callable[[object], int], due_in: Callable[[], float | None] = lambda: None,
                 on_idle: Callable[[], None] = lambda: None, on_failure: Callable[[BaseException], None] = lambda exc: None,
                 release: Callable[[object], None] = lambda item: None):
        self.name = name
        self._process, self._step_of, self._due_in, self._on_idle = process, step_of, due_in, on_idle
        self._on_failure, self._release = on_failure, release
        self._q: queue.Queue = queue.Queue(maxsize=max_pending)
        self._failure: tuple[BaseException, int, list[int]] | None = None  # (error, its step, steps dropped after it)
        self._thread: threading.Thread | None = None
        self.cpu_s = 0.0
        self.blocked_s = 0.0  # training-thread seconds spent waiting for room in the queue

    # -- the training thread's side -------------------------------------------------------------
    def submit(self, item) -> None:
        """Queue ``item``; blocks while ``max_pending`` items wait (backpressure)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()
            _RUNNING.add(self)
        try:
            self._q.put_nowait(item)
        except queue.Full:
            t0 = time.perf_counter()
            self._q.put(item)
            self.blocked_s += time.perf_counter() - t0

    def wait(self, run: Callable[[], None] | None = None) -> None:
        """Return once every item submitted so far is processed, after ``run()`` ran on the thread
        behind them (unless a failure is pending: then nothing more runs there)."""
        if self._thread is None:
            if run is not None and self._failure is None:
                self._run_guarded(run, None)
            return
        b = _Barrier(run)
        self._q.put(b)
        b.done.wait()

    def take_failure(self) -> tuple[BaseException, int, list[int]] | None:
        """(error, step it hit, steps dropped after it), once; call after :meth:`wait`."""
        f, self._failure = self._failure, None
        return f

    @property
    def failed(self) -> bool:
        return self._failure is not None

    def pending(self) -> int:
        return self._q.qsize()

    def close(self) -> None:
        """Stop the thread (after what is queued)."""
        if self._thread is not None:
            self._q.put(_STOP)
            self._thread.join()
            self._thread = None
            _RUNNING.discard(self)

    # -- the thread -----------------------------------------------------------------------------
    def _run_guarded(self, fn: Callable[[], None], step: int | None) -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - kept for the training thread, never swallowed
            self._failure = (exc, step, [])
            try:
                self._on_failure(exc)
            except BaseException:  # noqa: BLE001 - the first failure is the one reported
                pass

    def _loop(self) -> None:
        c0 = time.thread_time()
        while True:
            self.cpu_s = time.thread_time() - c0
            due = self._due_in() if self._failure is None else None
            try:
                item = self._q.get(timeout=max(due, 0.0)) if due is not None else self._q.get()
            except queue.Empty:
                self._run_guarded(self._on_idle, None)
                continue
            if item is _STOP:
                self.cpu_s = time.thread_time() - c0
                return
            if isinstance(item, _Barrier):
                if item.run is not None and self._failure is None:
                    self._run_guarded(item.run, None)
                self.cpu_s = time.thread_time() - c0
                item.done.set()
                continue
            try:
                if self._failure is not None:
                    self._failure[2].append(self._step_of(item))
                else:
                    self._run_guarded(lambda: self._process(item), self._step_of(item))
            finally:
                self._release(item)


_RUNNING: "weakref.WeakSet[Pipeline]" = weakref.WeakSet()


@atexit.register
def _drain_at_exit() -> None:
    for p in list(_RUNNING):
        try:
            p.wait(p._on_idle)
            failure = p.take_failure()
            p.close()
        except Exception as exc:  # noqa: BLE001 - nothing to raise it to at exit
            failure = (exc, None, [])
        if failure is not None:
            warnings.warn(f"raybranch: {p.name} at exit: {type(failure[0]).__name__}: {failure[0]}", RuntimeWarning, stacklevel=1)


def describe_steps(steps: list[int]) -> str:
    """"step 5", "steps 5..9" (consecutive) or "steps 5, 7, 9"."""
    if len(steps) == 1:
        return f"step {steps[0]}"
    if steps == list(range(steps[0], steps[0] + len(steps))):
        return f"steps {steps[0]}..{steps[-1]}"
    return "steps " + ", ".join(map(str, steps))


def failure_error(exc: BaseException, step: int | None, where: str, lost: list[int], dropped: list[int]) -> BaseException:
    """The error a failure behind the training thread is raised as: ``exc``'s type, its message
    led by the step it hit (unless it names its steps already) and followed by the steps lost
    with it: ``lost`` (encoded before it, not committed), ``dropped`` (queued after it)."""
    msg = str(exc)
    if step is not None and not msg.startswith(("step ", "steps ")):
        msg = f"step {step} of {where} not saved: {msg}"
    if lost:
        msg += f"; {describe_steps(lost)}, saved before it, were not committed either"
    if dropped:
        msg += f"; {describe_steps(dropped)}, queued after it, were dropped"
    if msg == str(exc):
        return exc
    try:
        return type(exc)(msg)
    except Exception:  # noqa: BLE001 - a type that takes other arguments
        return RaybranchError(f"{type(exc).__name__}: {msg}")


__all__ = ["Pipeline", "describe_steps", "failure_error"]
