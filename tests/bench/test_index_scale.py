"""The index-scale benchmark at a small size: every read count it prints is at most 10, every
restore equals the trained run's reconstruction, and a commit costs two PUTs."""
from __future__ import annotations

import json
import os

import pytest

from raybranch.bench import index_scale

SMALL = ["--flush-every", "50", "--snapshot-every", "50", "--segment-size", "8", "--resolves", "10", "--restores", "6", "--json"]


@pytest.fixture
def saved_env():
    """The benchmark sets the SeaweedFS server's AWS_* variables in os.environ: put them back."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def run(capsys, checkpoints: int, backends: str) -> dict:
    rc = index_scale.main(["--checkpoints", str(checkpoints), "--backends", backends, *SMALL])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0
    return res


def check(res: dict, backends: list[str], pages: int) -> None:
    assert res["sizes"]["pages"] == pages and res["sizes"]["page_bytes"] > 0 and res["sizes"]["top_bytes"] > 0
    assert sorted(res["backends"]) == sorted(backends) and sorted(res["commit_cost"]) == sorted(backends)
    for be, m in res["backends"].items():
        rows = {r["op"]: r for r in m["rows"]}
        assert list(rows) == ["open", "open + log tail (20)", "open + resolve step", "restore step"]
        for op, r in rows.items():
            assert 1 <= r["reads"] <= 10, (be, op, r)
            assert r["reads"] == r["get"] + r["list"] == r["meta_reads"] + r["blob_gets"]
        assert rows["open"]["blob_gets"] == rows["open + resolve step"]["blob_gets"] == 0
        assert 1 <= rows["restore step"]["blob_gets"] <= 2  # a chain of <= snapshot_every deltas: <= 2 blobs
        assert m["restores_equal"] and len(m["restore_checks"]) == 6
    for be, costs in res["commit_cost"].items():
        assert [c["flush_every"] for c in costs] == [1, 64]
        for c in costs:
            assert c["put"] == 2 and c["commit_bytes"] > 0 and c["blob_bytes"] > 0, (be, c)  # the blob, the commit
            assert c["seal_extra"]["puts"].get("page") == 1
    assert res["target"] == {"reads": 10, "max_reads": res["target"]["max_reads"], "met": True}


def test_index_scale_file(capsys):
    res = run(capsys, 3000, "file")
    assert res["build"]["saves"] == 3000 and res["build"]["commits"] == 62  # root, step 0, 60 groups of 50
    check(res, ["file"], pages=7)


def test_index_scale_file_and_s3(capsys, saved_env):
    res = run(capsys, 1000, "file,s3")
    assert res["copy"]["objects"] > 0 and res["copy"]["bytes"] > 0
    check(res, ["file", "s3"], pages=2)
    file_rows, s3_rows = ({r["op"]: r for r in res["backends"][be]["rows"]} for be in ("file", "s3"))
    assert s3_rows["open"]["list"] == 1  # one LIST page from the last sealed commit
