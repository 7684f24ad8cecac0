"""Index scale: open a branch of 10⁶ checkpoints, resolve and restore any step, in a bounded number of reads.

    python -m raybranch.bench.index_scale [--checkpoints 1000000] [--flush-every 1000] [--snapshot-every 1000]
        [--segment-size 64] [--backends file,s3] [--resolves 20] [--restores 10] [--target 10]
        [--seed 0] [--dir DIR] [--save FILE.json] [--json]

Builds one branch of ``--checkpoints`` saves of a tiny real model (``torch.nn.Linear(16, 16)``, 272
parameters, trained by plain SGD on a fixed random regression set, one torch thread) through
:class:`raybranch.Checkpointer` with group commits (``flush_every`` saves per commit, one blob per
commit), a snapshot every ``snapshot_every`` saves, and pages of ``segment_size`` commits (sealed and
compacted). The branch is built once on ``file://``; for ``s3`` every object of that store is then
uploaded (same relative keys) to a bucket of a SeaweedFS server the benchmark starts on loopback.

Per back end, from a fresh Store, with ``store.stats`` (reads = GET + LIST pages) it measures:
open (``Lineage(store, run, "main")``), open + ``log.last_entries(20)``, open + ``entry(step)`` of
random steps (fresh Lineage each), and the restore of random steps from a fresh
:class:`raybranch.Reader` (metadata reads and blob GETs apart; the restored weights are checked to
equal the encoder's reconstruction at that step, bit for bit). Then the metadata sizes, and the cost
of one commit (PUTs and bytes, commit record vs blob) for ``flush_every`` = 1 and 64 on a small
separate run (``snapshot_every`` unset there), with the extra cost of the commit that seals a page.
Exit status 1 when open + resolve takes more than ``--target`` (10) reads on any back end.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

RUN = "scale"


def _say(msg: str) -> None:
    print(f"[index_scale] {msg}", file=sys.stderr, flush=True)


def _kind(rel: str) -> str:
    for part, kind in (("/blobs/", "blob"), ("/layouts/", "layout"), ("/commits/", "commit"), ("/pages/", "page")):
        if part in rel:
            return kind
    return "top" if rel.endswith("/top.json") else "ref" if "/refs/" in rel else "other"


class Probe:
    """Counts a Store's GETs and PUTs (and PUT bytes) by what the key is: blob, commit, page, …"""

    def __init__(self, store):
        self.store, self._lock = store, threading.Lock()
        self.reset()
        for name in ("read_bytes", "read_tagged"):
            setattr(store, name, self._wrap(getattr(store, name), False))
        for name in ("write_bytes", "create"):
            setattr(store, name, self._wrap(getattr(store, name), True))

    def reset(self) -> None:
        self.store.stats.reset()
        self.gets, self.puts, self.put_bytes = Counter(), Counter(), Counter()

    def _wrap(self, fn, is_put: bool):
        def call(rel, *args):
            with self._lock:
                (self.puts if is_put else self.gets)[_kind(rel)] += 1
                if is_put:
                    self.put_bytes[_kind(rel)] += len(args[0])
            return fn(rel, *args)
        return call

    def snap(self) -> dict:
        s = self.store.stats.snapshot()
        return {"get": s["get"], "list": s["list"], "reads": s["reads"], "blob_gets": self.gets["blob"],
                "meta_reads": s["reads"] - self.gets["blob"], "put": s["put"], "delete": s["delete"],
                "put_bytes": dict(self.put_bytes), "puts": dict(self.puts)}


def _open(uri: str):
    from ..store.store import open_store
    store = open_store(uri)  # S3: a HEAD of the bucket (not a read) opens the connection
    return store, Probe(store)


def _sgd_step(model, x, y, g, lr: float = 0.01, batch: int = 32) -> None:
    import torch
    with torch.no_grad():  # least squares, gradient by hand: a real SGD step without autograd's overhead
        i = torch.randint(0, x.shape[0], (batch,), generator=g)
        xb, yb = x[i], y[i]
        err = torch.addmm(model.bias, xb, model.weight.t()) - yb
        model.weight.sub_(err.t() @ xb, alpha=2 * lr / batch)
        model.bias.sub_(err.sum(0), alpha=2 * lr / batch)


