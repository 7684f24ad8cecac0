"""Case 5: the S3 server goes away for ``outage_s`` seconds while a writer saves.

A writer thread (a Checkpointer in this process, segment_size 3) saves one step every 50 ms on a
fresh bucket of a SeaweedFS server; after a few saves the server is taken down:

* ``sigstop``: SIGSTOP to its process group (it hangs: connections are accepted by the kernel,
  nothing answers), SIGCONT after ``outage_s``;
* ``restart``: ``SeaweedServer.pause()`` (SIGKILL, as a crash; connections refused), then
  ``resume()`` ``outage_s`` later (which blocks until S3 serves again, ~2-3 s more).

With ``retry_deadline`` longer than the outage the save in flight must block and then succeed;
with a shorter one it must raise StoreError within about ``retry_deadline`` (target: by
deadline + 3 s). Both: every step whose save returned is still committed and restores to what
the writer's encoder held, verify is clean, and the writer goes on after the outage. Printed:
how long the save was blocked, when the error came. A save that failed yet committed (its
request landed after the client gave up) is reported as ``failed_but_committed``.
"""
from __future__ import annotations

import os
import signal
import threading
import time

from .common import Trainer, ckpt_kwargs, committed_steps, one_line, store_recon_digests, verify_problems, with_query

SLACK_S = 3.0


def _down(server, mode: str) -> None:
    if mode == "sigstop":
        os.killpg(server.pid, signal.SIGSTOP)
    else:
        server.pause()


def _up(server, mode: str) -> None:
    if mode == "sigstop":
        os.killpg(server.pid, signal.SIGCONT)
    else:
        server.resume()


