"""The capacity model's arithmetic, checked by hand on a small case, and the default 64-GPU case."""
import json
import subprocess
import sys

import pytest

from raybranch.bench import scale_sim as S


def small(**kw):
    # 1 branch, 1 step/s, groups of 4 steps, ratio 10, 1 MB of state, no key frames within the run's horizon
    args = dict(gpus=1, branches=1, steps_per_s=1.0, state_bytes=1e6, ratio=10.0, flush_every=4, flush_seconds=5.0,
                key_every=10**9, page_size=64)
    return S.simulate(**(args | kw))


def test_small_case_by_hand():
    r = small()
    b, w = r["per_branch"], r["whole_run_one_prefix"]
    assert r["stored_bytes_per_checkpoint"] == pytest.approx(1e5)       # 1 MB / 10
    assert b["bytes_s"] == pytest.approx(1e5)                           # × 1 step/s
    assert b["steps_per_group"] == 4                                     # flush_every 4 closes before 5 s
    assert b["commits_s"] == pytest.approx(0.25)
    # 2 PUT per commit (blob + record) + 2 PUT per seal (page + top.json), a seal every 64 commits
    assert b["put_s"] == pytest.approx(2 * 0.25 + 2 * 0.25 / 64)         # 0.5078125
    assert b["delete_s"] == pytest.approx(0.25)                          # 64 DELETEs per seal
    assert b["get_s"] == pytest.approx(0.25 / 64)                        # top.json read per seal
    assert b["list_s"] == 0
    assert w["write_share"] == pytest.approx((0.5078125 + 0.25) / 3500)
    c = r["cost"]
    assert c["gb_written_per_day"] == pytest.approx(8.64)               # 1e5 B/s × 86400 s
    assert c["storage_usd_per_day_per_day_kept"] == pytest.approx(8.64 * 0.023 * 24 / 730)
    put_day, get_day = 0.5078125 * 86400, 0.25 / 64 * 86400
    assert c["requests_usd_per_day"] == pytest.approx(put_day / 1000 * 0.005 + get_day / 1000 * 0.0004)
    assert c["requests_usd_per_day"] == pytest.approx(0.2195, abs=1e-4)


def test_windows_and_key_frames():
    assert small(flush_seconds=2.0)["per_branch"]["steps_per_group"] == 3   # the 3rd save finds 2 s gone
    assert small(max_group_bytes=2.5e5)["per_branch"]["steps_per_group"] == 3  # 3 × 100 kB reach 250 kB
    # key_every 6: a cycle of 6 steps (its last the key frame, which closes its group) is 2 groups of ≤ 4
    assert small(key_every=6)["per_branch"]["commits_s"] == pytest.approx(2 / 6)
    assert small(key_every=8)["per_branch"]["commits_s"] == pytest.approx(0.25)  # aligned: 4 + 4
    # part-wise commit: 2 parts of 500 kB, each group 4 steps: 3 PUTs per commit
    assert small(parts=2)["per_branch"]["put_s"] == pytest.approx(3 * 0.25 + 2 * 0.25 / 64)
    rr = S.restore_reads(64, 256, 8, 64)
    assert rr["blob_gets"] == (4 + 1) + 7 and rr["page_gets"] == 2
    assert rr["max_reads"] == 4 + 1 + 1 + 1 + 12


def test_metadata_by_hand():
    m = S.metadata(10**6, 64, 64, commit_record_b=4000, page_b_per_step=20, top_b_per_page=42, page_b_per_commit=50)
    assert m["commits"] == 15625 and m["pages"] == 244
    assert m["commit_records_kept"] == 15625 - 244 * 64 + 1 == 10
    assert m["page_bytes"] == 64 * (50 + 64 * 20) and m["top_json_bytes"] == 120 + 42 * 244
    assert m["metadata_bytes"] == 244 * 64 * 1330 + 10 * 4000 + 120 + 42 * 244
    assert m["open_resolve_reads"] == 5


def test_default_case_prints_table_and_share(capsys):
    r = S.simulate()
    assert r["inputs"]["gpus"] == 64 and r["inputs"]["branches"] == 2
    share = r["whole_run_one_prefix"]["write_share"]
    assert 0 < share <= 0.10 and r["meets_target"]
    assert S.main([]) == 0
    out = capsys.readouterr().out
    assert "PUT+DELETE+LIST /s" in out and f"{share:.3%}" in out and "(target <= 10 %): met" in out
    assert S.main(["--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["whole_run_one_prefix"]["write_share"] == pytest.approx(share)
    # the module itself needs neither torch nor Ray: loaded from its file, outside the package
    # (whose __init__ imports the Checkpointer, hence torch), it imports neither
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('scale_sim', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); m.main([]); "
            "print(sorted(k for k in ('torch', 'ray', 'raybranch') if k in sys.modules))")
    got = subprocess.run([sys.executable, "-c", code, S.__file__], capture_output=True, text=True, check=True).stdout
    assert "PUT+DELETE+LIST /s" in got and got.strip().splitlines()[-1] == "[]"
