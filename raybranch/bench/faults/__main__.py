"""The fault suite of the format-v2 store: kills, bit flips, stale writers, disk full, S3 outage.

    python -m raybranch.bench.faults [--count N | --quick] [--cases 1,2,3,4,5] [--json]

Cases and full counts (``--count N`` sets N kills and N flips and N/5 stale-writer rounds per
back end; ``--quick``: 8 kills, 16 flips, 2 rounds per back end, a 3 s outage):

1. SIGKILL of a writer at random points of a commit and of a page seal / compaction ×100
   (:mod:`.kills`; 1 in 4 rounds on S3). Target: 0 visible partial commits, 100 % resumed.
2. One random bit flipped in an object of each kind ×100 (:mod:`.flips`). Target: 100 %
   detected by verify, 0 silent wrong restores.
3. A stale writer and a new one ×20 on file:// and ×20 on S3 (:mod:`.fencing`). Target: the
   stale writer refused (FencedError) 20/20 per back end, 0 silent overwrites.
4. Disk full: a writer under RLIMIT_FSIZE (:mod:`.diskfull`). Target: one-line StoreError,
   every earlier commit restores and verifies.
5. The S3 server down (SIGSTOP, and SIGKILL + restart) for 10 s (:mod:`.outage`), retry_deadline
   longer and shorter than the outage. Target: blocks then succeeds / StoreError within about
   the deadline; nothing committed lost.

A SeaweedFS server (:class:`~raybranch.testing.seaweed.SeaweedServer`, its own temporary data
dir) is the S3 back end. Writers are real processes, forked from a server process that has
imported torch once (``--no-forkserver``: a fresh interpreter each). Exit status 1 when any
target is missed; the detail of every miss is printed (and in the JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

CASES = {1: "kills", 2: "flips", 3: "fencing", 4: "diskfull", 5: "outage"}


def _pct(a: int, b: int) -> str:
    return f"{a}/{b} ({100.0 * a / b:.0f} %)" if b else "0/0"


def report_kills(s: dict, say) -> None:
    say(f"== 1. SIGKILL during commits and page seals: {s['rounds']} kills "
        f"({s['by_backend']['file']} file://, {s['by_backend']['s3']} s3://)")
    say(f"   killed: {s['killed']}/{s['rounds']}; landed in: " + ", ".join(f"{k} {v}" for k, v in s["kill_phase"].items()))
    say(f"   visible partial commits: {s['partial']} (rounds with verify problems {s['verify_not_clean']}, restore failed "
        f"{s['restore_failed']}, wrong vs uninterrupted run {s['wrong_vs_reference']}, wrong vs killed writer's "
        f"reconstruction {s['wrong_vs_writer']}, second restore differs {s['unstable_restore']})")
    say(f"   resumed: {_pct(s['resumed'], s['rounds'])}; committed steps restored and compared: {s['committed_steps_total']}")
    say("   left behind, ignored by readers: " + ", ".join(f"{k} in {v} rounds" if "bytes" not in k else f"{k} {v}"
                                                         for k, v in s["rounds_with_leftovers"].items()))
    say(f"   (not a target) gc after the resume (grace 0): clean and unchanged in {s['gc_after_resume_ok']}/{s['rounds']}; "
        f"tmp files still there after gc: {s['tmp_files_after_gc']}")
    for g in s["gc_failures"][:5]:
        say(f"   NOTE gc round {g['round']} run {g['run']}: {json.dumps({k: g.get(k) for k in ('error', 'problems', 'restore_errors', 'changed') if g.get(k)})[:400]}")
    for r in s["failures"][:10]:
        say(f"   MISS round {r['round']} {r['uri']} run {r['run']} {r.get('mode')} kill_at={r.get('kill_at') or r.get('delay_s')} "
            f"seg={r.get('segment_size')} flush={r.get('flush_every')} at [{r.get('at')}]: {json.dumps({k: r.get(k) for k in ('verify_problems', 'restore_errors', 'wrong_vs_reference', 'wrong_vs_writer', 'resume_error', 'resume_problems', 'error') if r.get(k)})[:600]}")


def report_flips(s: dict, say) -> None:
    say(f"== 2. Bit flips: {s['flips']} flips; detected by verify {_pct(s['detected'], s['flips'])}, problem names the "
        f"object {s['named']}, CLI exit 1 {s['cli_exit_1']}; silent wrong restores {s['silent_wrong_restores']} "
        f"(in {s['flips_with_silent_wrong_restore']} flips), restores crashing with a non-raybranch error {s['restore_crashes']}")
    say(f"   {'kind':7s} {'flips':>5s} {'detect':>6s} {'named':>5s} {'cli=1':>5s} {'same':>4s}  restores: {'identical':>9s} {'error':>6s} {'WRONG':>5s} {'crash':>5s}")
    for k, v in s["per_kind"].items():
        say(f"   {k:7s} {v['flips']:5d} {v['detected']:6d} {v['named']:5d} {v['cli_exit_1']:5d} {v['undetected_same_content']:4d}"
            f"            {v['restores_identical']:9d} {v['restores_error']:6d} {v['restores_silently_wrong']:5d} {v['restores_crashed']:5d}")
    for r in s["misses"][:10]:
        say(f"   MISS {r['kind']} {r['object']} bit {r['bit']}: detected={r['detected']} cli={r['cli_exit']} "
            f"restores={r['restores']} same_content={r.get('same_content')} {r.get('examples')} {r.get('verify_crashed') or ''}")


def report_fencing(rs: list[dict], say) -> None:
    for s in rs:
        say(f"== 3. Stale writer vs new writer on {s['backend']}: {s['rounds']} rounds; refused with FencedError "
            f"{_pct(s['refused'], s['rounds'] - s['inconclusive'])} (by variant: {s['by_variant']}); silent overwrites "
            f"{s['silent_overwrites']}; verify not clean {s['verify_not_clean']}; the new writer failed in "
            f"{s['new_writer_failed']} rounds ({s['inconclusive']} before its fence landed: inconclusive)")
        say(f"   stale saves that returned OK although a newer writer held the branch: {s['stale_saves_accepted']} "
            f"in {s['rounds_with_stale_saves_accepted']} rounds (each is a save the caller believes committed)")
        say(f"   (not a target) the stale writer, retrying its save after FencedError, re-registered and took the branch "
            f"back in {s['stale_retry_retook_branch']}/{s['refused']} refused rounds")
        for r in s["failures"][:10]:
            tag = "MISS" if not r.get("refused") and not r.get("inconclusive") or r.get("silent_overwrite") is not False \
                or r.get("verify_problems") else "NOTE"
            say(f"   {tag} round {r['round']} {r['variant']} run {r.get('run')}: epochs A={r.get('epoch_a')} B={r.get('epoch_b')}; "
                f"A: {r.get('a_error')}; steps before {r.get('steps_before')} after {r.get('steps_after')}"
                + (f"; replaced {r['replaced']}" if r.get("replaced") else "") + (f"; ERROR {r['error']}" if r.get("error") else ""))


def report_diskfull(s: dict, say) -> None:
    say(f"== 4. Disk full (RLIMIT_FSIZE): object sizes {s['sizes']}")
    for r in s["limits"]:
        say(f"   limit {r['limit']:6d} B: {r['saves_ok_under_limit']} saves ok, {r['warnings']} warnings, then "
            f"{r['error_type']} ({'one line' if r.get('one_line') else 'MULTI-LINE'}) writing a {r.get('failed_object')}; "
            f"earlier commits lost {len(r['lost'])}, changed {len(r['changed'])}, restore errors {len(r['restore_errors'])}, "
            f"verify problems {len(r['verify_problems'])}; new writer after: {'ok' if r['resumed_after'] else 'FAILED'}"
            f" → {'met' if r['ok'] else 'MISSED'}")
        say(f"      error: {r['error']}")
        if r.get("first_warning"):
            say(f"      warning: {r['first_warning'][:300]}")


def report_outage(s: dict, say) -> None:
    say("== 5. S3 server down while a writer saves")
    for r in s["runs"]:
        say(f"   {r['mode']:7s} outage {r['outage_s']:g} s (S3 down {r['down_s']} s), retry_deadline {r['retry_deadline_s']:g} s"
            + (f", request_timeout {r['request_timeout_s']:g} s" if r.get("request_timeout_s") else "")
            + f": first save in the outage blocked {r['blocked_s']} s → {'ok' if r['first_save_in_outage'] == 'ok' else 'StoreError'}"
            + (f" after {r['error_after_s']} s" if r["error_after_s"] is not None else "")
            + f"; lost {len(r['lost'])}, failed-but-committed {len(r['failed_but_committed'])}, restore wrong "
            f"{len(r['restore_wrong_or_failed'])}, verify problems {len(r['verify_problems'])}, saves after {r['recovered_saves']}"
            f" [expect {r['expect']}: {'met' if r['ok'] else 'MISSED'}]")
        if r["first_save_in_outage"] not in ("ok", None):
            say(f"      error: {r['first_save_in_outage'][:300]}")


def _code_version() -> str:
    """The git commit of the code under test, and whether the core (store, ledger, checkpoint)
    has uncommitted changes: the figures belong to that code."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "../../store", "../../ledger", "../../checkpoint"],
                               cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head or 'unknown'}{' + uncommitted core changes' if dirty else ''}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m raybranch.bench.faults", description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=100, help="kills and flips; stale-writer rounds are count/5 per back end")
    p.add_argument("--quick", action="store_true", help="small counts: 8 kills, 16 flips, 2 rounds per back end, 3 s outage")
    p.add_argument("--cases", default="1,2,3,4,5", help="which cases, e.g. 1,3")
    p.add_argument("--outage-s", type=float, default=None, help="S3 outage length (default 10, --quick 3)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON document (the text report goes to stderr)")
    p.add_argument("--workdir", default=None, help="keep stores and logs here (default: a temporary dir, removed)")
    p.add_argument("--no-forkserver", action="store_true", help="a fresh interpreter per writer (slow)")
    a = p.parse_args(argv)
    kills_n, flips_n = (8, 16) if a.quick else (a.count, a.count)
    fence_n = 2 if a.quick else max(1, a.count // 5)
    outage_s = a.outage_s if a.outage_s is not None else (3.0 if a.quick else 10.0)
    cases = sorted({int(c) for c in a.cases.split(",") if c.strip()})
    out_stream = sys.stderr if a.json else sys.stdout

    def say(msg: str) -> None:
        print(msg, file=out_stream, flush=True)

    from ...testing.seaweed import SeaweedServer
    from . import common, diskfull, fencing, flips, kills, outage, spawn

    workdir = a.workdir or tempfile.mkdtemp(prefix="rb-faults-")
    os.makedirs(workdir, exist_ok=True)
    results: dict = {"argv": sys.argv[1:] if argv is None else argv, "counts": {"kills": kills_n, "flips": flips_n,
                     "fence_rounds_per_backend": fence_n, "outage_s": outage_s}}
    results["code"] = _code_version()
    say(f"raybranch code: {results['code']}")
    server = spawner = None
    t_all = time.monotonic()
    try:
        if {1, 3, 5} & set(cases):
            server = SeaweedServer(os.path.join(workdir, "seaweed")).start()
            common.set_s3_env(server)
        env = common.s3_env(server) if server else {}
        if {1, 3} & set(cases):
            spawner = spawn.DirectSpawner(workdir) if a.no_forkserver else spawn.ForkServer(workdir)
        for c in cases:
            t0 = time.monotonic()
            say(f"-- case {c} ({CASES[c]}) …")
            if c == 1:
                f_uri = "file://" + os.path.join(workdir, "kills")
                s3_uri = server.store_uri(server.make_bucket("kills"), "ckpts")
                r = kills.run([f_uri, f_uri, f_uri, s3_uri], kills_n, spawner, workdir, env, seed=a.seed, log=say)
            elif c == 2:
                r = flips.run(workdir, flips_n, seed=a.seed + 1, log=say)
            elif c == 3:
                f_uri = "file://" + os.path.join(workdir, "fencing")
                s3_uri = server.store_uri(server.make_bucket("fencing"), "ckpts")
                r = [fencing.run(f_uri, "file", fence_n, spawner, env, seed=a.seed + 2, log=say),
                     fencing.run(s3_uri, "s3", fence_n, spawner, env, seed=a.seed + 3, log=say)]
            elif c == 4:
                r = diskfull.run(workdir, log=say)
            else:
                r = outage.run(server, outage_s, log=say)
            results[CASES[c]] = r
            results.setdefault("seconds", {})[CASES[c]] = round(time.monotonic() - t0, 1)
    finally:
        if spawner is not None:
            spawner.close()
        if server is not None:
            server.stop(grace_s=1.0)
        if a.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    say("")
    say("COUNTS")
    oks = {}
    for c in cases:
        r = results[CASES[c]]
        if c == 1:
            report_kills(r, say)
        elif c == 2:
            report_flips(r, say)
        elif c == 3:
            report_fencing(r, say)
        elif c == 4:
            report_diskfull(r, say)
        else:
            report_outage(r, say)
        oks[CASES[c]] = all(x["ok"] for x in r) if isinstance(r, list) else r["ok"]
        say(f"   target {'MET' if oks[CASES[c]] else 'MISSED'} ({results['seconds'][CASES[c]]:.0f} s)")
    results["ok"] = oks
    say(f"ALL TARGETS {'MET' if all(oks.values()) else 'NOT MET: ' + ', '.join(k for k, v in oks.items() if not v)} "
        f"in {time.monotonic() - t_all:.0f} s")
    if a.json:
        json.dump(results, sys.stdout, indent=1, default=str)
        print()
    return 0 if all(oks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
