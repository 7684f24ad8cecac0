"""A run's figures, measured from what the store holds: the report dict (report.json's shape,
:mod:`raybranch.branches.metrics`) of one run.

Branches reported: ``main`` (the branch that trained every slice as it arrived — after a
quarantine of slice k that is ``main-poisoned-<k>``), ``clean`` and, after a quarantine,
``replay`` (the branch that replaced main). Per branch:

- accuracies of models restored from the store: at each slice end on its lineage
  (``per_slice_acc``; a slice it did not train keeps the previous value) and at its head;
- ``acc_full``: plain training (:mod:`.baselines`, no raybranch, no Delta-LoRA) of the same
  schedule from the branch point;
- bytes (:func:`raybranch.branches.accounting.attribute_bytes`): a branch is charged its own
  ledger documents and the blobs its own checkpoints reference (a blob referenced twice, once);
  history a fork shares stays with the branch that wrote it. The run total counts every
  checkpoint byte of the run once: the run's directory minus what is not checkpoint storage
  (run.json, slices/, marks/, records/, reports/, Ray's _ray/: ``excluded_bytes``).

Recovery (after a quarantine): instant recovery and replay times are those the quarantine
command measured; the oracle — the run's mechanism trained from the branch point on the
replay's schedule without checkpoints, "retrain from scratch without slice k" — is trained and
timed here, in this process.
"""
from __future__ import annotations

import time

from ..branches.accounting import attribute_bytes, torch_save_bytes
from ..branches.slices import slice_ends
from ..export import read_safetensors
from ..ledger.lineage import Lineage
from ..ledger.refs import read_link
from .baselines import train_plain
from .branch_training import slice_record_name
from .context import RunContext
from .ops import BRANCH_POINT_RECORD, CLEAN, MAIN, SERVED, branch_point_file, quarantines
from .spec import NON_LEDGER_DIRS, NON_LEDGER_FILES, read_json_or_none, record_key


def branch_point_model(ctx: RunContext):
    """The plain branch-point model (kept in ``records/`` by init) and its record."""
    model = ctx.base_model()
    rel = branch_point_file(ctx.run)
    model.load_state_dict(read_safetensors(ctx.store.read_bytes(rel), rel))
    return model, read_json_or_none(ctx.store, record_key(ctx.run, BRANCH_POINT_RECORD)) or {}


def excluded_bytes(ctx: RunContext) -> int:
    """Bytes under the run that are not checkpoint storage (see the module docstring)."""
    files = sum(info.size for info in (ctx.store.stat(f"{ctx.run}/{f}") for f in NON_LEDGER_FILES) if info is not None)
    return files + sum(ctx.store.total_bytes(f"{ctx.run}/{d}") for d in NON_LEDGER_DIRS)


