"""Data-parallel branches on a real local Ray: two branches of two DDP workers each (gloo on
CPU) train at once, every step is checkpointed as one commit of both ranks' parts, a worker
killed mid-slice restarts its group from the last commit, and the heads restore bit for bit as
rank 0's live models, with plain state-dict keys."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import ray
import torch

import raybranch as rb
from raybranch.branches.slices import slice_ends
from raybranch.cluster.runner import RayRunner
from raybranch.config.classes import ExperimentConfig, RayJobConfig
from raybranch.ledger.lineage import Lineage
from raybranch.ledger.verify import verify_store
from raybranch.runs.branch_training import state_digest
from raybranch.runs.context import RunContext
from raybranch.runs.ops import init_run

pytestmark = pytest.mark.usefixtures("local_ray")


def kill_rank_once(marker: str, branch: str, rank: int, at_step: int):
    """A step hook that SIGKILLs ``rank`` of ``branch``'s worker group at ``at_step``, the first time only."""

    def hook(b: str, step: int) -> None:
        if (b == branch and step == at_step and ray.train.get_context().get_world_rank() == rank
                and not os.path.exists(marker)):
            Path(marker).write_text(f"killed rank {rank} ({os.getpid()}) at step {step}\n")
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def test_two_branches_of_two_ddp_workers(tmp_path):
    cfg = ExperimentConfig(name="d", mechanisms=("lc",), split="40/30/30", epochs=2, patience=0,
                           branch_point_max_epochs=2, flush_every=4)
    store = rb.open_store((tmp_path / "store").as_uri())
    init_run(store, "d", cfg, "lc")
    ctx = RunContext(store, "d")
    marker = str(tmp_path / "killed")
    job = RayJobConfig(num_workers=2, cpus_per_worker=0.5, max_failures=1)
    runner = RayRunner(job, step_hook=kill_rank_once(marker, "main", rank=1, at_step=9))
    out = runner.train(ctx, [("main", [1]), ("clean", [1])])

    assert Path(marker).read_text().startswith("killed rank 1")  # the worker did die, once
    for b in ("main", "clean"):
        lin = Lineage(store, "d", b)
        own = lin.entries_between(1, lin.head_step)
        steps = [e["step"] for e in own]
        assert steps == list(range(1, lin.head_step + 1)), b  # every step, no gap, no duplicate
        assert all([p["name"] for p in e["parts"]] == ["0", "1"] for e in own), b  # both ranks' parts
        assert lin.log.head["world_size"] == 2
        assert slice_ends(lin) == {1: lin.head_step}
        # the head (an exact slice end) restores as rank 0's live model, with no "module." prefix
        restored = ctx.restored(b)
        assert not any(k.startswith("module.") for k in restored.state_dict())
        assert state_digest(restored.state_dict()) == out[b]["state_sha256"], b
    assert out["main"]["resumed"] is False and out["main"]["trained"][0]["slice"] == 1
    # the restarted group fenced the killed one: main has a writer epoch more than clean
    epochs = {b: Lineage(store, "d", b).log.head["epoch"] for b in ("main", "clean")}
    assert epochs["main"] == epochs["clean"] + 1
    assert verify_store(store, "d").problems == []
    assert torch.isfinite(torch.tensor(out["main"]["acc_live"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_workers_train_with_nccl_and_restore_the_live_model(tmp_path):
    cfg = ExperimentConfig(name="g", mechanisms=("lc",), split="40/30/30", epochs=2, patience=0, branch_point_max_epochs=2)
    store = rb.open_store((tmp_path / "store").as_uri())
    init_run(store, "g", cfg, "lc")
    ctx = RunContext(store, "g")
    workers = min(2, torch.cuda.device_count())
    out = RayRunner(RayJobConfig(num_workers=workers, use_gpu=True, cpus_per_worker=0.5)).train(ctx, [("main", [1])])
    lin = Lineage(store, "g", "main")
    assert lin.log.head["world_size"] == workers
    assert [e["step"] for e in lin.entries_between(1, lin.head_step)] == list(range(1, lin.head_step + 1))
    assert state_digest(ctx.restored("main").state_dict()) == out["main"]["state_sha256"]
