"""Case 3: a stale writer and a new one on the same branch (file:// and S3).

Per round (a fresh run): writer A, a Checkpointer in this process, saves a few steps; writer B, a
Checkpointer in another process (a writer of :mod:`.writer`, its own store client, seed 99 so its
data differ from A's), registers on the same branch; then A saves again and must be refused with
FencedError. Variants, in turn:

* ``acquire``:  B calls ``acquire()`` (a fence commit) and exits;
* ``save``:     B's first save (registers, then commits A's next step number with B's data);
* ``open-group``: A runs with flush_every=3 and has saves not yet committed when B registers;
  A's next save that commits, or its flush, must be refused;
* ``racing``:   A saves in a thread without pause while B registers; the first save A starts after
  B is registered must be refused (saves in flight at that moment may land before B's fence).

Checked: A's refusal is a FencedError (a round where B dies before its fence lands is
*inconclusive*: counted apart, and B's failure reported); every step committed before restores bit-identically
before and after, B's steps restore to B's data, verify is clean (epochs never go down). Also
recorded, not a target: whether A, retrying after the FencedError, takes the branch back (the
Checkpointer re-registers on its next save) and fences B in turn.
"""
from __future__ import annotations

import random
import threading
import time

from .common import Trainer, ckpt_kwargs, committed_steps, one_line, restore_all, store_recon_digests, verify_problems

VARIANTS = ("acquire", "save", "open-group", "racing")


def fence_round(i: int, rng: random.Random, uri: str, backend: str, spawner, env: dict) -> dict:
    from ...checkpoint.checkpointer import Checkpointer
    from ...errors import FencedError, RaybranchError
    from ...store.store import open_store

    variant = VARIANTS[i % len(VARIANTS)]
    run = f"fence-{backend}-{i:03d}"
    res = {"round": i, "backend": backend, "variant": variant, "run": run}
    store = open_store(uri)
    a = Checkpointer(store, run, **ckpt_kwargs(3, 3 if variant == "open-group" else 1))
    tr = Trainer()
    n = rng.randint(2, 6)
    for s in range(n):
        a.save(s, tr.advance_to(s).model, tr.opt)
    if variant != "open-group":
        a.flush()
    else:
        a.flush()
        a.save(n, tr.advance_to(n).model, tr.opt)  # open group: saved, not committed
        n += 1
    res["epoch_a"] = a.epoch
    before_steps = committed_steps(store, run)
    before, _ = restore_all(store, run, "main", before_steps)

    racing: dict = {}
    if variant == "racing":
        stop = threading.Event()

        def loop() -> None:
            s = n
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    a.save(s, tr.advance_to(s).model, tr.opt)
                    racing.setdefault("landed", []).append((s, t0))
                except RaybranchError as exc:
                    racing["refused"] = (s, t0, exc)
                    return
                s += 1
        th = threading.Thread(target=loop)
        th.start()
        time.sleep(rng.uniform(0.0, 0.2))

    b_args = {"uri": uri, "run": run, "seed": 99, "segment_size": 3, "flush_every": 1}
    if variant == "save":
        b_args.update(steps=rng.randint(1, 4))  # B saves from the step after the head
    else:
        b_args.update(acquire=True, steps=0)
    child = spawner.spawn(b_args, env)
    status = child.wait(120)
    b_done = time.monotonic()
    lines = child.lines()
    res["b_exit"] = status
    epochs = [int(line.split()[1]) for line in lines if line.startswith("epoch ")]
    res["epoch_b"] = epochs[0] if epochs else None
    b_saved = {int(w[1]): w[2] for w in (line.split() for line in lines) if w[0] == "saved"}
    if status != 0:
        res["error"] = f"writer B failed (exit {status}): {child.log_tail(5)} {[x for x in lines if x.startswith('error')]}"

    refused, err = False, None
    if status != 0 and not _fenced_above(store, run, res["epoch_a"]):
        # B died before its fence landed: nothing to refuse A for; the round says nothing about fencing
        res["inconclusive"] = "the new writer failed before registering"
        if variant == "racing":
            stop.set()
            th.join()
    elif variant == "racing":
        deadline = time.monotonic() + 60
        while "refused" not in racing and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()
        th.join()
        if "refused" in racing:
            s, t0, exc = racing["refused"]
            err = exc
        late = [s for s, t0 in racing.get("landed", []) if t0 > b_done]
        res["a_saves_started_after_b_and_landed"] = late
        res["a_saves_landed_while_b_registered"] = len(racing.get("landed", []))
    else:
        s = min(b_saved) if b_saved else n  # A's next step (in the "save" variant: the first B took)
        attempts = []
        for k in range(3):  # a stale writer that is not refused goes on: how far does it get?
            try:
                a.save(s + k, tr.advance_to(s + k).model, tr.opt)
                if a.flush_every > 1:
                    a.flush()
                attempts.append(f"step {s + k}: returned OK (epoch {a.epoch}, commit {a._writer.log.head_seq})")
            except RaybranchError as exc:
                if k == 0:
                    err = exc
                attempts.append(f"step {s + k}: {type(exc).__name__}")
                break
        res["a_attempts"] = attempts
        res["a_saves_accepted_while_stale"] = sum("returned OK" in x for x in attempts)
    refused = isinstance(err, FencedError)
    res["a_error"] = None if err is None else f"{type(err).__name__}: {one_line(err, 300)}"
    res["refused"] = None if res.get("inconclusive") else (refused and not res.get("a_saves_started_after_b_and_landed"))
    if variant != "racing" and err is None and not res.get("inconclusive"):
        res["a_error"] = "none: " + "; ".join(res["a_attempts"])

    after_steps = committed_steps(store, run)
    after, bad = restore_all(store, run, "main", after_steps)
    replaced = [s for s, d in before.items() if after.get(s) != d]
    b_wrong = []
    if b_saved:
        mine = store_recon_digests(store, run, "main", list(b_saved))
        b_wrong = [s for s, d in b_saved.items() if mine.get(s) != d]
    problems = verify_problems(store, run)
    res.update(steps_before=before_steps, steps_after=after_steps, replaced=replaced, b_steps_wrong=b_wrong,
               restore_errors=bad, verify_problems=problems,
               silent_overwrite=bool(replaced or b_wrong or set(before_steps) - set(after_steps)))

    # not a target: what a stale writer that retries after FencedError does
    if refused:
        nxt = (after_steps[-1] + 1) if after_steps else 0
        try:
            t2 = tr if tr.step <= nxt else Trainer()
            a.save(nxt, t2.advance_to(nxt).model, t2.opt)
            a.flush()
            res["retry_after_fenced"] = f"re-registered with epoch {a.epoch} and committed step {nxt}"
            res["retook_branch"] = True
        except RaybranchError as exc:
            res["retry_after_fenced"] = f"{type(exc).__name__}: {one_line(exc, 200)}"
            res["retook_branch"] = False
        res["verify_after_retry"] = verify_problems(store, run)
    return res


