"""A branching incremental-training experiment (report §7): branch point, ``main`` and
``clean`` branches, a poisoned slice, quarantine with instant recovery and replay, the oracle.

Data. The training set is cut (stratified, disjoint, :func:`raybranch.data.make_slices`) into a
warm-up part (``warmup_fraction``), a validation part (``val_fraction``, early stopping only)
and the slices (``split``, e.g. 4×25 % of the rest). The test set is only for reporting.
Slices count from 1; ``poison_slice`` k is poisoned (a BadNets trigger on ``poison_rate`` of
its images, relabelled ``poison_target``, or label flipping) and is the one quarantined.

Branch point. A model trained from scratch on the warm-up part, one epoch at a time, until its
validation accuracy reaches ``branch_point_target`` (report: 74.6 % on MNIST) or
``branch_point_max_epochs`` pass. It is the step-0 snapshot of ``main`` (tag ``branch-point``);
``clean`` is a fork of ``main`` at step 0 (its first commit names the fork point: shared, not copied).

Per mechanism (``lc``: the LC codec on the whole model; ``lc+dlora``: Delta-LoRA on the
classifier Linears, checkpoints hold A, B and the non-LoRA tensors, the anchor once), in a run
of its own so ``store.total_bytes(run)`` is that mechanism's alone:

* main trains every slice as it arrives, clean only the verified ones (all but k), slice by
  slice side by side, a checkpoint every ``checkpoint_every`` steps, early stopping per slice;
* ``serve_snapshot``: clean's slice-end checkpoints are exact (key frames) even with
  ``slice_end="lossy"``, so its head — what instant recovery serves — restores bit for bit from
  its exact state, not after a chain of deltas; costs an exact checkpoint per slice end on
  clean only (on by default for both mechanisms; an exact checkpoint re-stores every exact
  tensor, the unchanged Delta-LoRA anchor included);
* quarantine(k): instant recovery = restore clean's head from the store (timed, cold reader);
  replay = fork main at ``step_before_slice(main, k)`` into ``replay`` and train slices k+1…
  (timed from the restore on); the oracle = the same mechanism trained from the branch point on
  every slice but k without checkpoints (timed: ``retrain_from_scratch_seconds``).

Plain full training (no raybranch, no Delta-LoRA) of main's schedule and of clean's schedule
gives ``acc_full``; for ``lc`` the oracle is that same training of clean's schedule, run again
next to the recovery so that its time is measured under the same machine load. Accuracies of
branches are those of models restored from the store.

Byte attribution (``compression_ratio`` per branch). Each mechanism has its own run. A branch is
charged its own ledger documents (its ref ``refs/branches/<name>.json`` and everything under
``branches/<id>/``: branch.json, commits, pages, top.json) and the blobs its own checkpoints
reference (a blob referenced more than once — the segment blob of a compacted page — is charged
once, to the first of main, clean, replay). History a fork shares — the branch point, main's
steps before the replay's fork — stays with the branch that wrote it; a fork pays only its ref
and its own commits. Layout documents, links and anything else under the run are
``shared_bytes``; the run-level ratio divides every checkpoint of the run by
``store.total_bytes(run)``, everything counted once.

    compression_ratio = checkpoints × bytes(torch.save(model.state_dict())) ÷ bytes_stored

``checkpoints`` counts training checkpoints (one per optimizer step, plus the branch point);
the ``settle`` checkpoints at slice ends (same state re-coded, see :mod:`raybranch.train.loop`)
are counted apart (``settle_checkpoints``): their bytes are in ``bytes_stored``, but they do
not add to the numerator.
    space_savings     = 1 − bytes_stored ÷ (checkpoints × bytes(torch.save(...)))

``torch.save`` is of the mechanism's live model (for Delta-LoRA: W, b, A, B and the rest —
what a plain checkpoint of that model would hold). State is model only: the optimizer is plain
SGD, whose checkpointed state is its JSON hyper-parameters (no tensors).
"""
from __future__ import annotations

