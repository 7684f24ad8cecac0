"""Case 1: SIGKILL a writer at a random point of a commit or of a page seal / compaction.

Each round is a fresh run (branch "main") on a file:// or S3 store. A writer process saves the
:class:`Trainer`'s steps (segment_size 2-3, so a page is sealed and compacted every 2-3 commits;
flush_every 1-3) and is SIGKILLed either

* ``delay``: by this process, a random 0..``max_delay_s`` after it reported ready, or
* ``op``: by itself, right before or right after its k-th store mutation (k and before/after drawn
  from every mutation point of a 7-step run on that back end, without repeats until all were
  used).

``uris`` may list a store more than once to weight it (the suite passes file, file, file, s3).

Then, counted: verify's problems for the run (must be none), every step the log shows must
restore, twice bit-identically, to the uninterrupted reference and to what the killed writer's
encoder held (its ``saved`` events); a new Checkpointer must resume: its next save succeeds and
restores to the reference, and verify is still clean. Reported too (not targets): what the kill
left behind that readers ignore, and a gc pass (grace 0) after the resume: verify still clean,
restores unchanged, leftovers gone?
"""
from __future__ import annotations

import os
import random
import shutil
import time

from .common import (
    Reference, Trainer, ckpt_kwargs, committed_steps, kind_of, local_tmp_files, one_line, restore_all,
    store_recon_digests, verify_problems,
)

OP_STEPS = 7  # steps of a writer killed at a store operation


def count_ops(spawner, workdir: str, uri: str, env: dict, segment_size: int, flush_every: int,
              steps: int = OP_STEPS) -> list[tuple]:
    """Every mutation (phase, op, kind) a writer makes saving ``steps`` steps into a new run on
    ``uri``'s back end (one writer process, not killed). On a file:// URI a fresh directory is
    used; the sequence differs between back ends (e.g. a local CAS is a write under a lock)."""
    tag = f"calib-{segment_size}-{flush_every}"
    if uri.startswith("file://"):
        d = os.path.join(workdir, tag)
        shutil.rmtree(d, ignore_errors=True)
        uri = "file://" + d
    child = spawner.spawn({"uri": uri, "run": tag, "segment_size": segment_size, "flush_every": flush_every,
                           "steps": steps, "start": 0}, env)
    if child.wait(120) != 0:
        raise RuntimeError(f"calibration writer failed: {child.log_tail()}")
    return [tuple(line.split()[2:5]) for line in child.lines() if line.startswith("b ")]


def where_killed(lines: list[str]) -> str:
    """The phase and store operation in flight (or the last one done) when the writer died."""
    last_b, open_op = None, False
    for line in lines:
        w = line.split()
        if w[0] == "b":
            last_b, open_op = w, True
        elif w[0] == "a":
            open_op = False
    if last_b is None:
        return "before any store write"
    phase, op, kind = last_b[2:5]
    return f"{phase}: {'in' if open_op else 'after'} {op} {kind}"


def saved_digests(lines: list[str]) -> dict[int, str]:
    out = {}
    for line in lines:
        w = line.split()
        if w[0] == "saved":
            out[int(w[1])] = w[2]
    return out


def leftovers(store, run: str) -> dict:
    """What the kill left behind that readers ignore (informational)."""
    from ...ledger.records import parse_page_key, seq_of_commit_key

    objs = store.list(run, recursive=True)
    pages = [parse_page_key(i.rel) for i in objs if kind_of(i.rel) == "page"]
    sealed = {s for p in pages if p for s in range(p[0], p[1] + 1)}
    commits = [seq_of_commit_key(i.rel) for i in objs if kind_of(i.rel) == "commit"]
    out = {"commit records a page also holds": sum(1 for s in commits if s in sealed)}
    if store.loc.is_local:
        tmp = local_tmp_files(os.path.join(store.root, run))
        out["tmp files"] = len(tmp)
        out["tmp bytes"] = sum(os.path.getsize(p) for p in tmp)
    return out


