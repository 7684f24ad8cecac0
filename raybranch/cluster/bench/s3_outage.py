"""The S3 server stopped for 10 s in the middle of a run: no committed checkpoint lost, training
finishes, every checkpoint verifies.

    python -m raybranch.cluster.bench.s3_outage [--steps 400] [--outage-at 120] [--outage-s 10] [--json]

A real S3 server (SeaweedFS on loopback, :class:`~raybranch.testing.seaweed.SeaweedServer`, its own
temporary data dir) and a local Ray (2 CPUs). LeNet-5 trains on digits (SGD lr 0.01 momentum 0.9,
batch 32, one torch thread) and hands a checkpoint of every step (model + optimizer) to the
branch's checkpoint actor through :class:`~raybranch.cluster.actor.AsyncCheckpointer` (at most
``max_pending`` saves in flight; a failed save is retried with exponential backoff,
``RetryPolicy(attempts, base_s, cap_s)``). After step ``outage_at`` a thread kills the S3 server
(``pause()``: SIGKILL, as a crash) and restarts it ``outage_s`` seconds later on the same ports and
data (``resume()``, which blocks until S3 answers again).

Two layers retry: the S3 back end retries each request with backoff for up to
``--retry-deadline`` seconds (the URI's ``retry_deadline``; default 60 s, longer than the outage,
so a request simply waits it out), then the actor retries the whole save, rebuilding its
Checkpointer from the store (a new writer epoch each time). A deadline shorter than the outage
(e.g. ``--retry-deadline 2``) exercises the actor's retries.

Checked afterwards, and printed:

* every save the actor had reported committed before the outage is still in the store;
* the branch holds every step 0…steps−1, once (nothing lost or skipped during the outage);
* ``verify_store`` finds no problem (every commit chain, page and document checksum, every
  layout and blob);
* the head restores (printed: its largest weight error against the live model, which is the
  LC codec's, and both test accuracies).

It also prints the training stall (longest step, time blocked on backpressure) and the actor's
retry counters.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time


def run(steps: int = 400, outage_at: int = 120, outage_s: float = 10.0, max_pending: int = 4,
        attempts: int = 12, base_s: float = 0.2, cap_s: float = 2.0, seed: int = 0,
        retry_deadline: float | None = None, log=print) -> dict:
    import ray
    import torch
    import torch.nn.functional as F

    from ..actor import AsyncCheckpointer, RetryPolicy
    from ...data import load_dataset
    from ...ledger.lineage import Lineage
    from ...ledger.verify import verify_store
    from ...models import build_model
    from ...store.store import open_store
    from ...testing.seaweed import SeaweedServer
    from ...train.loop import evaluate_accuracy

    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="raybranch-s3-outage-")
    server = SeaweedServer(os.path.join(tmp, "s3"))
    server.start()
    started_ray = False
    try:
        os.environ.update(server.env())  # the actor (a child of this Ray) reads them from its environment
        for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            os.environ.pop(k, None)
        bucket = server.make_bucket("outage")
        uri = server.store_uri(bucket, "runs")
        if retry_deadline is not None:
            uri += f"&retry_deadline={retry_deadline:g}"
        if not ray.is_initialized():
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            started_ray = True
        train, test, meta = load_dataset("digits")
        torch.manual_seed(seed)
        model = build_model("lenet5", meta.num_classes, meta.in_channels, meta.image_size)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        g = torch.Generator().manual_seed(seed)
        retry = RetryPolicy(attempts=attempts, base_s=base_s, cap_s=cap_s)
        ck = AsyncCheckpointer(uri, "outage", "main", max_pending=max_pending, retry=retry, bits=3)
        events: dict = {}

        def outage() -> None:
            events["down_at"] = time.monotonic()
            server.pause()
            time.sleep(outage_s)
            events["restart_at"] = time.monotonic()
            server.resume()
            events["up_at"] = time.monotonic()

        times, committed_before = [], None
        t_start = time.monotonic()
        outage_thread = None
        for step in range(steps):
            t0 = time.monotonic()
            idx = torch.randint(0, len(train), (32,), generator=g)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(train.images[idx]), train.labels[idx]).backward()
            opt.step()
            ck.save(step, model, opt)
            times.append(time.monotonic() - t0)
            if step == outage_at:
                committed_before = sorted(r["step"] for r in ck.records)  # the actor said: committed
                outage_thread = threading.Thread(target=outage, name="s3-outage")
                outage_thread.start()
        ck.flush()
        train_s = time.monotonic() - t_start
        if outage_thread is not None:
            outage_thread.join()
        stats = ck.actor_stats()
        ck.close()

        store = open_store(uri)
        entries = [e["step"] for e in Lineage(store, "outage", "main").all_entries()]
        have = sorted(set(entries))
        lost = [s for s in (committed_before or []) if s not in have]
        rep = verify_store(store, "outage")
        problems, checked = rep.problems, rep.counts["steps"]
        restored = ck.restore()
        live = {k: v.detach() for k, v in model.state_dict().items()}
        max_err = max(float((restored["model"][k].float() - v.float()).abs().max()) for k, v in live.items())
        twin = build_model("lenet5", meta.num_classes, meta.in_channels, meta.image_size)
        twin.load_state_dict(restored["model"])
        acc_live, acc_restored = evaluate_accuracy(model, test.images, test.labels), evaluate_accuracy(twin, test.images, test.labels)
        out = {
            "steps": steps, "outage_after_step": outage_at, "outage_s": outage_s,
            "s3_down_s": events["up_at"] - events["down_at"] if "up_at" in events else None,
            "train_s": train_s,
            "longest_step_s": max(times),
            "median_step_s": sorted(times)[len(times) // 2],
            "steps_slower_than_1s": sum(t > 1.0 for t in times),
            "committed_before_outage": len(committed_before or []),
            "committed_before_outage_lost": lost,
            "steps_in_store": len(have),
            "every_step_once": entries == list(range(steps)),
            "verify_problems": problems, "verify_checked": checked,
            "restore_max_abs_err": max_err, "acc_live": acc_live, "acc_restored": acc_restored,
            "actor": {k: stats.get(k) for k in ("saves", "retries", "found_committed", "failed", "skipped", "writers")},
            "retry_deadline_s": retry_deadline,
            "blocked_s": ck.stats["blocked_s"], "blocked": ck.stats["blocked"],
            "retry_policy": {"attempts": attempts, "base_s": base_s, "cap_s": cap_s}, "max_pending": max_pending,
            "ok": not lost and entries == list(range(steps)) and not problems,
        }
        log(f"S3 down for {out['s3_down_s']:.1f} s (killed after step {outage_at}, restarted {outage_s:.0f} s later; "
            f"restart took {events['up_at'] - events['restart_at']:.1f} s)")
        log(f"training: {steps} steps in {train_s:.1f} s; longest step {out['longest_step_s']:.1f} s "
            f"(blocked on backpressure {out['blocked_s']:.1f} s in {out['blocked']} saves), median {1000 * out['median_step_s']:.1f} ms")
        log(f"actor: {out['actor']['saves']} saves, {out['actor']['retries']} retries, "
            f"{out['actor']['found_committed']} found already committed, {out['actor']['failed']} failed, "
            f"{out['actor']['writers']} writer registration(s)")
        log(f"committed before the outage: {out['committed_before_outage']}, lost: {len(lost)}; "
            f"store holds steps 0..{have[-1] if have else '-'} ({len(have)}), every step once: {out['every_step_once']}")
        log(f"verify: {checked} checkpoints, {len(problems)} problem(s); head restores within {max_err:.2e} of the live "
            f"weights, test acc {acc_restored:.4f} (live {acc_live:.4f})")
        log("RESULT: " + ("OK" if out["ok"] else "FAILED"))
        return out
    finally:
        if started_ray:
            ray.shutdown()
        server.stop(grace_s=1.0)
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m raybranch.cluster.bench.s3_outage", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--outage-at", type=int, default=120, help="kill S3 after this step")
    p.add_argument("--outage-s", type=float, default=10.0, help="seconds S3 stays down before it is restarted")
    p.add_argument("--max-pending", type=int, default=4)
    p.add_argument("--retry-deadline", type=float, default=None,
                   help="seconds the S3 back end retries one request (default: the URI's, 60)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not 0 <= args.outage_at < args.steps - 1:
        print("s3_outage: error: --outage-at must lie in [0, steps - 1)", file=sys.stderr)
        return 2
    out = run(args.steps, args.outage_at, args.outage_s, args.max_pending, retry_deadline=args.retry_deadline,
              log=(lambda m: None) if args.json else print)
    if args.json:
        json.dump(out, sys.stdout, indent=1)
        print()
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