class _Scores:
    """Test accuracy and attack success rate of checkpoints restored from the store, each measured
    once per (branch, step): a head is usually also a slice end, and the recovery figures are
    those of heads already measured. The last restored model is kept for its second figure."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self._acc: dict[tuple[str, int], float] = {}
        self._asr: dict[tuple[str, int], float | None] = {}
        self._last: tuple[tuple[str, int], object] | None = None

    def _model(self, key: tuple[str, int]):
        if self._last is None or self._last[0] != key:
            self._last = (key, self.ctx.restored(*key))
        return self._last[1]

    def acc(self, branch: str, step: int) -> float:
        key = (branch, int(step))
        if key not in self._acc:
            self._acc[key] = self.ctx.acc(self._model(key))
        return self._acc[key]

    def asr(self, branch: str, step: int) -> float | None:
        key = (branch, int(step))
        if key not in self._asr:
            self._asr[key] = self.ctx.asr(self._model(key))
        return self._asr[key]


def evaluate_run(ctx: RunContext, full: dict | None = None) -> dict:
    """The report dict of one run (see the module docstring). ``full``: plain-training baselines
    already measured for the same config (the demo's second mechanism reuses the first's)."""
    t_all = time.perf_counter()
    store, run, spec = ctx.store, ctx.run, ctx.spec
    done = [q for q in quarantines(store, run) if q.get("state") == "done"]
    q = done[-1] if done else None
    names = {"main": q["old_main"] if q else MAIN, "clean": CLEAN, **({"replay": MAIN} if q else {})}
    n = max([spec.n_dataset_slices, *spec.arrived(store)])
    bp, bp_info = branch_point_model(ctx)
    template = ctx.template()
    ts_bytes = torch_save_bytes(template)
    lineages = {label: Lineage(store, run, b) for label, b in names.items()}
    ends = {label: slice_ends(lin) for label, lin in lineages.items()}
    schedule = {label: sorted(e) for label, e in ends.items()}
    if full is None:
        full = {"main": train_plain(ctx, bp, schedule["main"], n, False, "full training (main's slices)"),
                "clean": train_plain(ctx, bp, schedule["clean"], n, False, "full training (clean's slices)")}
    full_of = {"main": full["main"], "clean": full["clean"]}
    if q:
        same = schedule["replay"] == schedule["clean"]
        full_of["replay"] = full["clean"] if same else train_plain(ctx, bp, schedule["replay"], n, False, "full training (replay's slices)")
    attributed, shared, total = attribute_bytes(store, run, list(names.values()))
    excluded = excluded_bytes(ctx)
    shared, total = shared - excluded, total - excluded
    scores = _Scores(ctx)
    branches = {}
    for label, b in names.items():
        ctx.hooks.phase(f"evaluate {label}")
        per_slice, prev = [], None
        for s in range(1, n + 1):
            if s in ends[label]:
                prev = scores.acc(b, ends[label][s])
            elif prev is None:
                prev = scores.acc(names["main"], 0)  # the branch point
            per_slice.append(prev)
        head = lineages[label].head_step
        a = attributed[b]
        ck_n, stored = a["checkpoints"], a["bytes_stored"]
        results = _slice_results(ctx, lineages[label], ends[label])
        branches[label] = {
            "branch": b,
            "compression_ratio": ck_n * ts_bytes / stored if stored else 0.0,
            "space_savings": 1.0 - stored / (ck_n * ts_bytes) if ck_n else 0.0,
            "bytes_stored": stored, "bytes_torch_save": ck_n * ts_bytes, "checkpoints": ck_n,
            "settle_checkpoints": a["settle_checkpoints"],
            "acc_restored": scores.acc(b, head), "acc_live": results[-1].get("acc_live") if results else None,
            "acc_full": full_of[label]["acc"], "per_slice_acc": per_slice, "per_slice_acc_full": full_of[label]["per_slice_acc"],
            "attack_success_rate": scores.asr(b, head), "slices_trained": [r["slice"] for r in results],
            "train_seconds": sum(r.get("seconds", 0.0) for r in results), "slice_results": results,
        }
    checkpoints = sum(a["checkpoints"] for a in attributed.values())
    mech = {"run": run, "mechanism": spec.mechanism, "lora_merge": spec.merge if spec.lora else None,
            "torch_save_bytes_per_checkpoint": ts_bytes, "branches": branches,
            "run_total": {"bytes_stored": total, "shared_bytes": shared, "checkpoints": checkpoints,
                          "settle_checkpoints": sum(a["settle_checkpoints"] for a in attributed.values()),
                          "compression_ratio": checkpoints * ts_bytes / total if total else 0.0, "excluded_bytes": excluded}}
    if q:
        mech["recovery"] = _recovery(ctx, scores, q, bp, schedule["replay"], n, lineages["main"].head_step)
    return {"config": ctx.cfg.as_dict(), "run": run, "store": store.uri,
            "data": {**ctx.data.sizes, "dataset": ctx.cfg.dataset, "image_size": ctx.data.meta.image_size,
                     "slices_arrived": sorted(spec.arrived(store))},
            "branch_point": bp_info, "full": full, "mechanisms": {spec.mechanism: mech},
            "links": {SERVED: _target(read_link(store, run, SERVED))},
            "log": [], "seconds": time.perf_counter() - t_all}


def _target(link) -> dict | None:
    return None if link is None else link.doc["target"]


def _slice_results(ctx: RunContext, lin: Lineage, ends: dict[int, int]) -> list[dict]:
    """The slice records of the slices the branch itself trained, in slice order."""
    out = []
    for s in sorted(ends):
        bid = lin.entry(ends[s])["branch_id"]
        if bid != lin.log.bid:
            continue
        rec = read_json_or_none(ctx.store, record_key(ctx.run, slice_record_name(bid, s)))
        out.append(rec or {"slice": s, "last_step": ends[s], "recovered_from_store": True})
    return out


def _recovery(ctx: RunContext, scores: _Scores, q: dict, bp, replay_schedule: list[int], n: int, old_main_head: int) -> dict:
    k = q["slice"]
    oracle = train_plain(ctx, bp, replay_schedule, n, ctx.spec.lora, f"oracle (retrain without slice {k})")
    instant, replay, old_main = (CLEAN, q["served"]["step"]), (MAIN, q["replay_step"]), (q["old_main"], old_main_head)
    return {
        "quarantined_slice": k, "replay_from_step": q["from_step"], "served": q["served"], "export": q["export"],
        "instant_seconds": q["instant_seconds"], "replay_seconds": q["replay_seconds"],
        "replay_wall_seconds": q.get("replay_wall_seconds"),
        "retrain_from_scratch_seconds": oracle["seconds"], "retrain_includes_branch_point": False,
        "acc_instant": scores.acc(*instant), "acc_replay": scores.acc(*replay), "acc_oracle": oracle["acc"],
        "asr_before": scores.asr(*old_main), "asr_after": scores.asr(*replay), "asr_instant": scores.asr(*instant),
        "asr_oracle": oracle["asr"],
        "instant_vs_retrain": q["instant_seconds"] / oracle["seconds"] if oracle["seconds"] > 0 else None,
        "instant_cpu_seconds": q["instant_cpu_seconds"], "retrain_from_scratch_cpu_seconds": oracle["cpu_seconds"],
    }


__all__ = ["branch_point_model", "evaluate_run", "excluded_bytes"]