def build(store, n: int, flush_every: int, snapshot_every: int, segment_size: int, keep: set[int], seed: int,
          run: str = RUN, progress: bool = True) -> dict:
    import torch
    from ..checkpoint.checkpointer import Checkpointer
    torch.manual_seed(seed)
    model = torch.nn.Linear(16, 16)
    x = torch.randn(4096, 16)
    y = x @ torch.randn(16, 16) + 0.1 * torch.randn(4096, 16)
    g = torch.Generator().manual_seed(seed)
    ck = Checkpointer(store, run, "main", flush_every=flush_every, snapshot_every=snapshot_every, standalone_every=1,
                      segment_size=segment_size, flush_seconds=None,  # every exact checkpoint standalone: restore reads one chain
                      background=False)  # the reconstruction is read after each save
    recons, t0, every = {}, time.perf_counter(), max(n // 10, 1)
    for step in range(n):
        _sgd_step(model, x, y, g)
        ck.save(step, model)
        if step in keep:  # the encoder's reconstruction at this step: what a restore must give back exactly
            recons[step] = ck._enc.encoders["model"].recon.clone()
        if progress and (step + 1) % every == 0:
            el = time.perf_counter() - t0
            _say(f"built {step + 1}/{n} in {el:.0f} s, ~{el / (step + 1) * (n - step - 1):.0f} s left")
    ck.close()
    return {"seconds": time.perf_counter() - t0, "saves": n, "commits": ck._writer.log.head_seq + 1,
            "params": sum(p.numel() for p in model.parameters()), "timings": dict(ck.timings), "recons": recons}


def copy_tree(root: str, client, bucket: str, prefix: str, threads: int = 8) -> dict:
    from ..store.objects import TMP_MARK
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        files += [os.path.join(d, f) for f in names if not f.startswith(".") and TMP_MARK not in f]

    def up(path: str) -> int:
        with open(path, "rb") as f:
            data = f.read()
        client.put_object(Bucket=bucket, Key=f"{prefix}/{os.path.relpath(path, root).replace(os.sep, '/')}", Body=data)
        return len(data)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        nbytes = sum(pool.map(up, files))
    return {"objects": len(files), "bytes": nbytes, "seconds": time.perf_counter() - t0}


def sizes(root: str) -> dict:
    out = Counter()
    for d, dirs, names in os.walk(os.path.join(root, RUN)):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        for f in names:
            if not f.startswith("."):
                p = os.path.join(d, f)
                k = _kind("/" + os.path.relpath(p, root))
                out[k + "_bytes"] += os.path.getsize(p)
                out[k + "s"] += 1
    return dict(out)


def _timed(fn):
    t0 = time.perf_counter()
    return fn(), (time.perf_counter() - t0) * 1e3


def _row(op: str, snaps: list[dict], ms: list[float]) -> dict:
    mx = lambda k: max(s[k] for s in snaps)  # noqa: E731
    return {"op": op, "n": len(snaps), "get": mx("get"), "list": mx("list"), "reads": mx("reads"),
            "reads_mean": statistics.mean(s["reads"] for s in snaps), "meta_reads": mx("meta_reads"),
            "blob_gets": mx("blob_gets"), "ms_median": statistics.median(ms), "ms_max": max(ms)}


def measure(uri: str, resolve_steps: list[int], restore_steps: list[int], recons: dict, opens: int = 5) -> dict:
    import torch
    from ..checkpoint.restore import Reader
    from ..ledger import Lineage
    store, probe = _open(uri)
    rows, checks = [], []

    def series(op: str, fn, args) -> list[tuple]:
        out = []
        for a in args:
            probe.reset()
            r, ms = _timed(lambda: fn(a))
            out.append((a, r, probe.snap(), ms))
        rows.append(_row(op, [o[2] for o in out], [o[3] for o in out]))
        return out

    series("open", lambda _: Lineage(store, RUN, "main"), range(opens))
    tail = series("open + log tail (20)", lambda _: Lineage(store, RUN, "main").log.last_entries(20), range(opens))
    assert all(len(r) == 20 for _, r, _, _ in tail)
    found = series("open + resolve step", lambda step: Lineage(store, RUN, "main").entry(step), resolve_steps)
    assert all(r["step"] == step for step, r, _, _ in found)
    for step, r, _, _ in series("restore step", lambda step: Reader(store, RUN).restore("main", step), restore_steps):
        got = torch.cat([t.reshape(-1) for t in r["model"].values()])
        checks.append({"step": step, "equal": bool(torch.equal(got, recons[step])), "depth": r["manifest"]["depth"]})
    return {"rows": rows, "restore_checks": checks, "restores_equal": all(c["equal"] for c in checks)}


def commit_cost(uri: str, flush_every: int, segment_size: int, seed: int) -> dict:
    """Per commit: requests and bytes, until (and with) the commit that seals the first page."""
    import torch
    from ..checkpoint.checkpointer import Checkpointer
    store, probe = _open(uri)
    torch.manual_seed(seed)
    model, x = torch.nn.Linear(16, 16), torch.randn(1024, 16)
    y, g = x @ torch.randn(16, 16), torch.Generator().manual_seed(seed)
    ck = Checkpointer(store, f"cost-{flush_every}-{uuid.uuid4().hex[:6]}", "main", flush_every=flush_every,
                      segment_size=segment_size, flush_seconds=None, background=False)  # requests counted per save
    plain, sealing, step = [], None, 0
    ck.save(step, model)  # the branch, its layout and the first snapshot: not a steady-state commit
    while sealing is None:
        probe.reset()
        seq, sealed = ck._writer.log.head_seq, ck._writer.log.sealed_through
        while ck._writer.log.head_seq == seq:
            step += 1
            _sgd_step(model, x, y, g)
            ck.save(step, model)
        s = probe.snap()
        if ck._writer.log.sealed_through != sealed:
            sealing = s
        else:
            plain.append(s)
    med = lambda f: statistics.median(f(s) for s in plain)  # noqa: E731
    return {"flush_every": flush_every, "commits": len(plain), "put": med(lambda s: s["put"]),
            "commit_bytes": med(lambda s: s["put_bytes"].get("commit", 0)), "blob_bytes": med(lambda s: s["put_bytes"].get("blob", 0)),
            "seal_extra": {"put": sealing["put"] - med(lambda s: s["put"]), "get": sealing["get"], "list": sealing["list"],
                           "delete": sealing["delete"], "puts": sealing["puts"], "put_bytes": sealing["put_bytes"]}}


def render(res: dict) -> str:
    c, b = res["config"], res["build"]
    lines = [f"branch of {c['checkpoints']} checkpoints of Linear(16,16) ({b['params']} params): flush_every {c['flush_every']} "
             f"(steps per commit), snapshot_every {c['snapshot_every']}, segment_size {c['segment_size']} (commits per page)",
             f"build on file://: {b['seconds']:.1f} s ({b['saves'] / b['seconds']:.0f} saves/s), {b['commits']} commits"]
    if "copy" in res:
        cp = res["copy"]
        lines.append(f"copy to SeaweedFS: {cp['objects']} objects, {cp['bytes'] / 1e6:.1f} MB in {cp['seconds']:.1f} s")
    s = res["sizes"]
    lines += [f"metadata: top.json {s.get('top_bytes', 0)} B, {s.get('pages', 0)} pages {s.get('page_bytes', 0)} B, "
              f"{s.get('commits', 0)} commit records {s.get('commit_bytes', 0)} B, layouts {s.get('layout_bytes', 0)} B, "
              f"refs+branch.json {s.get('ref_bytes', 0) + s.get('other_bytes', 0)} B; blobs: {s.get('blobs', 0)} objects "
              f"{s.get('blob_bytes', 0)} B", "",
              f"{'back end':<9}{'operation':<22}{'n':>4}{'GET':>5}{'LIST':>5}{'reads':>6}{'meta':>6}{'blobs':>6}{'ms med':>9}{'ms max':>9}"]
    for be, m in res["backends"].items():
        for r in m["rows"]:
            lines.append(f"{be:<9}{r['op']:<22}{r['n']:>4}{r['get']:>5}{r['list']:>5}{r['reads']:>6}{r['meta_reads']:>6}"
                         f"{r['blob_gets']:>6}{r['ms_median']:>9.1f}{r['ms_max']:>9.1f}")
        lines.append(f"{'':<9}restored = reconstruction at {len(m['restore_checks'])} random steps: {m['restores_equal']}")
    lines += ["(reads = GET + LIST pages, the most over the samples; meta = reads other than blob GETs, layout included)", "",
              f"{'back end':<9}{'flush_every':>12}{'PUT/commit':>11}{'commit rec B':>13}{'blob B':>9}{'B/step':>9}   seal of a page: extra"]
    for be, rows in res["commit_cost"].items():
        for r in rows:
            x = r["seal_extra"]
            lines.append(f"{be:<9}{r['flush_every']:>12}{r['put']:>11g}{r['commit_bytes']:>13g}{r['blob_bytes']:>9g}"
                         f"{(r['commit_bytes'] + r['blob_bytes']) / r['flush_every']:>9.0f}   {x['put']:g} PUT, {x['get']} GET, "
                         f"{x['list']} LIST, {x['delete']} DELETE; {', '.join(f'{k} {v} B' for k, v in sorted(x['put_bytes'].items()))}")
    t = res["target"]
    lines += ["", f"open + resolve: at most {t['max_reads']} reads (target <= {t['reads']}): " + ("met" if t["met"] else "MISSED the target")]
    return "\n".join(lines)


def run(args) -> dict:
    import torch
    from ..store.store import open_store
    torch.set_num_threads(1)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not backends or set(backends) - {"file", "s3"}:
        raise SystemExit(f"--backends: file and/or s3, got {args.backends!r}")
    rng = random.Random(args.seed)
    resolve_steps = sorted(rng.sample(range(args.checkpoints), min(args.resolves, args.checkpoints)))
    restore_steps = sorted(rng.sample(range(args.checkpoints), min(args.restores, args.checkpoints)))
    work = args.dir or tempfile.mkdtemp(prefix="raybranch-index-scale-")
    root, server = os.path.join(work, "store"), None
    try:
        store = open_store("file://" + root, check=False)
        b = build(store, args.checkpoints, args.flush_every, args.snapshot_every, args.segment_size, set(restore_steps), args.seed)
        recons = b.pop("recons")
        res = {"config": {k: getattr(args, k) for k in ("checkpoints", "flush_every", "snapshot_every", "segment_size", "seed")},
               "build": b, "sizes": sizes(root), "backends": {}, "commit_cost": {}}
        uris = {"file": "file://" + root}
        cost_uris = {"file": "file://" + os.path.join(work, "cost")}
        if "s3" in backends:
            from ..testing.seaweed import SeaweedServer
            server = SeaweedServer(os.path.join(work, "seaweed")).start()
            for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
                os.environ.pop(k, None)
            os.environ.update(server.env())
            bucket = server.make_bucket("index-scale")
            _say("copying the store to SeaweedFS")
            res["copy"] = copy_tree(root, server.boto3_client(), bucket, "runs")
            uris["s3"], cost_uris["s3"] = server.store_uri(bucket, "runs"), server.store_uri(bucket, "cost")
        for be in backends:
            _say(f"measuring {be}")
            res["backends"][be] = measure(uris[be], resolve_steps, restore_steps, recons)
            res["commit_cost"][be] = [commit_cost(cost_uris[be], fe, args.segment_size, args.seed) for fe in (1, 64)]
        worst = max(r["reads"] for m in res["backends"].values() for r in m["rows"] if r["op"] == "open + resolve step")
        res["target"] = {"reads": args.target, "max_reads": worst, "met": worst <= args.target}
        return res
    finally:
        if server is not None:
            server.stop(grace_s=1.0)
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoints", type=int, default=1_000_000)
    ap.add_argument("--flush-every", type=int, default=1000, help="saves per commit (one blob each)")
    ap.add_argument("--snapshot-every", type=int, default=1000, help="bounds a restore's delta chain")
    ap.add_argument("--segment-size", type=int, default=64, help="commits per sealed (compacted) page")
    ap.add_argument("--backends", default="file,s3", help="file, s3 or file,s3")
    ap.add_argument("--resolves", type=int, default=20)
    ap.add_argument("--restores", type=int, default=10)
    ap.add_argument("--target", type=int, default=10, help="most reads allowed for open + resolve")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="work directory, kept (default: a temporary one, removed)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--save", default=None, help="also write the JSON figures to this file")
    args = ap.parse_args(argv)
    if args.checkpoints < 1:
        ap.error("--checkpoints must be >= 1")
    res = run(args)
    if args.save:
        with open(args.save, "w") as f:
            json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1) if args.json else render(res), flush=True)
    if not res["target"]["met"]:
        print(f"index_scale: open + resolve took {res['target']['max_reads']} reads, MISSED the target of "
              f"{args.target}", file=sys.stderr)
        return 1
    if not all(m["restores_equal"] for m in res["backends"].values()):
        print("index_scale: a restored state differs from the reconstruction", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