def outage_run(server, mode: str, deadline_s: float, outage_s: float, name: str, request_timeout: float | None = None,
               log=print) -> dict:
    from ...checkpoint.checkpointer import Checkpointer
    from ...errors import RaybranchError
    from ...store.store import open_store

    bucket = server.make_bucket(name)
    uri = with_query(server.store_uri(bucket, "ckpts"), retry_deadline=deadline_s, request_timeout=request_timeout)
    store = open_store(uri)
    ck = Checkpointer(store, "outage", **ckpt_kwargs(3, 1))
    tr = Trainer()
    saves: list[dict] = []
    digests: dict[int, str] = {}
    stop = threading.Event()
    from .common import writer_recon_digest

    def writer() -> None:
        step = 0
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                ck.save(step, tr.advance_to(step).model, tr.opt)
                digests[step] = writer_recon_digest(ck)
                saves.append({"step": step, "t0": t0, "t1": time.monotonic(), "ok": True})
            except RaybranchError as exc:
                saves.append({"step": step, "t0": t0, "t1": time.monotonic(), "ok": False,
                              "error": f"{type(exc).__name__}: {exc}"})
            step += 1
            time.sleep(0.05)

    th = threading.Thread(target=writer, name="outage-writer")
    th.start()
    res = {"mode": mode, "retry_deadline_s": deadline_s, "request_timeout_s": request_timeout, "outage_s": outage_s}
    try:
        t_wait = time.monotonic() + 60
        while len(saves) < 5 and time.monotonic() < t_wait:
            time.sleep(0.01)
        down_at = time.monotonic()
        _down(server, mode)
        time.sleep(outage_s)
        restart_at = time.monotonic()
        _up(server, mode)
        up_at = time.monotonic()
        n_up = len(saves)
        t_wait = time.monotonic() + max(60.0, 3 * deadline_s)
        while time.monotonic() < t_wait and sum(1 for s in saves[n_up:] if s["ok"] and s["t0"] > up_at) < 5:
            time.sleep(0.02)
    finally:
        stop.set()
        th.join()
        try:  # the server must be up for what follows even if this run broke
            if mode == "sigstop":
                os.killpg(server.pid, signal.SIGCONT)
            elif not server.running:
                server.resume()
        except Exception:  # noqa: BLE001
            pass
    res["down_s"] = round(up_at - down_at, 2)
    if mode == "restart":
        res["restart_took_s"] = round(up_at - restart_at, 2)
    hit = [s for s in saves if s["t1"] > down_at and s["t0"] < up_at]  # saves that overlapped the outage
    first = hit[0] if hit else None
    res["saves"] = len(saves)
    res["saves_during_outage"] = len(hit)
    res["blocked_s"] = round(first["t1"] - max(first["t0"], down_at), 2) if first else None
    res["first_save_in_outage"] = None if first is None else ("ok" if first["ok"] else one_line(first["error"], 300))
    failed = [s for s in saves if not s["ok"]]
    res["failed_saves"] = len(failed)
    res["error_after_s"] = round(failed[0]["t1"] - max(failed[0]["t0"], down_at), 2) if failed else None
    res["error_one_line"] = all("\n" not in s["error"] for s in failed)
    res["error_types"] = sorted({s["error"].split(":", 1)[0] for s in failed})
    res["recovered_saves"] = sum(1 for s in saves if s["ok"] and s["t0"] > up_at)

    st2 = open_store(uri)
    have = committed_steps(st2, "outage")
    ok_steps = [s["step"] for s in saves if s["ok"]]
    res["lost"] = [s for s in ok_steps if s not in have]
    res["failed_but_committed"] = [s["step"] for s in failed if s["step"] in have]
    got = store_recon_digests(st2, "outage", "main", ok_steps)
    res["restore_wrong_or_failed"] = [s for s in ok_steps if got.get(s) != digests.get(s)]
    res["verify_problems"] = verify_problems(st2, "outage")
    if deadline_s > outage_s + (5 if mode == "restart" else 0):
        res["expect"] = "blocks, then succeeds"
        met = not failed and first is not None and first["ok"]
    else:
        res["expect"] = f"StoreError within ~{deadline_s:g} s (≤ {deadline_s + SLACK_S:g} s)"
        met = bool(failed) and res["error_types"] == ["StoreError"] and res["error_after_s"] <= deadline_s + SLACK_S \
            and res["error_one_line"]
    res["ok"] = bool(met and not res["lost"] and not res["restore_wrong_or_failed"] and not res["verify_problems"]
                     and res["recovered_saves"] >= 1)
    log(f"  outage {mode:7s} {outage_s:g}s deadline={deadline_s:g}s"
        + (f" request_timeout={request_timeout:g}s" if request_timeout else "")
        + f": S3 down {res['down_s']:.1f} s; first save in the outage blocked {res['blocked_s']} s → "
        f"{res['first_save_in_outage'] if res['first_save_in_outage'] == 'ok' else 'error'}"
        + (f"; error after {res['error_after_s']} s ({', '.join(res['error_types'])})" if failed else "")
        + f"; lost={len(res['lost'])} verify={len(res['verify_problems'])} recovered={res['recovered_saves']}"
        + f" [{res['expect']}: {'met' if res['ok'] else 'MISSED'}]"
        + (f" {one_line(failed[0]['error'], 200)}" if failed else ""))
    return res


PLANS = [  # (mode, deadline as a multiple of the outage or a fixed value, request_timeout)
    ("sigstop", "long", None),
    ("sigstop", "short", None),
    ("sigstop", "short", "quarter"),  # request_timeout = deadline / 4
    ("restart", "long", None),
    ("restart", "short", None),
]


def run(server, outage_s: float = 10.0, plans=PLANS, log=print, tag: str = "") -> dict:
    out = []
    for i, (mode, length, rt) in enumerate(plans):
        deadline = 60.0 if length == "long" else max(1.0, round(outage_s * 0.4, 1))
        if rt == "quarter":
            rt = round(max(0.2, deadline / 4), 2)
        out.append(outage_run(server, mode, deadline, outage_s, f"outage{tag}-{i}-{os.getpid()}", rt, log))
    s = {"runs": out, "ok": bool(out) and all(r["ok"] for r in out)}
    return s
