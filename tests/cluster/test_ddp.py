"""Data-parallel branches on GPU workers (NCCL), where CUDA exists; skipped elsewhere. The CPU
(gloo) case, with a killed worker and a lost node, is tests/cluster/test_loopback.py."""
from __future__ import annotations

import pytest
import torch

import raybranch as rb
from raybranch.cluster.runner import RayRunner
from raybranch.config.classes import ExperimentConfig, RayJobConfig
from raybranch.ledger.lineage import Lineage
from raybranch.runs.branch_training import state_digest
from raybranch.runs.context import RunContext
from raybranch.runs.ops import init_run

pytestmark = pytest.mark.usefixtures("local_ray")


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