def _fenced_above(store, run: str, epoch: int) -> bool:
    """Whether the branch's head commit has an epoch above ``epoch`` (a newer writer's fence landed:
    after it, every commit of an older writer is refused, so the head can only carry newer ones)."""
    from ...ledger.branch import BranchLog
    from ...ledger.refs import live_branch_id

    return BranchLog(store, run, live_branch_id(store, run, "main")).open().head["epoch"] > epoch


def run(uri: str, backend: str, rounds: int, spawner, env: dict, seed: int = 3, log=print) -> dict:
    rng = random.Random(seed)
    out = []
    for i in range(rounds):
        t0 = time.monotonic()
        try:
            r = fence_round(i, rng, uri, backend, spawner, env)
        except Exception as exc:  # noqa: BLE001 - a round that cannot run is a failure, not a crash of the suite
            r = {"round": i, "backend": backend, "variant": VARIANTS[i % len(VARIANTS)], "refused": False,
                 "silent_overwrite": None, "error": f"{type(exc).__name__}: {one_line(exc)}"}
        out.append(r)
        log(f"  fence {backend} {i + 1:2d}/{rounds} {r['variant']:10s} epochs A={r.get('epoch_a')} B={r.get('epoch_b')} "
            f"refused={r['refused']} overwrite={r.get('silent_overwrite')} verify={len(r.get('verify_problems') or [])} "
            f"{time.monotonic() - t0:.1f}s A: {one_line(r.get('a_error') or '-', 150)}"
            + (f" ERROR {r['error']}" if r.get("error") else ""))
    return summarize(out, backend)


def summarize(rounds: list[dict], backend: str) -> dict:
    n = len(rounds)
    s = {
        "backend": backend, "rounds": n,
        "refused": sum(1 for r in rounds if r.get("refused")),
        "inconclusive": sum(1 for r in rounds if r.get("inconclusive")),
        "new_writer_failed": sum(1 for r in rounds if r.get("error") or r.get("inconclusive")),
        "silent_overwrites": sum(1 for r in rounds if r.get("silent_overwrite") is not False),
        "verify_not_clean": sum(1 for r in rounds if r.get("verify_problems")),
        "by_variant": {v: sum(1 for r in rounds if r["variant"] == v and r.get("refused")) for v in VARIANTS},
        "stale_retry_retook_branch": sum(1 for r in rounds if r.get("retook_branch")),
        "stale_saves_accepted": sum(r.get("a_saves_accepted_while_stale", 0) for r in rounds),
        "rounds_with_stale_saves_accepted": sum(1 for r in rounds if r.get("a_saves_accepted_while_stale")),
        "failures": [r for r in rounds if not r.get("refused") or r.get("silent_overwrite") is not False
                     or r.get("verify_problems") or r.get("error") or r.get("inconclusive")],
    }
    s["ok"] = n > 0 and s["refused"] == n - s["inconclusive"] and s["silent_overwrites"] == 0 and s["verify_not_clean"] == 0
    return s
