"""The branching experiment as a script over the run operations (raybranch.runs.experiment): a
poisoned slice raising the attack success rate on main, quarantine removing it, the figures
adding up; bad configs named in one line."""
from __future__ import annotations

import pytest
import torch

import raybranch as rb
from raybranch.branches.metrics import BRANCH_KEYS, RECOVERY_KEYS
from raybranch.branches.slices import step_before_slice
from raybranch.config.classes import ExperimentConfig
from raybranch.errors import RaybranchError
from raybranch.ledger import Lineage
from raybranch.runs.experiment import run_experiment

torch.set_num_threads(1)


def test_poisoned_slice_raises_asr_on_main_and_quarantine_removes_it(tmp_path):
    """LeNet-5 on digits, backdoor in slice 3, LC only, no early stopping (fixed epochs)."""
    cfg = ExperimentConfig(mechanisms=("lc",), epochs=5, patience=0, poison_rate=0.3, name="t")
    r = run_experiment(cfg, (tmp_path / "store").as_uri())
    lc = r["mechanisms"]["lc"]
    br, rec = lc["branches"], lc["recovery"]
    assert set(br) == {"main", "clean", "replay"}
    for v in br.values():
        assert all(k in v for k in BRANCH_KEYS)
    assert all(k in rec for k in RECOVERY_KEYS)
    clean_asr = br["clean"]["attack_success_rate"]
    assert rec["asr_before"] == br["main"]["attack_success_rate"]
    assert rec["asr_before"] >= clean_asr + 0.2, (rec["asr_before"], clean_asr)  # poisoning poisons (0.35 here)
    assert rec["asr_after"] <= clean_asr + 0.02  # replay without slice 3 removes it
    assert rec["asr_instant"] == clean_asr
    assert abs(rec["acc_replay"] - rec["acc_oracle"]) <= 0.02
    assert rec["acc_replay"] >= 0.85
    # the replay forked the old main (kept as main-poisoned-3) at the end of slice 2
    old_main = Lineage(rb.open_store((tmp_path / "store").as_uri()), "t-lc", "main-poisoned-3")
    assert rec["replay_from_step"] == step_before_slice(old_main, 3)
    # every checkpoint counted once: the per-branch figures add up to the run's
    t = lc["run_total"]
    assert sum(v["bytes_stored"] for v in br.values()) + t["shared_bytes"] == t["bytes_stored"]
    assert sum(v["checkpoints"] for v in br.values()) == t["checkpoints"]
    assert br["main"]["compression_ratio"] > 10
    # restored from the store (settled slice ends) = trained without raybranch, on main
    assert abs(br["main"]["acc_restored"] - br["main"]["acc_full"]) <= 1 / r["data"]["test"] + 1e-9
    assert len(br["main"]["per_slice_acc"]) == 4 and br["clean"]["per_slice_acc"][2] == br["clean"]["per_slice_acc"][1]


def test_config_errors_name_the_bad_input(tmp_path):
    for kwargs, msg in [
        ({"poison_slice": 5}, "poison_slice 5"),
        ({"mechanisms": ("lc", "zip")}, "mechanisms"),
        ({"poison": "gas"}, "poison must be"),
        ({"lora_merge": "sometimes"}, "lora_merge"),
        ({"warmup_fraction": 0.95}, "warmup_fraction"),
        ({"patience": -1}, "patience"),
    ]:
        with pytest.raises(RaybranchError, match=msg):
            run_experiment(ExperimentConfig(**kwargs), (tmp_path / "s").as_uri())