import copy
import time

import torch
from torch import nn

from ..checkpoint.checkpointer import Checkpointer
from ..checkpoint.restore import Reader
from ..errors import RaybranchError
from ..ledger.lineage import Lineage
from ..lora import inject_delta_lora, merge_and_reinit_
from ..models import build_model
from ..poison import attack_success_rate
from ..store.store import Store, open_store
from ..train.loop import checkpoint_state, evaluate_accuracy, load_checkpoint, train_slice
from .accounting import attribute_bytes, torch_save_bytes
from .config import (
    BRANCH_KEYS, LORA_MERGE, MECHANISMS, POISON_KINDS, RECOVERY_KEYS, ExperimentConfig, Hooks, SplitData, prepare_data,
)
from .slices import BRANCH_POINT_TAG, step_before_slice


class Experiment:
    """Runs the whole comparison; ``run()`` returns the report dict (see :mod:`.report`)."""

    def __init__(self, config: ExperimentConfig, store: Store | str, hooks: Hooks | None = None):
        config.validate()
        self.cfg = config
        self.store = open_store(store) if isinstance(store, str) else store
        self.hooks = hooks or Hooks()
        self.log_lines: list[str] = []
        self.data: SplitData | None = None

    # -- small helpers -------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        self.log_lines.append(msg)
        self.hooks.log(msg)

    def acc(self, model: nn.Module) -> float:
        return evaluate_accuracy(model, *self.data.test)

    def val_acc(self, model: nn.Module) -> float:
        return evaluate_accuracy(model, *self.data.val)

    def asr(self, model: nn.Module) -> float | None:
        if self.cfg.poison != "backdoor":
            return None
        return attack_success_rate(model, *self.data.test, self.cfg.poison_target, size=self.cfg.trigger_size, value=self.data.trigger)

    def optimizer(self, model: nn.Module, lora: bool) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=self.cfg.lora_lr if lora else self.cfg.lr)

    def merge_generator(self, slice_id: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.cfg.seed * 7919 + 31 * slice_id + 5)

    def with_lora(self, model: nn.Module) -> nn.Module:
        m = copy.deepcopy(model)
        inject_delta_lora(m, self.cfg.lora_pattern, rank=self.cfg.lora_rank, scale=self.cfg.lora_scale,
                          generator=torch.Generator().manual_seed(self.cfg.seed + 1))
        return m

    def train(self, model, opt, k: int, ckpt, step0: int, merge: str = "none", end_snapshot: bool = False):
        """One slice on one branch (+ the merge policy at its end)."""
        res = train_slice(
            model, opt, self.data.slices[k - 1], epochs=self.cfg.epochs, batch_size=self.cfg.batch_size,
            ckpt=ckpt, step0=step0, slice_id=k, eval_fn=self.val_acc, patience=self.cfg.patience or None,
            checkpoint_every=self.cfg.checkpoint_every, settle=self.cfg.settle, end_snapshot=end_snapshot, seed=self.cfg.seed, on_step=self.hooks.step, log=self.log,
        )
        if merge == "slice-end":
            merge_and_reinit_(model, self.merge_generator(k))
        return res

    # -- phases --------------------------------------------------------------------------------
    def branch_point(self) -> tuple[nn.Module, dict]:
        cfg = self.cfg
        self.hooks.phase("branch point")
        torch.manual_seed(cfg.seed)
        meta = self.data.meta
        model = build_model(cfg.model, meta.num_classes, meta.in_channels, meta.image_size)
        opt = self.optimizer(model, False)
        t0 = time.perf_counter()
        epochs, val = 0, self.val_acc(model)
        while val < cfg.branch_point_target and epochs < cfg.branch_point_max_epochs:
            train_slice(model, opt, self.data.warmup, epochs=1, batch_size=cfg.batch_size, ckpt=None,
                        step0=0, slice_id=0, seed=cfg.seed + 1000 * epochs, on_step=self.hooks.step)
            epochs += 1
            val = self.val_acc(model)
        info = {"epochs": epochs, "val_acc": val, "acc": self.acc(model), "seconds": time.perf_counter() - t0,
                "reached_target": val >= cfg.branch_point_target}
        self.log(f"branch point: {epochs} epochs on the warm-up part, val {val:.3f}, test {info['acc']:.3f}")
        return model, info

    def plain(self, start: nn.Module, slices: list[int], lora: bool, label: str) -> dict:
        """Train a copy of ``start`` on ``slices`` without checkpoints (full training / oracle)."""
        self.hooks.phase(label)
        model = self.with_lora(start) if lora else copy.deepcopy(start)
        opt = self.optimizer(model, lora)
        merge = self.cfg.lora_merge if lora else "none"
        t0, c0 = time.perf_counter(), time.process_time()
        per_slice, step, prev = [], 0, self.acc(model)
        for k in range(1, len(self.data.slices) + 1):
            if k in slices:
                step = self.train(model, opt, k, None, step, merge).last_step
                prev = self.acc(model)
            per_slice.append(prev)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {"acc": per_slice[-1], "per_slice_acc": per_slice, "seconds": secs, "cpu_seconds": cpu,
                "asr": self.asr(model), "steps": step}

    def run_name(self, mech: str, lora_merge: str | None) -> tuple[bool, str, str]:
        """(Delta-LoRA?, merge policy, run name) of a mechanism: runs are ``<name>-lc``, ``<name>-lc-dlora``…"""
        lora = mech == "lc+dlora"
        merge = (lora_merge or self.cfg.lora_merge) if lora else "none"
        suffix = "" if lora_merge is None else f"-merge-{merge}"
        return lora, merge, f"{self.cfg.name}-{mech.replace('+', '-')}{suffix}"

    def run_mechanism(self, mech: str, bp: nn.Module, full: dict, lora_merge: str | None = None,
                      branches_only: tuple[str, ...] | None = None) -> dict:
        cfg = self.cfg
        lora, merge, run = self.run_name(mech, lora_merge)
        if self.store.list(run, recursive=True):
            raise RaybranchError(f"run {run!r} already exists in {self.store.uri}; use a fresh store or another name")
        n = len(self.data.slices)
        k_bad = cfg.poison_slice
        verified = [k for k in range(1, n + 1) if k != k_bad]
        ck_kwargs = cfg.checkpointer_kwargs()
        template = self.with_lora(bp) if lora else copy.deepcopy(bp)
        ts_bytes = torch_save_bytes(template)

        main_ck = Checkpointer(self.store, run, "main", **ck_kwargs)
        main_model = copy.deepcopy(template)
        main_opt = self.optimizer(main_model, lora)
        state, extra = checkpoint_state(main_model, lora)
        # with the optimizer, so that the training checkpoints share its layout (a new layout
        # would start a new snapshot)
        main_ck.save(0, state, main_opt, extra, tags=[BRANCH_POINT_TAG])
        branches = {"main": {"ck": main_ck, "model": main_model, "opt": main_opt,
                             "step": 0, "slices": list(range(1, n + 1)), "per_slice": [], "results": []}}
        if branches_only is None or "clean" in branches_only:
            clean_ck = main_ck.fork("clean", step=0)
            clean_model = copy.deepcopy(template)
            branches["clean"] = {"ck": clean_ck, "model": clean_model, "opt": self.optimizer(clean_model, lora),
                                 "step": 0, "slices": verified, "per_slice": [], "results": []}
        train_s = {b: 0.0 for b in branches}
        for k in range(1, n + 1):  # side by side: slice k reaches every branch before slice k+1
            for b, br in branches.items():
                self.hooks.phase(f"{mech} {b} slice {k}")
                t0 = time.perf_counter()
                if k in br["slices"]:
                    res = self.train(br["model"], br["opt"], k, br["ck"], br["step"], merge,
                                     end_snapshot=cfg.exact_slice_end(mech, b))
                    br["step"] = res.last_step
                    br["results"].append(_slice_summary(res))
                    restored = self.restored(template, br["ck"], br["step"])
                    br["per_slice"].append(self.acc(restored))
                else:  # not verified: the branch does not move; its accuracy is unchanged
                    br["per_slice"].append(br["per_slice"][-1] if br["per_slice"] else self.acc(self.restored(template, br["ck"], 0)))
                train_s[b] += time.perf_counter() - t0
        for br in branches.values():
            br["ck"].close()

        if branches_only is not None:
            rep = {}
        else:
            rep = self.quarantine(mech, run, template, main_ck, merge, lora, verified, ck_kwargs)
        for b, br in branches.items():
            br["acc_live"] = self.acc(br["model"])
            br["train_seconds"] = train_s[b]
        out = self.summarize(run, mech, merge if lora else None, template, main_ck, branches, rep, full, k_bad, n, ts_bytes)
        out["timings"] = {b: dict(br["ck"].timings) for b, br in branches.items()}
        if rep:
            out["recovery"] = rep
        return out

    def summarize(self, run: str, mech: str, lora_merge: str | None, template: nn.Module, main_ck: Checkpointer,
                  branches: dict, rep: dict, full: dict, k_bad: int, n: int, ts_bytes: int, exclude: str | None = None) -> dict:
        """Per-branch figures of a mechanism's run (report.json's ``branches`` and ``run_total``).

        ``branches[b]`` holds per_slice, slices, results, acc_live and train_seconds of each trained
        branch; replay's come from ``rep`` (the quarantine). Bytes under ``<run>/<exclude>`` (Ray's
        bookkeeping) are not checkpoint storage and are left out of the totals.
        """
        out: dict = {"run": run, "mechanism": mech, "lora_merge": lora_merge,
                     "torch_save_bytes_per_checkpoint": ts_bytes, "branches": {}}
        attributed, shared, total = attribute_bytes(self.store, run, list(branches) + (["replay"] if rep else []))
        excluded = self.store.total_bytes(f"{run}/{exclude}") if exclude else 0
        shared, total = shared - excluded, total - excluded
        heads = {b: self.restored(template, Checkpointer(self.store, run, b), None) for b in attributed}
        clean_full = full.get("clean", full["main"])
        full_of = {"main": full["main"], "clean": clean_full, "replay": clean_full}
        for b, a in attributed.items():
            ck_n, stored = a["checkpoints"], a["bytes_stored"]
            br = branches.get(b)
            if br is not None:
                per_slice = br["per_slice"]
            else:  # replay: main's accuracy before slice k, unchanged at k, its own after
                before = branches["main"]["per_slice"][: k_bad - 1]
                at_k = before[-1] if before else self.acc(self.restored(template, main_ck, 0))
                per_slice = [*before, at_k, *rep.pop("_replay_per_slice")]
            out["branches"][b] = {
                "compression_ratio": ck_n * ts_bytes / stored,
                "space_savings": 1.0 - stored / (ck_n * ts_bytes),
                "bytes_stored": stored,
                "bytes_torch_save": ck_n * ts_bytes,
                "checkpoints": ck_n,
                "settle_checkpoints": a["settle_checkpoints"],
                "acc_restored": self.acc(heads[b]),
                "acc_live": br["acc_live"] if br else rep.pop("_replay_acc_live"),
                "acc_full": full_of[b]["acc"],
                "per_slice_acc": per_slice,
                "per_slice_acc_full": full_of[b]["per_slice_acc"],
                "attack_success_rate": self.asr(heads[b]),
                "slices_trained": br["slices"] if br else list(range(k_bad + 1, n + 1)),
                "train_seconds": br["train_seconds"] if br else rep.get("replay_seconds"),
                "slice_results": br["results"] if br else rep.pop("_replay_results"),
            }
        checkpoints = sum(a["checkpoints"] for a in attributed.values())
        out["run_total"] = {
            "bytes_stored": total, "shared_bytes": shared,
            "checkpoints": checkpoints,
            "settle_checkpoints": sum(a["settle_checkpoints"] for a in attributed.values()),
            "compression_ratio": checkpoints * ts_bytes / total,
        }
        if exclude:
            out["run_total"]["excluded_bytes"] = excluded
        return out

    def restored(self, template: nn.Module, ck: Checkpointer, step: int | None) -> nn.Module:
        """The model of ``ck``'s branch at ``step`` (None: its head now), read from the store."""
        model = copy.deepcopy(template)
        load_checkpoint(model, ck.restore(step))
        return model

    def quarantine(self, mech, run, template, main_ck, merge, lora, verified, ck_kwargs) -> dict:
        """Instant recovery, replay and the oracle for slice ``poison_slice``."""
        cfg = self.cfg
        k = cfg.poison_slice
        n = len(self.data.slices)
        self.hooks.phase(f"{mech} quarantine slice {k}")
        t0, c0 = time.perf_counter(), time.process_time()
        reader = Reader(self.store, run)  # cold: nothing cached
        instant = copy.deepcopy(template)
        load_checkpoint(instant, reader.restore("clean"))
        instant_s, instant_cpu = time.perf_counter() - t0, time.process_time() - c0

        self.hooks.phase(f"{mech} replay without slice {k}")
        t0 = time.perf_counter()
        from_step = step_before_slice(Lineage(self.store, run, "main"), k)
        rp_ck = main_ck.fork("replay", step=from_step)
        model = copy.deepcopy(template)
        opt = self.optimizer(model, lora)
        load_checkpoint(model, rp_ck.restore(), opt)
        if merge == "slice-end" and k > 1:  # main merged after the slice end it was forked at
            merge_and_reinit_(model, self.merge_generator(k - 1))
        step, results = from_step, []
        for s in range(k + 1, n + 1):
            res = self.train(model, opt, s, rp_ck, step, merge, end_snapshot=cfg.exact_slice_end(mech, "replay"))
            step = res.last_step
            results.append(_slice_summary(res))
        rp_ck.close()
        replay_s = time.perf_counter() - t0
        replay_head = self.restored(template, rp_ck, None)
        replay_per = [self.acc(self.restored(template, rp_ck, _slice_end_step(results, s))) for s in range(k + 1, n + 1)]
        # timed here, next to the recovery it is compared with (for lc it repeats plain full
        # training of clean's schedule: same model, same result, a fresh timing)
        oracle = self.plain(self.bp_model, verified, lora, f"{mech} oracle (retrain without slice {k})")
        main_head = self.restored(template, main_ck, None)
        return {
            "quarantined_slice": k,
            "replay_from_step": from_step,
            "instant_seconds": instant_s,
            "replay_seconds": replay_s,
            "retrain_from_scratch_seconds": oracle["seconds"],
            "retrain_includes_branch_point": False,
            "acc_instant": self.acc(instant),
            "acc_replay": self.acc(replay_head),
            "acc_oracle": oracle["acc"],
            "asr_before": self.asr(main_head),
            "asr_after": self.asr(replay_head),
            "asr_instant": self.asr(instant),
            "asr_oracle": oracle["asr"],
            "instant_vs_retrain": instant_s / oracle["seconds"] if oracle["seconds"] > 0 else None,
            # CPU time of this process: less sensitive than wall time to other load on the machine
            "instant_cpu_seconds": instant_cpu,
            "retrain_from_scratch_cpu_seconds": oracle["cpu_seconds"],
            "_replay_per_slice": replay_per,
            "_replay_acc_live": self.acc(model),
            "_replay_results": results,
        }

    def run(self) -> dict:
        cfg = self.cfg
        t_all = time.perf_counter()
        self.data = prepare_data(cfg)
        n = len(self.data.slices)
        self.bp_model, bp = self.branch_point()
        verified = [k for k in range(1, n + 1) if k != cfg.poison_slice]
        self.full = {
            "main": self.plain(self.bp_model, list(range(1, n + 1)), False, "full training (main's slices)"),
            "clean": self.plain(self.bp_model, verified, False, "full training (clean's slices) = LC oracle"),
        }
        mechs = {}
        for m in cfg.mechanisms:
            mechs[m] = self.run_mechanism(m, self.bp_model, self.full)
            for line in _summary_lines(m, mechs[m]):
                self.log(line)
        extra = {}
        if cfg.compare_lora_merge and "lc+dlora" in cfg.mechanisms:
            other = "slice-end" if cfg.lora_merge == "none" else "none"
            alt = self.run_mechanism("lc+dlora", self.bp_model, self.full, lora_merge=other, branches_only=("main",))
            main_alt, main_cur = alt["branches"]["main"], mechs["lc+dlora"]["branches"]["main"]
            extra["lora_merge_comparison"] = {
                "branch": "main",
                cfg.lora_merge: {k: main_cur[k] for k in ("compression_ratio", "acc_restored", "bytes_stored", "checkpoints")},
                other: {k: main_alt[k] for k in ("compression_ratio", "acc_restored", "bytes_stored", "checkpoints")},
                "chosen": cfg.lora_merge,
            }
        return {
            "config": cfg.as_dict(),
            "store": self.store.uri,
            "data": {**self.data.sizes, "dataset": cfg.dataset, "image_size": self.data.meta.image_size},
            "branch_point": bp,
            "full": {b: {k: v for k, v in f.items()} for b, f in self.full.items()},
            "mechanisms": mechs,
            **extra,
            "log": self.log_lines,
            "seconds": time.perf_counter() - t_all,
        }


