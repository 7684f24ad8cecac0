"""The Ray Tune sweep (raybranch.cluster.sweep) on a real local Ray: a tiny grid writes its CSV,
Markdown and PNG with one row per trial, each trial in its own run of the store; ASHA stops
trials by share of data trained."""
from __future__ import annotations

import csv

import pytest
import torch

import raybranch as rb
from raybranch.ledger.verify import verify_store
from raybranch.cli.main import main as cli_main
from raybranch.cluster.sweep import CSV_COLUMNS, run_sweep, trial_grid, trial_tag
from raybranch.config import load_sweep_config

torch.set_num_threads(1)
QUICK = "jobs/configs/sweep-quick.yaml"


pytestmark = pytest.mark.usefixtures("local_ray")


def test_grid_has_one_lc_trial_per_combination_and_every_rank_for_delta_lora():
    cfg = load_sweep_config("jobs/configs/sweep.yaml")
    grid = trial_grid(cfg)
    assert len(grid) == 4 * (1 + 5)  # 4 splits × (LC once + LC+dLoRA at ranks 1, 2, 4, 8, 16)
    assert {p["rank"] for p in grid if p["mechanism"] == "lc"} == {None}
    assert sorted(p["rank"] for p in grid if p["mechanism"] == "lc+dlora" and p["split"] == "20x5") == [1, 2, 4, 8, 16]
    tags = [trial_tag(p) for p in grid]
    assert len(set(tags)) == len(tags)
    assert "70-10-10-10-lc-dlora-r16-b3-snone" in tags
    assert len(trial_grid(load_sweep_config("jobs/configs/sweep.yaml", ["dedupe_lc=false"]))) == 4 * 10


def test_tiny_sweep_writes_one_row_per_trial(tmp_path, capsys):
    out = tmp_path / "out"
    uri = (tmp_path / "store").as_uri()
    # through the CLI: rank 2 × {lc, lc+dlora} × lora_lr {0.1, 0.2} (a grid key), lc once → 3 trials
    rc = cli_main(["sweep", QUICK, f"out={out}", f"store={uri}", "ranks=[2]", "name=sw", "grid={lora_lr: [0.1, 0.2]}"])
    assert rc == 0
    assert "results:" in capsys.readouterr().out
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [*CSV_COLUMNS, "lora_lr"]
    assert [(r["mechanism"], r["rank"], r["lora_lr"]) for r in rows] == [
        ("lc", "", ""), ("lc+dlora", "2", "0.1"), ("lc+dlora", "2", "0.2")]
    store = rb.open_store(uri)
    for r in rows:
        assert r["status"] == "done" and r["split"] == "4x25" and r["bits"] == "3" and r["model"] == "lenet5"
        ratio, savings = float(r["compression_ratio"]), float(r["space_savings"])
        assert ratio > 5 and savings == pytest.approx(1 - 1 / ratio)
        assert 0 < float(r["acc_restored"]) <= 1 and 0 < float(r["acc_full"]) <= 1
        rep = verify_store(store, r["run"])  # each trial is a run of its own
        assert rep.problems == [] and rep.counts["steps"] == int(r["checkpoints"])
        doc = store.read_json(f"{r['run']}/run.json")  # the trial trained with its grid value
        if r["lora_lr"]:
            assert doc["experiment"]["lora_lr"] == float(r["lora_lr"])
    md = (out / "results.md").read_text()
    assert "| setting | splits | worst split Δ̄ (pp) | lowest mean ratio | meets target |" in md
    assert "## Shape of the report's Table 9 (by split)" in md and "Table 3" not in md  # one model: no Table 3
    for lr in ("0.1", "0.2"):
        assert md.count(f"| lc+dlora r2 b3 lr={lr} | 4x25 | 1/1 |") == 1  # means over seeds: n = 1 here
    png = (out / "ratio_vs_accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_asha_stops_lagging_trials_by_share_of_data(tmp_path):
    cfg = load_sweep_config(QUICK, ["scheduler=asha", "asha_grace_percent=25", "asha_reduction_factor=2",
                                    "mechanisms=[lc+dlora]", "ranks=[1,16]", "name=asha", "max_concurrent=1"])
    r = run_sweep(cfg, store_uri=(tmp_path / "store").as_uri(), out_dir=str(tmp_path / "out"), log=lambda m: None)
    statuses = [row["status"] for row in r["rows"]]
    assert len(statuses) == 2
    assert statuses.count("done") >= 1
    # a stopped trial has no final figures and says where it stopped; a finished one has them
    for row in r["rows"]:
        if row["status"] == "done":
            assert row["compression_ratio"] > 1 and row["acc_restored"] is not None
        else:
            assert row["status"].startswith("stopped by ASHA at") and row["compression_ratio"] is None
    assert (tmp_path / "out" / "results.md").exists()
