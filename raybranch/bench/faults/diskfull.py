"""Case 4: disk full — a writer under a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored, so a
write past the limit fails with EFBIG as on a full disk).

A history is written first (this process, no limit): run "full", segment_size 3, 7 steps. Then
for each limit a fresh interpreter (``python -m raybranch.bench.faults.writer run``, its events on a
pipe) (``preexec_fn``: ``setrlimit(RLIMIT_FSIZE, (L, L))`` and
``SIG_IGN`` for SIGXFSZ) opens a Checkpointer on the branch (a registration: a fence commit)
and saves the next steps until a save fails. The limits are chosen from the sizes of the store's
objects, so that the first write to fail is, in turn: the registration's fence commit record, a
per-commit blob, and a compaction's segment blob (in the save that completes a page: after its
commit).

Checked per limit: the failing save raises one StoreError (one line, naming the object and "no
space left"; a compaction that fails after its commit is only a warning, the save stands); every step committed before still restores to what it restored to before the
limit; verify is clean; and with the limit gone a new writer saves the next step (and finishes the seals left
over). Recorded: the object that failed, the warnings, and whether a step an error calls "not
committed" is in fact committed.
"""
from __future__ import annotations

import os
import shutil

from .common import Trainer, ckpt_kwargs, committed_steps, kind_of, one_line, restore_all, verify_problems
from .spawn import DirectSpawner

RUN = "full"


def object_sizes(store) -> dict[str, int]:
    """Largest object of each kind in the run (segment blobs and per-commit blobs apart)."""
    out: dict[str, int] = {}
    for i in store.list(RUN, recursive=True):
        out[kind_of(i.rel)] = max(out.get(kind_of(i.rel), 0), i.size)
    return out


def run(workdir: str, limits: list[int] | None = None, log=print, spawner=None) -> dict:
    """``spawner``: None = a fresh interpreter per limit (RLIMIT_FSIZE set by preexec_fn), or a
    :class:`~.spawn.ForkServer` (the limit set in the forked writer; faster)."""
    from ...checkpoint.checkpointer import Checkpointer
    from ...store.store import open_store

    root = os.path.join(workdir, "diskfull")
    shutil.rmtree(root, ignore_errors=True)
    uri = "file://" + os.path.join(root, "store")
    store = open_store(uri)
    tr = Trainer()
    ck = Checkpointer(store, RUN, **ckpt_kwargs(3, 1))
    per_commit = []
    for s in range(7):
        ck.save(s, tr.advance_to(s).model, tr.opt)
        per_commit.append(ck._writer.log.head["parts"][0]["blob"][1])
    ck.close()
    sizes = object_sizes(store)
    delta_blob = max(per_commit[1:])
    if limits is None:
        # in turn the first write to fail is: the registration's fence commit record, the first
        # per-commit blob, the segment blob of the first compaction (deltas fit, a page does not)
        limits = [256, min(per_commit[1:]) // 2, int(delta_blob * 1.3)]
    own = spawner is None
    spawner = DirectSpawner(root) if own else spawner
    out = []
    try:
        for lim in limits:
            out.append(one_limit(uri, lim, spawner, log))
    finally:
        if own:
            spawner.close()
    s = {"sizes": {"commit_record": sizes["commit"], "per_commit_blob": delta_blob, "largest_blob": sizes["blob"]},
         "limits": out}
    s["ok"] = bool(out) and all(r["ok"] for r in out)
    return s


def one_limit(uri: str, lim: int, spawner, log) -> dict:
    from ...checkpoint.checkpointer import Checkpointer
    from ...store.store import open_store

    store = open_store(uri)
    steps = committed_steps(store, RUN)
    before, _ = restore_all(store, RUN, "main", steps)
    child = spawner.spawn({"uri": uri, "run": RUN, "segment_size": 3, "flush_every": 1, "steps": 12}, fsize=lim)
    status = child.wait(180)
    lines = child.lines()
    errors = [line.split(" ", 2) for line in lines if line.startswith("error ")]
    saved = [int(line.split()[1]) for line in lines if line.startswith("saved ")]
    warned = [line.split(" ", 2)[2] for line in lines if line.startswith("warning ")]
    r = {"limit": lim, "exit": status, "saves_ok_under_limit": len(saved), "warnings": len(warned),
         "first_warning": warned[0] if warned else None}
    if errors:
        _, etype, msg = errors[0] + [""] * (3 - len(errors[0]))
        r["error_type"], r["error"] = etype, msg
        r["one_line"] = "\\n" not in msg and "\n" not in msg
        failed = [w for w in msg.replace(":", " ").split() if "/" in w and kind_of(w) != "other"]
        r["failed_object"] = kind_of(failed[0]) if failed else "?"
        r["says_no_space"] = "no space left" in msg
        nxt = (saved[-1] + 1) if saved else (steps[-1] + 1 if steps else 0)
        now = committed_steps(store, RUN)
        r["failed_step"] = nxt
        r["failed_step_committed_anyway"] = nxt in now and "not committed" in msg
    else:
        r.update(error_type=None, error=f"no error in {len(saved)} saves; log: {child.log_tail(3)}")
    now = committed_steps(store, RUN)
    after, bad = restore_all(store, RUN, "main", now)
    r["lost"] = [s for s in steps if s not in after]
    r["changed"] = [s for s in steps if s in after and after[s] != before[s]]
    r["restore_errors"] = bad
    r["verify_problems"] = verify_problems(store, RUN)
    # the space comes back: a new writer goes on
    try:
        nxt = now[-1] + 1
        ck = Checkpointer(store, RUN, **ckpt_kwargs(3, 1))
        tr = Trainer().advance_to(nxt)
        ck.save(nxt, tr.model, tr.opt)
        ck.close()
        r["resumed_after"] = nxt in committed_steps(store, RUN) and not verify_problems(store, RUN)
        log_ = ck._writer.log
        r["unsealed_full_pages_after_resume"] = max(0, (log_.head_seq - log_.sealed_through) // log_.page_size)
    except Exception as exc:  # noqa: BLE001
        r["resumed_after"] = False
        r["resume_error"] = f"{type(exc).__name__}: {one_line(exc)}"
    r["ok"] = bool(r["error_type"] == "StoreError" and r.get("one_line") and r.get("says_no_space") and not r["lost"]
                   and not r["changed"] and not bad and not r["verify_problems"] and r["resumed_after"])
    log(f"  disk full: limit {lim:7d} B → {r['saves_ok_under_limit']} saves ok, then {r['error_type']} on a "
        f"{r.get('failed_object', '?')} write{' (the step IS committed)' if r.get('failed_step_committed_anyway') else ''}"
        f"{f' ({len(warned)} warnings: sealing failed after the commit)' if warned else ''}; "
        f"lost={len(r['lost'])} verify={len(r['verify_problems'])} resumed={r['resumed_after']}: {one_line(r['error'], 220)}")
    return r