def _slice_end_step(results: list[dict], slice_id: int) -> int:
    return next(r["last_step"] for r in results if r["slice"] == slice_id)


def _slice_summary(res) -> dict:
    return {"slice": res.slice_id, "first_step": res.step0 + 1, "last_step": res.last_step, "steps": res.steps,
            "epochs": res.epochs, "stopped_early": res.stopped_early, "best_val_acc": res.best_metric,
            "rollbacks": res.rollbacks, "seconds": res.seconds}


def _summary_lines(mech: str, r: dict) -> list[str]:
    lines = []
    for b, v in r["branches"].items():
        asr = v["attack_success_rate"]
        lines.append(f"{mech:9s} {b:7s} ratio {v['compression_ratio']:7.1f}x  acc restored {v['acc_restored']:.4f} / full {v['acc_full']:.4f}"
                     + ("" if asr is None else f"  ASR {asr:.3f}"))
    rec = r.get("recovery")
    if rec:
        lines.append(f"{mech:9s} recovery: instant {rec['instant_seconds'] * 1000:.1f} ms, replay {rec['replay_seconds']:.2f} s, "
                     f"retrain {rec['retrain_from_scratch_seconds']:.2f} s; acc replay {rec['acc_replay']:.4f} vs oracle {rec['acc_oracle']:.4f}")
    return lines


def run_experiment(config: ExperimentConfig, store_uri: str, out_dir: str | None = None, hooks: Hooks | None = None) -> dict:
    """Run the experiment into ``store_uri``; with ``out_dir`` also write the report there."""
    result = Experiment(config, store_uri, hooks).run()
    if out_dir is not None:
        from .report import write_report

        write_report(result, out_dir)
    return result


__all__ = [  # the configuration, data and byte accounting live in .config and .accounting; importable from here too
    "BRANCH_KEYS",
    "LORA_MERGE",
    "MECHANISMS",
    "POISON_KINDS",
    "RECOVERY_KEYS",
    "Experiment",
    "ExperimentConfig",
    "Hooks",
    "SplitData",
    "attribute_bytes",
    "prepare_data",
    "run_experiment",
    "torch_save_bytes",
]