def _gc_check(store, run: str, steps: list[int], want: dict[int, str]) -> dict:
    """gc with no grace period once the writers are gone: what the kill left must go, and
    nothing committed may change (not a target; reported)."""
    from ...ledger.gc import collect

    try:
        rep = collect(store, run, grace_s=0.0)
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "error": f"{type(exc).__name__}: {one_line(exc)}"}
    got, bad = restore_all(store, run, "main", steps)
    problems = verify_problems(store, run)
    out = {"deleted": dict(rep.deleted), "problems": problems, "restore_errors": bad,
           "changed": [s for s in steps if got.get(s) != want.get(s)], "leftovers": leftovers(store, run)}
    out["ok"] = not problems and not bad and not out["changed"]
    return out


def kill_round(i: int, rng: random.Random, uri: str, spawner, ref: Reference, env: dict, mode: str, cfg: dict,
               kill_at=None, max_delay_s: float = 1.0) -> dict:
    from ...checkpoint.checkpointer import Checkpointer
    from ...store.store import open_store

    run = f"kill{i:03d}"
    args = {"uri": uri, "run": run, **cfg, "start": 0}
    if mode == "op":
        args.update(kill_at=list(kill_at), steps=OP_STEPS)
    else:
        args.update(steps=ref.steps - 2)
    t0 = time.monotonic()
    child = spawner.spawn(args, env)
    res = {"round": i, "uri": uri.split("?")[0], "run": run, "mode": mode, **cfg, "kill_at": kill_at}
    if not child.wait_for("ready", 120):
        res.update(error=f"writer never got ready: {child.log_tail()}")
        return res
    if mode == "delay":
        delay = rng.uniform(0.0, max_delay_s)
        time.sleep(delay)
        child.kill()
        res["delay_s"] = round(delay, 3)
    status = child.wait(120)
    lines = child.lines()
    res["killed"] = status == -9
    res["exit"] = status
    res["at"] = where_killed(lines) if status == -9 else "not killed (finished)"
    said = saved_digests(lines)
    res["saved_by_writer"] = len(said)

    store = open_store(uri)
    problems = verify_problems(store, run)
    steps = committed_steps(store, run)
    res["committed"] = len(steps)
    res["leftovers"] = leftovers(store, run)
    first, bad1 = restore_all(store, run, "main", steps)
    second, bad2 = restore_all(store, run, "main", steps)
    wrong_ref = [s for s, d in first.items() if ref.restored.get(s) != d]
    unstable = [s for s in first if second.get(s) != first[s]]
    mine = store_recon_digests(store, run, "main", [s for s in steps if s in said]) if steps else {}
    wrong_writer = [s for s in steps if s in said and mine.get(s) != said[s]]
    partial = bool(problems or bad1 or bad2 or wrong_ref or unstable or wrong_writer or steps != list(range(len(steps))))
    res.update(verify_problems=problems, restore_errors=bad1 or bad2, wrong_vs_reference=wrong_ref,
               unstable_restores=unstable, wrong_vs_writer=wrong_writer, partial=partial,
               steps_not_contiguous=steps != list(range(len(steps))))

    # resume: a new writer continues after the last commit
    nxt = steps[-1] + 1 if steps else 0
    try:
        ck = Checkpointer(store, run, **ckpt_kwargs(cfg["segment_size"], cfg["flush_every"]))
        tr = Trainer().advance_to(nxt)
        ck.save(nxt, tr.model, tr.opt)
        ck.close()
        after = committed_steps(store, run)
        got, bad = restore_all(store, run, "main", after)
        problems2 = verify_problems(store, run)
        resumed = (after == steps + [nxt] and not bad and got.get(nxt) == ref.restored.get(nxt)
                   and all(got[s] == first.get(s) for s in steps) and not problems2)
        res.update(resumed=resumed, resume_problems=problems2, resume_restore_errors=bad,
                   resume_steps_ok=after == steps + [nxt])
        res["gc"] = _gc_check(store, run, after, got)
    except Exception as exc:  # noqa: BLE001
        res.update(resumed=False, resume_error=f"{type(exc).__name__}: {one_line(exc)}")
    res["secs"] = round(time.monotonic() - t0, 2)
    return res


