"""The branching experiment (report §7) as a short script over the run operations — what
``raybranch demo`` and ``jobs/branches.py`` run, in this process or on Ray Train workers
(``runner``).

Per mechanism (``lc``; ``lc+dlora``: Delta-LoRA on the classifier Linears), in a run of its own
``<name>-<mechanism>`` so that the run's bytes are that mechanism's alone:

1. ``init``: the branch point (trained once, for the first mechanism; the others start from
   its weights), main and clean;
2. slices 1…n arrive one by one; main trains each as it arrives; every slice but the poisoned
   one k is marked verified once it has trained, and clean trains the verified slices in order
   (waiting at k, which nobody has decided yet);
3. after the last slice has trained, k is marked poisoned (clean skips it and catches up);
4. ``quarantine k``: instant recovery (served → clean's head) and replay (main forked at the
   end of slice k−1, trained on the later slices), which becomes main;
5. the run's report (:func:`raybranch.runs.evaluate.evaluate_run`, with the oracle) goes into
   ``<run>/reports/``.

The experiment's report combines the mechanisms (report.json's ``mechanisms.<mech>``) and lands
in ``_reports/<name>/`` of the store, and in ``out_dir`` when given. ``compare_lora_merge``
also trains main of ``lc+dlora`` with the other merge policy (a third run) and records both.

Plain full training of main's and clean's schedules (``full``) is measured once, in the first
run, and reused: every run has the same branch point, data and seeds.
"""
from __future__ import annotations

import dataclasses
import time

from ..branches.data import Hooks
from ..branches.metrics import summary_lines
from ..config.classes import ExperimentConfig
from ..export import read_safetensors
from ..store.store import Store, open_store
from .context import RunContext
from .evaluate import evaluate_run
from .ops import branch_point_file, init_run, mark_slice, quarantine, train_slice
from .reports import publish, run_reports, shared_reports
from .runner import LocalRunner, Runner


def run_name(cfg: ExperimentConfig, mech: str, lora_merge: str | None = None) -> str:
    """``<name>-lc``, ``<name>-lc-dlora``, ``<name>-lc-dlora-merge-<policy>``."""
    suffix = "" if lora_merge is None else f"-merge-{lora_merge}"
    return f"{cfg.name}-{mech.replace('+', '-')}{suffix}"


def run_workflow(store: Store, run: str, cfg: ExperimentConfig, mech: str, runner: Runner, hooks: Hooks,
                 start_from: str | None = None, quarantine_slice: int | None = None) -> dict:
    """Steps 1–4 of the module docstring on one run; returns the quarantine record (or None)."""
    start = None
    if start_from is not None:
        rel = branch_point_file(start_from)
        start = read_safetensors(store.read_bytes(rel), rel)
    init_run(store, run, cfg, mech, start=start, start_source=None if start_from is None else f"run:{start_from}", hooks=hooks)
    n = RunContext(store, run).spec.n_dataset_slices
    for k in range(1, n + 1):
        train_slice(store, run, k, runner, hooks=hooks)
        if quarantine_slice is not None and k != quarantine_slice:
            mark_slice(store, run, k, "verified", runner, hooks=hooks, catch_up=k == n)
    if quarantine_slice is None:
        return None
    mark_slice(store, run, quarantine_slice, "poisoned", runner, hooks=hooks)
    return quarantine(store, run, quarantine_slice, runner, hooks=hooks)


def run_experiment(config: ExperimentConfig, store_uri: str | Store, out_dir: str | None = None, hooks: Hooks | None = None,
                   runner: Runner | None = None) -> dict:
    """Run the experiment into the store; returns the combined report dict (see the module docstring)."""
    t_all = time.perf_counter()
    config.validate()
    store = open_store(store_uri) if isinstance(store_uri, str) else store_uri
    runner = runner or LocalRunner()
    hooks = hooks or Hooks()
    log_lines: list[str] = []
    log = Hooks(phase=hooks.phase, step=hooks.step, log=lambda m: (log_lines.append(m), hooks.log(m)))
    combined: dict | None = None
    first: str | None = None
    for mech in config.mechanisms:
        run = run_name(config, mech)
        run_workflow(store, run, config, mech, runner, log, start_from=first, quarantine_slice=config.poison_slice)
        ctx = RunContext(store, run, hooks=log)
        result = evaluate_run(ctx, full=None if combined is None else combined["full"])
        publish(store, run_reports(run), result)
        for line in summary_lines(result):
            log.log(line)
        if combined is None:
            combined, first = result, run
        else:
            combined["mechanisms"].update(result["mechanisms"])
    extra = {}
    if config.compare_lora_merge and "lc+dlora" in config.mechanisms:
        other = "slice-end" if config.lora_merge == "none" else "none"
        cfg = dataclasses.replace(config, lora_merge=other)
        run = run_name(config, "lc+dlora", other)
        run_workflow(store, run, cfg, "lc+dlora", runner, log, start_from=first)
        alt = evaluate_run(RunContext(store, run, hooks=log), full=combined["full"])
        fields = ("compression_ratio", "acc_restored", "bytes_stored", "checkpoints")
        main_alt, main_cur = alt["mechanisms"]["lc+dlora"]["branches"]["main"], combined["mechanisms"]["lc+dlora"]["branches"]["main"]
        extra["lora_merge_comparison"] = {"branch": "main", "run": run, config.lora_merge: {k: main_cur[k] for k in fields},
                                          other: {k: main_alt[k] for k in fields}, "chosen": config.lora_merge}
    combined.update(extra, config=config.as_dict(), log=log_lines, seconds=time.perf_counter() - t_all, runner=runner.name,
                    runs=[r["run"] for r in combined["mechanisms"].values()])
    combined["reports"] = publish(store, shared_reports(config.name), combined, out_dir)
    return combined


__all__ = ["run_experiment", "run_name", "run_workflow"]
