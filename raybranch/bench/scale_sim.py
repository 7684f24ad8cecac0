"""Capacity model: what a checkpoint every step of N GPUs costs in S3 bytes, requests and dollars.

    python -m raybranch.bench.scale_sim [--json] [--gpus 64] [--branches 2] [--steps-per-s 17]
        [--model vit-b16] [--optimizer none|sgd-momentum|adam] [--ratio R] [--flush-every 64] ...

Pure arithmetic (no torch, no Ray): every default below is a constant that names where it was
measured; every one can be overridden by a flag. docs/SCALE.md explains the model and its results.

Per group commit (raybranch/checkpoint/group.py, raybranch/ledger/branch.py) a writer makes
2 PUTs (the blob, the commit record created with ``If-None-Match: *``) and no GET or LIST; layouts
are written only the first time a layout is named (0 in steady state). Every ``page_size`` commits
the writer seals a page (raybranch/ledger/pages.py, segment_size 0 = no compaction): 1 PUT (the
page, created if absent), 1 GET + 1 PUT (top.json is read, merged and overwritten) and
``page_size`` DELETEs (the page's records but its last, plus the previous page's last).
S3 counts PUT, COPY, POST, DELETE (and LIST) against 3,500 requests/s per partitioned prefix and
GET/HEAD against 5,500 (AWS S3 performance guidelines); DELETE is free of charge, LIST is billed
like PUT.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

MB = 1e6
MIB = 1 << 20

# --- model state (bytes per checkpoint, fp32) ------------------------------------------------
# parameters (buffers left out): torchvision vit_b_16() 86,567,656 and resnet50() 25,557,032, counted here
# (`sum(p.numel() for p in m.parameters())`; gpu_encode prints 86.6M/25.6M, docs/BENCHMARKS.md); resnet-small
# 68,642 (raybranch.models.build_model, docs/SCALE.md "Measurements").
MODELS = {"vit-b16": 86_567_656, "resnet50": 25_557_032, "resnet-small": 68_642}
# optimizer tensors per parameter: SGD momentum 1 buffer, Adam 2 (exp_avg, exp_avg_sq), fp32
OPTIMIZER_BUFFERS = {"none": 0, "sgd-momentum": 1, "adam": 2}

# --- codec ratios (whole store: fp32 state × checkpoints ÷ every byte written) ------------------
# `raybranch bench codec --steps 1000 --no-large`, default uniform codec, docs/BENCHMARKS.md (2026-12-01):
# lenet5 42.8×, lenet5-tanh 25.9×, resnet-small 27.8× (model state). Default: 24.7×, resnet-small, 4161
# checkpoints through the Checkpointer's defaults on file:// (docs/SCALE.md "Measurements", 2026-12-01), the
# lowest and longest run. ViT-B/16 is ASSUMED to fall in the measured range: not measured.
RATIO_MODEL = 24.7
RATIO_RANGE = (24.7, 42.8)
# optimizer state is stored exact (optimizer_codec "exact", byte-grouped zstd): resnet-small + SGD momentum,
# 301 checkpoints, whole store 2.08× (docs/SCALE.md "Measurements"), which leaves 1.08× for the buffer itself.
RATIO_OPTIMIZER = 1.08

# --- CPU pipeline rate --------------------------------------------------------------------------
# `python -m raybranch.bench.step_overhead` (LeNet-5, digits), docs/BENCHMARKS.md: 71–75 MB/s of state per core end to end
PIPELINE_MB_S_PER_CORE = 73.0

# --- writer settings (raybranch/checkpoint/settings.py, checkpointer.py, group.py) --------------
FLUSH_EVERY = 64            # DEFAULT_FLUSH_EVERY
FLUSH_SECONDS = 5.0         # DEFAULT_FLUSH_SECONDS
MAX_GROUP_BYTES = 64 * MIB  # raybranch.checkpoint.group.MAX_GROUP_BYTES: a group closes once its rows reach it
KEY_EVERY = 256             # DEFAULT_KEY_EVERY: an exact key frame every 256 steps (measured: steps 0, 256, 512, …); it closes its group
STANDALONE_EVERY = 8        # exact checkpoints per standalone snapshot: ≤ 8 exact decodes per restore
PAGE_SIZE = 64              # commits per sealed page (docs/FORMAT.md)

# --- metadata sizes, measured: resnet-small, 4161 checkpoints, Checkpointer defaults (flush_seconds off),
# file:// store (docs/SCALE.md "Measurements"): 65 commits of 64 steps, one page of 64 commits -------------
COMMIT_RECORD_B = 4430      # a 64-step commit record, median (3678–6875 B); an upper bound for smaller groups
# the sealed page: 35,006 B (zstd 9; 927,874 B of JSON) for 64 commit headers and 3,969 step entries; compressed
# apart (zstd 9) the headers take 4.2 kB and the entries 30.4 kB
PAGE_B_PER_COMMIT = 66.0    # per commit header
PAGE_B_PER_STEP = 7.7       # per step entry
TOP_B_PER_PAGE = 42.0       # top.json row per page: 6506 B for 156 pages (docs/BENCHMARKS.md, index_scale)
# reads, `python -m raybranch.bench.index_scale` on S3 at 10⁶ checkpoints (docs/BENCHMARKS.md): open =
# ref GET + top.json GET + 1 LIST + head GET = 4; resolve a step = + 1 GET (its page or commit)
OPEN_READS = 4
RESOLVE_READS = 1

# --- S3 limits and prices -------------------------------------------------------------------
# AWS "Best practices design patterns: optimizing Amazon S3 performance": per partitioned prefix
S3_WRITE_LIMIT = 3500       # PUT/COPY/POST/DELETE per second
S3_READ_LIMIT = 5500        # GET/HEAD per second
# S3 Standard, us-east-1 list prices (as known to this model; aws.amazon.com/s3/pricing, checked 2026-12-01
# against nothing: no network here): storage $0.023 per GB-month (first 50 TB), PUT/COPY/POST/LIST $0.005
# per 1,000, GET $0.0004 per 1,000, DELETE free. A month = 730 h.
PRICE_GB_MONTH = 0.023
PRICE_PUT_PER_1000 = 0.005
PRICE_GET_PER_1000 = 0.0004
HOURS_PER_MONTH = 730.0


def steps_per_group(steps_per_s: float, step_bytes: float, flush_every: int, flush_seconds: float | None,
                    max_group_bytes: float, key_every: int) -> int:
    """Steps one group commit holds in steady state: the first window to close wins."""
    g = flush_every
    if flush_seconds:
        g = min(g, math.floor(steps_per_s * flush_seconds) + 1)  # the save that finds the window expired closes it
    g = min(g, max(1, math.ceil(max_group_bytes / step_bytes)))  # the save that reaches the cap closes it
    return max(1, min(g, key_every))


def simulate(*, gpus: int = 64, branches: int = 2, steps_per_s: float = 17.0, checkpoint_every: int = 1,
             model: str = "vit-b16", params: int | None = None, optimizer: str = "none", ratio: float = RATIO_MODEL,
             ratio_optimizer: float = RATIO_OPTIMIZER, flush_every: int = FLUSH_EVERY,
             flush_seconds: float | None = FLUSH_SECONDS, max_group_bytes: float = MAX_GROUP_BYTES,
             key_every: int = KEY_EVERY, standalone_every: int = STANDALONE_EVERY, page_size: int = PAGE_SIZE,
             state_bytes: float | None = None, pipeline_mb_s: float = PIPELINE_MB_S_PER_CORE,
             commit_record_b: float = COMMIT_RECORD_B, page_b_per_step: float = PAGE_B_PER_STEP, page_b_per_commit: float = PAGE_B_PER_COMMIT,
             top_b_per_page: float = TOP_B_PER_PAGE, parts: int | None = None, target: float = 0.10) -> dict:
    """The figures of one case (per branch, and for the whole run in one prefix). ``parts``: blobs
    per commit, by default a branch's DDP world size (gpus / branches): each rank writes its part's
    blob, rank 0's record names them all, and the group's byte cap applies to each part
    (:mod:`raybranch.checkpoint.parts`)."""
    if parts is None:
        parts = max(1, gpus // branches)
    if params is None:
        params = MODELS[model]
    model_b = 4.0 * params if state_bytes is None else float(state_bytes)
    opt_b = 4.0 * params * OPTIMIZER_BUFFERS[optimizer] if state_bytes is None else 0.0
    raw_b = model_b + opt_b
    step_b = model_b / ratio + opt_b / ratio_optimizer          # stored bytes per checkpoint, whole store
    ckpt_s = steps_per_s / checkpoint_every                    # checkpoints per second per branch
    g = steps_per_group(ckpt_s, step_b / parts, flush_every, flush_seconds, max_group_bytes, key_every)
    # a key frame closes its group: each cycle of key_every steps (its last the key frame) is ceil(K/g) groups
    commits_s = ckpt_s * math.ceil(key_every / g) / key_every
    seals_s = commits_s / page_size
    put_s = (parts + 1) * commits_s + 2 * seals_s              # blob(s) + record; page + top.json
    delete_s = page_size * seals_s
    get_s = seals_s                                            # top.json read before it is merged
    list_s = 0.0
    write_s = put_s + delete_s + list_s                        # what S3's 3,500/s counts
    per_branch = {"checkpoints_s": ckpt_s, "steps_per_group": g, "commits_s": commits_s, "bytes_s": step_b * ckpt_s,
                  "raw_bytes_s": raw_b * ckpt_s, "put_s": put_s, "delete_s": delete_s, "get_s": get_s, "list_s": list_s,
                  "write_class_s": write_s, "write_share": write_s / S3_WRITE_LIMIT, "read_share": get_s / S3_READ_LIMIT,
                  "pipeline_cores": raw_b * ckpt_s / (pipeline_mb_s * MB),
                  "pipeline_cores_per_rank": raw_b * ckpt_s / (pipeline_mb_s * MB) / max(1, gpus // branches)}
    whole = {k: per_branch[k] * branches for k in ("bytes_s", "put_s", "delete_s", "get_s", "list_s", "write_class_s")}
    whole |= {"write_share": whole["write_class_s"] / S3_WRITE_LIMIT, "read_share": whole["get_s"] / S3_READ_LIMIT}
    # beyond: one prefix holding the whole run (a new bucket before S3 splits it) reaches target / saturates at
    w1 = write_s  # write-class requests per branch; branches of gpus/branches GPUs each
    gpus_per_branch = gpus / branches
    beyond = {"branches_at_target": math.floor(target * S3_WRITE_LIMIT / w1), "branches_at_limit": math.floor(S3_WRITE_LIMIT / w1)}
    beyond |= {"gpus_at_target": beyond["branches_at_target"] * gpus_per_branch, "gpus_at_limit": beyond["branches_at_limit"] * gpus_per_branch,
               # one branch's own prefix: the checkpoint rate (checkpoints/s) that fills 3,500/s at this group size
               "branch_ckpt_s_at_limit": S3_WRITE_LIMIT / (write_s / ckpt_s),
               "no_group_commit_write_s": _no_group(ckpt_s, page_size, parts)}
    day = 86400.0
    gb_day = whole["bytes_s"] * day / 1e9
    requests = {"put_class_per_day": (whole["put_s"] + whole["list_s"]) * day, "get_per_day": whole["get_s"] * day,
                "delete_per_day": whole["delete_s"] * day}
    cost = {"gb_written_per_day": gb_day,
            "storage_usd_per_day_per_day_kept": gb_day * PRICE_GB_MONTH * 24 / HOURS_PER_MONTH,
            "storage_usd_per_day_after_30_days": 30 * gb_day * PRICE_GB_MONTH * 24 / HOURS_PER_MONTH,
            "requests_usd_per_day": requests["put_class_per_day"] / 1000 * PRICE_PUT_PER_1000
            + requests["get_per_day"] / 1000 * PRICE_GET_PER_1000} | requests
    return {"inputs": {"gpus": gpus, "branches": branches, "steps_per_s": steps_per_s, "checkpoint_every": checkpoint_every,
                       "model": model, "params": params, "optimizer": optimizer, "state_bytes": raw_b, "ratio": ratio,
                       "ratio_range": list(RATIO_RANGE), "ratio_optimizer": ratio_optimizer, "flush_every": flush_every,
                       "flush_seconds": flush_seconds, "max_group_bytes": max_group_bytes, "key_every": key_every,
                       "standalone_every": standalone_every, "page_size": page_size, "pipeline_mb_s_per_core": pipeline_mb_s,
                       "parts": parts},
            "stored_bytes_per_checkpoint": step_b, "per_branch": per_branch, "whole_run_one_prefix": whole,
            "beyond": beyond, "metadata": {str(n): metadata(n, g, page_size, commit_record_b, page_b_per_step, top_b_per_page, page_b_per_commit,
                                                    key_every)
                                           for n in (10**6, 10**8)},
            "restore": restore_reads(g, key_every, standalone_every, page_size, parts), "cost": cost,
            "meets_target": whole["write_share"] <= target and whole["read_share"] <= target}


def _no_group(ckpt_s: float, page_size: int, parts: int = 1) -> float:
    """Write-class requests per second per branch with flush_every = 1 (one commit of ``parts``
    blobs per checkpoint)."""
    seals = ckpt_s / page_size
    return (parts + 1) * ckpt_s + 2 * seals + page_size * seals


def metadata(n: int, g: int, page_size: int, commit_record_b: float, page_b_per_step: float, top_b_per_page: float,
             page_b_per_commit: float = PAGE_B_PER_COMMIT, key_every: int = KEY_EVERY) -> dict:
    """Metadata of one branch of ``n`` checkpoints in groups of ``g``: what is stored and what opening reads."""
    commits = math.ceil(n * math.ceil(key_every / g) / key_every)  # a key frame closes its group
    pages = commits // page_size
    top_b = 120 + top_b_per_page * pages
    records = commits - pages * page_size + (1 if pages else 0)  # the open page's records, the last page's last
    page_b = page_size * (page_b_per_commit + g * page_b_per_step)
    total = pages * page_b + records * commit_record_b + top_b
    return {"commits": commits, "pages": pages, "page_bytes": page_b, "top_json_bytes": top_b,
            "commit_records_kept": records, "metadata_bytes": total, "open_reads": OPEN_READS,
            "open_resolve_reads": OPEN_READS + RESOLVE_READS, "open_bytes": 200 + top_b + commit_record_b}


def restore_reads(g: int, key_every: int, standalone_every: int, page_size: int, parts: int = 1) -> dict:
    """Upper bound of the reads to restore any step: open + resolve, the pages of the exact chain,
    the layout, the blobs of the deltas since the key frame and of the exact chain behind it."""
    delta_blobs = math.ceil(key_every / g) + 1            # the deltas after the key frame (< key_every), and its group
    exact_blobs = standalone_every - 1                    # key → key → … → snapshot: ≤ standalone_every exact decodes
    span = standalone_every * key_every                   # steps the exact chain can reach back
    pages = math.ceil(span / (page_size * g)) + 1
    blobs = (delta_blobs + exact_blobs) * parts
    reads = OPEN_READS + RESOLVE_READS + (pages - 1) + 1 + blobs
    return {"max_reads": reads, "blob_gets": blobs, "page_gets": pages, "exact_decodes": standalone_every,
            "deltas": key_every}


def _mb(b: float) -> str:
    return f"{b / MB:,.1f} MB" if b >= 1e5 else f"{b / 1e3:,.1f} kB"


def render(r: dict) -> str:
    i, b, w, x, c = r["inputs"], r["per_branch"], r["whole_run_one_prefix"], r["beyond"], r["cost"]
    lo, hi = i["ratio_range"]
    out = [f"{i['gpus']} GPUs, {i['branches']} branches of {i['gpus'] // i['branches']}-GPU DDP, {i['steps_per_s']:g} steps/s, "
           f"a checkpoint every {i['checkpoint_every']} step(s); {i['model']} {i['params'] / 1e6:.1f} M params, optimizer {i['optimizer']}",
           f"state {_mb(i['state_bytes'])} per checkpoint; ratio {i['ratio']:g}x model (measured range {lo:g}-{hi:g}x), "
           f"{i['ratio_optimizer']:g}x optimizer -> {_mb(r['stored_bytes_per_checkpoint'])} stored per checkpoint",
           f"group commit: flush_every {i['flush_every']}, flush_seconds {i['flush_seconds']}, max group {_mb(i['max_group_bytes'])}, "
           f"key_every {i['key_every']} -> {b['steps_per_group']} steps per group, {b['commits_s']:.3f} commits/s per branch, "
           f"{i['parts']} blob(s) per commit", "",
           f"{'':28}{'per branch':>14}{'whole run':>14}{'S3 limit':>10}{'share':>9}",
           f"{'stored bytes/s':28}{_mb(b['bytes_s']) + '/s':>14}{_mb(w['bytes_s']) + '/s':>14}",
           f"{'PUT/s':28}{b['put_s']:>14.3f}{w['put_s']:>14.3f}",
           f"{'DELETE/s':28}{b['delete_s']:>14.3f}{w['delete_s']:>14.3f}",
           f"{'LIST/s':28}{b['list_s']:>14.3f}{w['list_s']:>14.3f}",
           f"{'PUT+DELETE+LIST /s':28}{b['write_class_s']:>14.3f}{w['write_class_s']:>14.3f}{S3_WRITE_LIMIT:>10}{w['write_share']:>9.3%}",
           f"{'GET/s':28}{b['get_s']:>14.4f}{w['get_s']:>14.4f}{S3_READ_LIMIT:>10}{w['read_share']:>9.4%}",
           f"share of the PUT limit, whole run in one prefix: {w['write_share']:.3%} (target <= 10 %): "
           f"{'met' if r['meets_target'] else 'MISSED'}; per branch prefix {b['write_share']:.3%}", "",
           f"CPU pipeline at {i['pipeline_mb_s_per_core']:g} MB/s/core: {b['pipeline_cores']:.0f} cores per branch "
           f"({b['pipeline_cores_per_rank']:.1f} per rank: each of the {i['gpus'] // i['branches']} ranks encodes its part)",
           f"beyond: one prefix for the whole run reaches 10 % at {x['branches_at_target']} branches ({x['gpus_at_target']:,.0f} GPUs), "
           f"3,500/s at {x['branches_at_limit']} branches ({x['gpus_at_limit']:,.0f} GPUs);",
           f"        one branch's prefix fills 3,500/s at {x['branch_ckpt_s_at_limit']:,.0f} checkpoints/s; without group commit "
           f"(flush_every 1) a branch makes {x['no_group_commit_write_s']:.1f} write requests/s", ""]
    out.append(f"{'checkpoints per branch':28}{'commits':>12}{'pages':>10}{'page':>10}{'top.json':>11}{'metadata':>11}{'open reads':>11}{'+resolve':>9}")
    for n, m in r["metadata"].items():
        out.append(f"{int(n):<28,}{m['commits']:>12,}{m['pages']:>10,}{_mb(m['page_bytes']):>10}{_mb(m['top_json_bytes']):>11}"
                   f"{_mb(m['metadata_bytes']):>11}{m['open_reads']:>11}{m['open_resolve_reads']:>9}")
    rr = r["restore"]
    out += ["", f"restore of any step: <= {rr['max_reads']} reads ({rr['blob_gets']} blob GETs, {rr['page_gets']} pages), "
                f"<= {rr['exact_decodes']} exact decodes + {rr['deltas']} deltas", "",
            f"S3 Standard us-east-1 list prices (${PRICE_GB_MONTH:g}/GB-month, PUT ${PRICE_PUT_PER_1000:g}/1k, "
            f"GET ${PRICE_GET_PER_1000:g}/1k, DELETE free):",
            f"  written {c['gb_written_per_day']:,.0f} GB/day; storage ${c['storage_usd_per_day_per_day_kept']:,.2f}/day for each day kept "
            f"(${c['storage_usd_per_day_after_30_days']:,.0f}/day once 30 days are kept); requests ${c['requests_usd_per_day']:,.2f}/day"]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", type=int, default=64)
    ap.add_argument("--branches", type=int, default=2)
    ap.add_argument("--steps-per-s", type=float, default=17.0)
    ap.add_argument("--checkpoint-every", type=int, default=1)
    ap.add_argument("--model", default="vit-b16", choices=sorted(MODELS))
    ap.add_argument("--params", type=int, default=None, help="override the model's parameter count")
    ap.add_argument("--state-bytes", type=float, default=None, help="bytes per checkpoint (overrides params and optimizer)")
    ap.add_argument("--optimizer", default="none", choices=sorted(OPTIMIZER_BUFFERS))
    ap.add_argument("--ratio", type=float, default=RATIO_MODEL)
    ap.add_argument("--ratio-optimizer", type=float, default=RATIO_OPTIMIZER)
    ap.add_argument("--flush-every", type=int, default=FLUSH_EVERY)
    ap.add_argument("--flush-seconds", type=float, default=FLUSH_SECONDS, help="0: no time window")
    ap.add_argument("--max-group-bytes", type=float, default=MAX_GROUP_BYTES)
    ap.add_argument("--key-every", type=int, default=KEY_EVERY)
    ap.add_argument("--standalone-every", type=int, default=STANDALONE_EVERY)
    ap.add_argument("--page-size", type=int, default=PAGE_SIZE)
    ap.add_argument("--pipeline-mb-s", type=float, default=PIPELINE_MB_S_PER_CORE)
    ap.add_argument("--parts", type=int, default=None, help="blobs per commit (default: the DDP world size, gpus / branches)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    r = simulate(gpus=a.gpus, branches=a.branches, steps_per_s=a.steps_per_s, checkpoint_every=a.checkpoint_every,
                 model=a.model, params=a.params, optimizer=a.optimizer, ratio=a.ratio, ratio_optimizer=a.ratio_optimizer,
                 flush_every=a.flush_every, flush_seconds=a.flush_seconds or None, max_group_bytes=a.max_group_bytes,
                 key_every=a.key_every, standalone_every=a.standalone_every, page_size=a.page_size,
                 state_bytes=a.state_bytes, pipeline_mb_s=a.pipeline_mb_s, parts=a.parts)
    print(json.dumps(r, indent=1) if a.json else render(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
