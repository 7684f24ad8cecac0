"""`raybranch demo --quick` end to end on CPU: report.json with every key, report.md, PNG plots."""
from __future__ import annotations

import json

import torch

from raybranch.branches.metrics import BRANCH_KEYS, RECOVERY_KEYS
from raybranch.branches.report import PLOTS
from raybranch.cli.main import build_parser
from raybranch.cli.main import main as cli_main

torch.set_num_threads(1)


def test_demo_parser_defaults():
    args = build_parser().parse_args(["demo", "--out", "/tmp/x"])
    assert args.out == "/tmp/x" and args.store is None and not args.quick and args.seed == 0


def test_demo_quick_writes_the_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--out", str(out), "--quick", "--seed", "0"]) == 0
    doc = json.loads((out / "report.json").read_text())
    assert set(doc["mechanisms"]) == {"lc", "lc+dlora"}
    for mech, r in doc["mechanisms"].items():
        assert set(r["branches"]) == {"main", "clean", "replay"}
        for b, v in r["branches"].items():
            missing = [k for k in BRANCH_KEYS if k not in v]
            assert not missing, (mech, b, missing)
            assert v["compression_ratio"] > 1 and 0 < v["space_savings"] < 1
            assert v["bytes_torch_save"] == v["checkpoints"] * r["torch_save_bytes_per_checkpoint"]
            assert len(v["per_slice_acc"]) == 4 and all(0 <= a <= 1 for a in v["per_slice_acc"])
            assert v["attack_success_rate"] is not None
        assert all(k in r["recovery"] for k in RECOVERY_KEYS)
        assert r["recovery"]["quarantined_slice"] == 3
        assert r["recovery"]["instant_seconds"] < r["recovery"]["retrain_from_scratch_seconds"]
    # the store is where the CLI said, and holds a run per mechanism
    assert (out / "store" / "demo-lc").is_dir() and (out / "store" / "demo-lc-dlora").is_dir()
    md = (out / "report.md").read_text()
    assert "| model | mechanism | branch |" in md and "| lenet5 | lc | main |" in md
    assert "slice 1 | slice 2 | slice 3 | slice 4" in md and "## Targets" in md
    for p in PLOTS:
        data = (out / p).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "report:" in capsys.readouterr().out
