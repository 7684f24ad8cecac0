"""The figures of a run's report and how they are judged: the report.json contract
(:data:`BRANCH_KEYS`, :data:`RECOVERY_KEYS`), the targets measured against them
(:func:`targets`) and the one-line summaries printed per branch (:func:`summary_lines`).

    compression_ratio = checkpoints × bytes(torch.save(model.state_dict())) ÷ bytes_stored
    space_savings     = 1 − bytes_stored ÷ (checkpoints × bytes(torch.save(...)))

Accuracies are shares in [0, 1]; the report prints them as percentages.
"""
from __future__ import annotations

BRANCH_KEYS = (
    "compression_ratio", "space_savings", "bytes_stored", "bytes_torch_save", "checkpoints",
    "acc_restored", "acc_full", "per_slice_acc", "attack_success_rate",
)
RECOVERY_KEYS = (
    "instant_seconds", "replay_seconds", "retrain_from_scratch_seconds", "acc_replay", "acc_oracle",
    "asr_before", "asr_after",
)


def targets(result: dict) -> list[dict]:
    """The issue's targets, measured: {"what", "value", "target", "met"} per line."""
    out = []
    mechs = result["mechanisms"]
    lc = mechs.get("lc")
    if lc:
        m = lc["branches"]["main"]
        gap = abs(m["acc_restored"] - m["acc_full"]) * 100
        out.append({"what": "LC main: acc gap restored vs full, absolute (pp)", "value": gap, "target": "≤ 0.1", "met": gap <= 0.1 + 1e-9})
        out.append({"what": "LC main: compression ratio (×)", "value": m["compression_ratio"], "target": "≥ 50", "met": m["compression_ratio"] >= 50})
    dl = mechs.get("lc+dlora")
    if dl:
        m = dl["branches"]["main"]
        gap = (m["acc_full"] - m["acc_restored"]) * 100
        out.append({"what": "LC+dLoRA main: acc full − restored (pp)", "value": gap, "target": "≤ 1", "met": gap <= 1 + 1e-9})
        out.append({"what": "LC+dLoRA main: compression ratio (×)", "value": m["compression_ratio"], "target": "≥ 100", "met": m["compression_ratio"] >= 100})
    for name, r in mechs.items():
        rec = r.get("recovery")
        if not rec:
            continue
        clean_asr = r["branches"]["clean"]["attack_success_rate"]
        if rec["asr_after"] is not None and clean_asr is not None:
            d = (rec["asr_after"] - clean_asr) * 100
            out.append({"what": f"{name}: ASR after replay − clean's (pp)", "value": d, "target": "≤ 2", "met": d <= 2 + 1e-9})
        d = abs(rec["acc_replay"] - rec["acc_oracle"]) * 100
        out.append({"what": f"{name}: acc gap replay vs oracle, absolute (pp)", "value": d, "target": "≤ 0.5", "met": d <= 0.5 + 1e-9})
        share = 100 * rec["instant_seconds"] / rec["retrain_from_scratch_seconds"]
        out.append({"what": f"{name}: instant recovery / retrain time, wall (%)", "value": share, "target": "≤ 1", "met": share <= 1})
        if rec.get("retrain_from_scratch_cpu_seconds"):
            share = 100 * rec["instant_cpu_seconds"] / rec["retrain_from_scratch_cpu_seconds"]
            out.append({"what": f"{name}: instant recovery / retrain time, process CPU (%)", "value": share, "target": "≤ 1", "met": share <= 1})
    return out


def summary_lines(result: dict) -> list[str]:
    """One line per branch and one per recovery, for every mechanism of ``result``."""
    lines = []
    for mech, r in result["mechanisms"].items():
        for b, v in r["branches"].items():
            asr = v["attack_success_rate"]
            lines.append(f"{mech:9s} {b:7s} ratio {v['compression_ratio']:7.1f}x  acc restored {v['acc_restored']:.4f} / full {v['acc_full']:.4f}"
                         + ("" if asr is None else f"  ASR {asr:.3f}"))
        rec = r.get("recovery")
        if rec:
            lines.append(f"{mech:9s} recovery: instant {rec['instant_seconds'] * 1000:.1f} ms, replay {rec['replay_seconds']:.2f} s, "
                         f"retrain {rec['retrain_from_scratch_seconds']:.2f} s; acc replay {rec['acc_replay']:.4f} vs oracle {rec['acc_oracle']:.4f}")
    return lines


__all__ = ["BRANCH_KEYS", "RECOVERY_KEYS", "summary_lines", "targets"]
