"""The sweep's tables without Ray (raybranch.sweep.tables): means over seeds with the 95 %
t-interval, the per-setting verdict against the target, the report's table shapes, the plot."""
from __future__ import annotations

import csv
import math
import statistics

import pytest

from raybranch.sweep.tables import CSV_COLUMNS, aggregate, markdown, t_quantile, verdicts, write_results

SPLITS = ["4x25", "20x5"]


def row(split, seed, diff, ratio, lr, pattern="classifier", status="done"):
    done = status == "done"
    return {"split": split, "seed": seed, "rank": 8, "bits": 3, "snapshot_every": None, "mechanism": "lc+dlora",
            "knobs": {"lora_lr": lr, "lora_pattern": pattern}, "compression_ratio": ratio if done else None,
            "space_savings": 1 - 1 / ratio if done else None, "acc_restored": 0.9 + diff / 100 if done else None,
            "acc_full": 0.9, "acc_diff_pp": diff if done else None, "checkpoints": 10, "bytes_stored": 100,
            "status": status, "run": f"r-{split}-{seed}-{lr}-{pattern}", "model": "lenet5", "lora_pattern": pattern}


@pytest.fixture
def rows():
    good = [row(s, k, d, r, 0.2) for s in SPLITS for k, (d, r) in enumerate([(-0.5, 120), (0.1, 110), (-0.9, 130)])]
    bad = [row(s, k, -3.0 + k, 150, 0.1) for s in SPLITS for k in range(3)]
    bad[-1] = row("20x5", 2, 0, 0, 0.1, status="stopped by ASHA at 25 % of the slices")
    return good + bad


def test_means_and_intervals(rows):
    agg = {(a["setting"], a["split"]): a for a in aggregate(rows)}
    a = agg[("lc+dlora r8 b3 lr=0.2 pattern=classifier", "4x25")]
    d = [-0.5, 0.1, -0.9]
    assert a["n"] == 3 and a["diff_pp"] == pytest.approx(statistics.fmean(d))
    assert a["ci_pp"] == pytest.approx(4.302653 * statistics.stdev(d) / math.sqrt(3), rel=1e-5)
    assert a["ratio"] == pytest.approx(120)
    b = agg[("lc+dlora r8 b3 lr=0.1 pattern=classifier", "20x5")]
    assert (b["n"], b["trials"]) == (2, 3) and b["ci_pp"] == pytest.approx(t_quantile(1) * statistics.stdev([-3, -2]) / math.sqrt(2))
    assert t_quantile(1) == pytest.approx(12.7062, rel=1e-4)


def test_verdicts_rank_settings_that_meet_the_target_first(rows):
    v = verdicts(aggregate(rows), SPLITS)
    assert [x["met"] for x in v] == [True, False]
    assert v[0]["setting"].startswith("lc+dlora r8 b3 lr=0.2") and v[0]["worst_pp"] == pytest.approx(-0.4333, abs=1e-3)
    assert v[1]["worst_pp"] == pytest.approx(-2.5) and v[1]["min_ratio"] == pytest.approx(150)
    assert verdicts(aggregate(rows), SPLITS + ["80x1.25"])[0]["met"] is False  # a split not run is not met


def test_files(rows, tmp_path):
    rows += [row("4x25", 0, -1.5, 90, 0.2, pattern="all")]
    paths = write_results(rows, str(tmp_path), "t", SPLITS, ["lora_lr", "lora_pattern"])
    with open(paths["csv"]) as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == [*CSV_COLUMNS, "lora_lr"] and len(got) == len(rows)  # lora_pattern is a column already
    md = open(paths["md"]).read()
    assert "| lc+dlora r8 b3 lr=0.2 pattern=classifier | 2/2 | -0.43 | 120.0× | yes |" in md
    assert "## Shape of the report's Table 8 (by target layers)" in md and "## Shape of the report's Table 9 (by split)" in md
    assert "Table 3" not in md and "Tables 12 and 14" not in md  # one model, one rank
    assert "| -0.43 ± " in md and "stopped by ASHA" in md
    assert md == markdown(rows, "t", SPLITS)
    png = open(paths["png"], "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
