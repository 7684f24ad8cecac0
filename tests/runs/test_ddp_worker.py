"""The branch worker's training function without Ray (raybranch.runs.ddp_worker): a process
group of its own, DDP, part-wise checkpoints. On CPU two gloo ranks; on CUDA (skipped without
it) one NCCL rank with the checkpoint pipeline on the GPU."""
from __future__ import annotations

import json

import pytest
import torch

from raybranch.runs.ddp_worker import main

TINY = ["split=40/30/30", "epochs=2", "patience=0", "branch_point_max_epochs=2", "mechanisms=lc"]


def _run(capsys, *args) -> dict:
    assert main(["--json", *args, *TINY]) == 0
    return json.loads(capsys.readouterr().out)


def test_two_gloo_ranks_write_parts_and_restore_the_live_model(capsys):
    r = _run(capsys, "--world", "2", "--device", "cpu")
    assert r["backend"] == "gloo" and r["world"] == 2
    ddp, solo = r["ddp"], r["solo"]
    assert ddp["world_size"] == 2 and ddp["parts"] == [2] and solo["parts"] == [1]
    assert ddp["checkpoints"] == ddp["steps"] == solo["steps"] > 0  # every step, as many as one process takes
    assert ddp["restored_equals_live"] and solo["restored_equals_live"]
    assert r["ddp_without_checkpoints"]["steps"] == ddp["steps"]
    assert r["checkpoint_overhead_pct"] == pytest.approx(100 * (ddp["s_per_step"] / r["ddp_without_checkpoints"]["s_per_step"] - 1))


def test_bad_world_is_one_line_and_exit_2(capsys):
    assert main(["--world", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --world must be ≥ 1, got 0"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_nccl_rank_with_the_pipeline_on_the_gpu(capsys):
    r = _run(capsys, "--world", "1", "--device", "cuda")
    assert r["backend"] == "nccl" and r["device"] == "cuda:0"
    assert r["ddp"]["restored_equals_live"] and r["ddp"]["checkpoints"] == r["ddp"]["steps"] > 0
