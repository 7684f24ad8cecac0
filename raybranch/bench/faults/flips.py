"""Case 2: one random bit flipped in one object of a good store, for every kind of object.

The good store (file://) holds run "flip": branch "main" (segment_size 3, flush_every 2, so it
has sealed pages, a top.json, commit records, per-commit and segment blobs), a fork "exp" of it
(its own branch.json, pages, blobs) and a link "served" (raybranch.ledger.refs.move_link). Every
restored step of both branches is recorded first.

Per flip: a kind is drawn uniformly from :data:`~.common.KINDS`, then an object of that kind and
a bit of it; the bit is flipped in place (in a working copy), then

* ``verify_store`` must report a problem (``detected``), ideally naming the object (``named``);
  the CLI ``raybranch verify --store URI`` must exit 1 and name it on stderr;
* every step of both branches is restored with a fresh Reader: each must raise a RaybranchError
  or return exactly the recorded data. Returning other data is a *silent wrong restore*; raising
  anything else is a *crash*.

An undetected flip is checked for being a no-op of the decoder (the JSON decodes to the same
document, e.g. a flipped case of an exponent's ``e``): reported as ``undetected_same_content``.
The original bytes are written back before the next flip.
"""
from __future__ import annotations

import contextlib
import io
import os
import random
import shutil

from .common import KINDS, Trainer, ckpt_kwargs, kind_of, one_line, restore_all, verify_problems

RUN = "flip"


def build_store(root: str) -> dict[str, dict[int, str]]:
    """The good store; returns {branch: {step: restore digest}}."""
    from ...checkpoint.checkpointer import Checkpointer
    from ...ledger.refs import live_branch_id, move_link
    from ...store.store import open_store

    shutil.rmtree(root, ignore_errors=True)
    uri = "file://" + root
    store = open_store(uri)
    tr = Trainer()
    ck = Checkpointer(store, RUN, "main", **ckpt_kwargs(3, 2))
    for s in range(12):
        ck.save(s, tr.advance_to(s).model, tr.opt)
    ck.close()
    exp = ck.fork("exp", 5)
    tr2 = Trainer(seed=99).advance_to(6)
    for s in range(6, 11):
        exp.save(s, tr2.advance_to(s).model, tr2.opt)
    exp.close()
    move_link(store, RUN, "served", {"branch": "main", "branch_id": live_branch_id(store, RUN, "main"), "step": 7}, expect=None)
    if verify_problems(store, RUN):
        raise RuntimeError(f"the good store does not verify: {verify_problems(store, RUN)}")
    good = {}
    for b, steps in (("main", list(range(12))), ("exp", list(range(11)))):
        good[b], bad = restore_all(uri, RUN, b, steps)
        if bad:
            raise RuntimeError(f"the good store does not restore: {bad}")
    return good