def run(uris: list[str], rounds: int, spawner, workdir: str, env: dict, seed: int = 1, log=print,
        max_delay_s: float = 1.0, ref: Reference | None = None) -> dict:
    rng = random.Random(seed)
    ref = ref or Reference(workdir, 120)
    configs = [{"segment_size": s, "flush_every": f} for s in (2, 3) for f in (1, 2, 3)]
    points: dict[tuple, list] = {}
    for bi, uri in enumerate(uris):
        if any(uris[j].split("?")[0] == uri.split("?")[0] for j in range(bi)):
            continue  # the same store listed twice (a weight): calibrated once
        for cfg in configs:
            ops = count_ops(spawner, workdir, uri, env, cfg["segment_size"], cfg["flush_every"])
            pts = [(k, w) for k in range(1, len(ops) + 1) for w in ("before", "after")]
            rng.shuffle(pts)
            points[(uri.split("?")[0], cfg["segment_size"], cfg["flush_every"])] = [pts, ops]
    combos = [(c, m, b) for c in range(len(configs)) for m in ("delay", "op") for b in range(len(uris))]
    rng.shuffle(combos)
    out = []
    used: dict[tuple, int] = {}
    for i in range(rounds):
        ci, mode, bi = combos[i % len(combos)]
        cfg, uri = configs[ci], uris[bi]
        kill_at = None
        if mode == "op":
            key = (uri.split("?")[0], cfg["segment_size"], cfg["flush_every"])
            pts = points[key][0]
            kill_at = pts[used.get(key, 0) % len(pts)]
            used[key] = used.get(key, 0) + 1
        r = kill_round(i, rng, uri, spawner, ref, env, mode, cfg, kill_at, max_delay_s)
        out.append(r)
        flag = "PARTIAL" if r.get("partial") else ("NOT RESUMED" if not r.get("resumed") else "ok")
        log(f"  kill {i + 1:3d}/{rounds} {r['uri'][:4]} seg={cfg['segment_size']} flush={cfg['flush_every']} {mode:5s} "
            f"at [{r.get('at', '?')}] committed={r.get('committed', '?')} {r.get('secs', 0):.1f}s → {flag}"
            + (f" {one_line(r.get('verify_problems') or r.get('restore_errors') or r.get('resume_error') or r.get('error'), 200)}" if flag != "ok" else ""))
    return summarize(out)


def summarize(rounds: list[dict]) -> dict:
    n = len(rounds)
    by_phase: dict[str, int] = {}
    for r in rounds:
        p = r.get("at", "?").split(":")[0]
        by_phase[p] = by_phase.get(p, 0) + 1
    left: dict[str, int] = {}
    for r in rounds:
        for k, v in (r.get("leftovers") or {}).items():
            if k != "tmp bytes":
                left[k] = left.get(k, 0) + (1 if v else 0)
    left["tmp bytes (all rounds)"] = sum((r.get("leftovers") or {}).get("tmp bytes", 0) for r in rounds)
    s = {
        "rounds": n,
        "killed": sum(1 for r in rounds if r.get("killed")),
        "kill_phase": dict(sorted(by_phase.items())),
        "by_backend": {b: sum(1 for r in rounds if r["uri"].startswith(b)) for b in ("file", "s3")},
        "partial": sum(1 for r in rounds if r.get("partial", True)),
        "verify_not_clean": sum(1 for r in rounds if r.get("verify_problems")),
        "restore_failed": sum(1 for r in rounds if r.get("restore_errors")),
        "wrong_vs_reference": sum(1 for r in rounds if r.get("wrong_vs_reference")),
        "wrong_vs_writer": sum(1 for r in rounds if r.get("wrong_vs_writer")),
        "unstable_restore": sum(1 for r in rounds if r.get("unstable_restores")),
        "resumed": sum(1 for r in rounds if r.get("resumed")),
        "committed_steps_total": sum(r.get("committed", 0) for r in rounds),
        "rounds_with_leftovers": left,
        "gc_after_resume_ok": sum(1 for r in rounds if (r.get("gc") or {}).get("ok")),
        "tmp_files_after_gc": sum(((r.get("gc") or {}).get("leftovers") or {}).get("tmp files", 0) for r in rounds),
        "gc_failures": [{"round": r["round"], "run": r["run"], **r["gc"]} for r in rounds if r.get("gc") and not r["gc"]["ok"]],
        "failures": [r for r in rounds if r.get("partial", True) or not r.get("resumed")],
    }
    s["ok"] = s["partial"] == 0 and s["resumed"] == n and n > 0
    return s