def objects_by_kind(root: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {k: [] for k in KINDS}
    for d, _, fs in os.walk(root):
        for f in sorted(fs):
            rel = os.path.relpath(os.path.join(d, f), root)
            k = kind_of(rel)
            if k in out:
                out[k].append(rel)
    return {k: sorted(v) for k, v in out.items()}


def _same_content(rel: str, before: bytes, after: bytes) -> bool:
    """Whether a flipped JSON object still decodes to the same document."""
    from ...store.store import decode_json

    if kind_of(rel) == "blob":
        return False
    try:
        return decode_json(rel, before, rel.endswith(".zst")) == decode_json(rel, after, rel.endswith(".zst"))
    except Exception:  # noqa: BLE001
        return False


def _cli_verify(uri: str) -> tuple[int, str]:
    from ...cli.main import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(["verify", "--store", uri])
        except SystemExit as exc:
            code = exc.code
    return int(code or 0), err.getvalue()


def _names(rel: str, text: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    stem = name.split(".")[0]
    return rel in text or (len(stem) >= 12 and stem in text)


def flip_one(root: str, rel: str, bit: int, good: dict) -> dict:
    from ...store.store import open_store

    path = os.path.join(root, rel)
    with open(path, "rb") as f:
        before = f.read()
    after = bytearray(before)
    after[bit // 8] ^= 1 << (bit % 8)
    with open(path, "wb") as f:
        f.write(after)
    uri = "file://" + root
    store = open_store(uri)
    try:
        problems = verify_problems(store, None)
        crashed_verify = [p for p in problems if p.startswith("VERIFY RAISED")]
        code, stderr = _cli_verify(uri)
        res = {"kind": kind_of(rel), "object": rel, "bit": bit, "size": len(before),
               "detected": bool(problems) and not crashed_verify, "verify_crashed": crashed_verify,
               "named": any(_names(rel, p) for p in problems), "cli_exit": code, "cli_named": _names(rel, stderr),
               "problems": problems[:3]}
        outcomes = {"identical": 0, "error": 0, "wrong": 0, "crash": 0}
        examples = {}
        for branch, steps in good.items():
            got, bad = restore_all(store, RUN, branch, list(steps))
            for s, d in got.items():
                k = "identical" if d == steps[s] else "wrong"
                outcomes[k] += 1
                if k == "wrong":
                    examples.setdefault("wrong", f"{branch}/{s}")
            for s, e in bad.items():
                k = "error" if _is_rb_error(e) else "crash"
                outcomes[k] += 1
                examples.setdefault(k, f"{branch}/{s}: {one_line(e, 200)}")
        res["restores"] = outcomes
        res["examples"] = examples
        if not res["detected"]:
            res["same_content"] = _same_content(rel, before, bytes(after))
        return res
    finally:
        with open(path, "wb") as f:
            f.write(before)


def _is_rb_error(text: str) -> bool:
    return not text.startswith("CRASH ")


def run(workdir: str, flips: int, seed: int = 2, log=print) -> dict:
    rng = random.Random(seed)
    root = os.path.join(workdir, "flips")
    good = build_store(root)
    objs = objects_by_kind(root)
    missing = [k for k in KINDS if not objs[k]]
    if missing:
        raise RuntimeError(f"the good store has no object of kind(s) {missing}")
    out = []
    for i in range(flips):
        kind = KINDS[i % len(KINDS)] if flips >= len(KINDS) and i < len(KINDS) else rng.choice(KINDS)
        rel = rng.choice(objs[kind])
        size = os.path.getsize(os.path.join(root, rel))
        r = flip_one(root, rel, rng.randrange(size * 8), good)
        out.append(r)
        bad = r["restores"]["wrong"] or r["restores"]["crash"] or not r["detected"]
        log(f"  flip {i + 1:3d}/{flips} {kind:6s} bit {r['bit']:6d}/{size * 8:<7d} {rel[-60:]:60s} "
            f"detected={r['detected']} named={r['named']} cli={r['cli_exit']} restores={r['restores']}"
            + (f" !! {r.get('examples')} {r['problems'][:1]} same_content={r.get('same_content')}" if bad else ""))
    return summarize(out)


def summarize(rounds: list[dict]) -> dict:
    per_kind = {}
    for k in KINDS:
        rs = [r for r in rounds if r["kind"] == k]
        per_kind[k] = {
            "flips": len(rs), "detected": sum(r["detected"] for r in rs), "named": sum(r["named"] for r in rs),
            "cli_exit_1": sum(r["cli_exit"] == 1 for r in rs), "cli_named": sum(r["cli_named"] for r in rs),
            "undetected_same_content": sum(1 for r in rs if not r["detected"] and r.get("same_content")),
            "restores_identical": sum(r["restores"]["identical"] for r in rs),
            "restores_error": sum(r["restores"]["error"] for r in rs),
            "restores_silently_wrong": sum(r["restores"]["wrong"] for r in rs),
            "restores_crashed": sum(r["restores"]["crash"] for r in rs),
        }
    n = len(rounds)
    s = {
        "flips": n,
        "detected": sum(r["detected"] for r in rounds),
        "named": sum(r["named"] for r in rounds),
        "cli_exit_1": sum(r["cli_exit"] == 1 for r in rounds),
        "silent_wrong_restores": sum(r["restores"]["wrong"] for r in rounds),
        "flips_with_silent_wrong_restore": sum(1 for r in rounds if r["restores"]["wrong"]),
        "restore_crashes": sum(r["restores"]["crash"] for r in rounds),
        "per_kind": per_kind,
        "misses": [r for r in rounds if not r["detected"] or r["restores"]["wrong"] or r["restores"]["crash"]
                   or r["cli_exit"] != 1],
    }
    s["ok"] = n > 0 and s["detected"] == n and s["silent_wrong_restores"] == 0 and s["restore_crashes"] == 0 \
        and s["cli_exit_1"] == n
    return s
