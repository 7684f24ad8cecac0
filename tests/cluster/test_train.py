"""Branches as Ray Train workers (raybranch.cluster.train) on a real local Ray: the branching run
gives the single-process experiment's results, every Ray checkpoint resolves to a committed
raybranch checkpoint that restores, and a worker killed mid-slice resumes from the branch head
(its new writer fencing the dead one's)."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import ray
import torch

import raybranch as rb
from raybranch.branches.experiment import ExperimentConfig, run_experiment
from raybranch.branches.slices import slice_ends
from raybranch.ledger.lineage import Lineage
from raybranch.ledger.verify import verify_store
from raybranch.cluster.train import (
    RAY_CHECKPOINT_FILE,
    RayExperiment,
    ray_storage,
    resolve_ray_checkpoint,
    restore_ray_checkpoint,
    run_on_ray,
)
from raybranch.config import RayJobConfig

torch.set_num_threads(1)

TINY = dict(mechanisms=("lc",), epochs=2, patience=0, branch_point_max_epochs=3, settle=1)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The single-process reference must run with the workers' one thread (other tests, e.g. the
    in-process demo CLI, may have changed the process-wide setting): float sums depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    # the step hooks below live in this test module, which Ray workers cannot import by name
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_branching_run_matches_single_process_and_ray_checkpoints_resolve(tmp_path):
    cfg = ExperimentConfig(name="t", **TINY)
    uri = (tmp_path / "store").as_uri()
    # the checkpoint actor path here; the plain Checkpointer (the default) in the kill test below
    r = run_on_ray(cfg, RayJobConfig(checkpointer="async"), out_dir=str(tmp_path / "out"), store_uri=uri)
    for name in ("report.json", "report.md", "accuracy_per_slice.png", "bytes_per_branch.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    lc = r["mechanisms"]["lc"]
    assert set(lc["branches"]) == {"main", "clean", "replay"}

    # the same experiment in one process: same branches, same checkpoints, same models
    ref = run_experiment(ExperimentConfig(name="t", **TINY), (tmp_path / "ref").as_uri())["mechanisms"]["lc"]
    for b in ("main", "clean", "replay"):
        got, want = lc["branches"][b], ref["branches"][b]
        assert got["checkpoints"] == want["checkpoints"], b
        assert got["per_slice_acc"] == pytest.approx(want["per_slice_acc"]), b
        assert got["acc_restored"] == pytest.approx(want["acc_restored"]), b
        assert got["compression_ratio"] == pytest.approx(want["compression_ratio"], rel=0.02), b
    # Ray's own files are in the run's directory but not in its checkpoint bytes
    assert lc["run_total"]["ray_bytes"] > 0
    assert lc["run_total"]["bytes_stored"] == pytest.approx(ref["run_total"]["bytes_stored"], rel=0.02)

    # every slice end was reported to Ray with a checkpoint naming its raybranch checkpoint
    store = rb.open_store(uri)
    run = lc["run"]
    for b, slices in (("main", [1, 2, 3, 4]), ("clean", [1, 2, 4])):
        ray_dir = Path(ray_storage(store, run)[0]) / b
        ray_ckpts = sorted(p for p in ray_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
        assert len(ray_ckpts) == len(slices)
        docs = []
        for p in ray_ckpts:
            assert [f.name for f in p.iterdir()] == [RAY_CHECKPOINT_FILE]  # a pointer, not a copy of the model
            ck = ray.train.Checkpoint.from_directory(str(p))
            doc = resolve_ray_checkpoint(ck)
            assert (doc["store"], doc["run"], doc["branch"]) == (uri, run, b)
            got = restore_ray_checkpoint(ck)
            want = rb.Reader(store, run).restore(b, doc["step"])
            assert got["step"] == doc["step"]
            for k in want["model"]:
                assert torch.equal(got["model"][k], want["model"][k]), k
            docs.append(doc)
        ends = slice_ends(Lineage(store, run, b))
        assert sorted((d["slice"], d["step"]) for d in docs) == sorted((k, ends[k]) for k in slices)
    assert r["mechanisms"]["lc"]["ray"]["branches"]["main"]["resumed"] is False
    rep = verify_store(store, run)
    assert rep.problems == [] and rep.counts["steps"] > 0


def kill_once(marker: str, branch: str, at_step: int):
    """A step hook that SIGKILLs the training worker at ``at_step`` of ``branch``, the first time only."""

    def hook(b: str, step: int) -> None:
        if b == branch and step == at_step and not os.path.exists(marker):
            Path(marker).write_text(f"killed {os.getpid()} at step {step}\n")
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


@pytest.mark.parametrize("checkpointer", ["sync"])
def test_killed_worker_resumes_from_the_branch_head(tmp_path, checkpointer):
    cfg = ExperimentConfig(name=f"k-{checkpointer}", **TINY, flush_every=4)  # the kill loses at most 4 steps
    uri = (tmp_path / "store").as_uri()
    marker = str(tmp_path / "killed")
    kill_at = 27  # in slice 2 of main (slices end at steps 19, 38, 57, 76 here: 18 steps + 1 settle)
    job = RayJobConfig(max_failures=1, checkpointer=checkpointer)
    exp = RayExperiment(cfg, uri, job, step_hook=kill_once(marker, "main", kill_at))
    from raybranch.branches.experiment import prepare_data

    exp.data = prepare_data(cfg)
    exp.bp_model, _ = exp.branch_point()
    n = len(exp.data.slices)
    full = {"main": exp.plain(exp.bp_model, list(range(1, n + 1)), False, "full")}
    out = exp.run_mechanism("lc", exp.bp_model, full, branches_only=("main",))

    assert Path(marker).read_text().startswith("killed")  # the worker did die, once
    info = out["ray"]["branches"]["main"]
    assert info["resumed"] is True
    store = rb.open_store(uri)
    run = out["run"]
    lin = Lineage(store, run, "main")
    steps = [e["step"] for e in lin.all_entries()]
    assert steps == list(range(steps[0], steps[-1] + 1))  # no gap, no duplicate
    # three writers, each registered with a new epoch: the driver (step 0), the first attempt of
    # the worker, the restarted worker (which fenced the one it replaced)
    log = lin.log
    commits = [c for p in log.pages for c in log.page(p.first_seq, p.last_seq)["commits"]]
    commits += [log.commit(s) for s in log.tail_seqs if s > log.sealed_through]
    assert sorted({c["epoch"] for c in commits}) == [1, 2, 3]
    ends = slice_ends(Lineage(store, run, "main"))
    assert sorted(ends) == [1, 2, 3, 4]
    assert ends[1] < kill_at < ends[2]
    # slice 1 ended before the kill and was not trained again; slices 2-4 were reported after it.
    # Ray records a report asynchronously: if the kill beat slice 1's record, the restarted
    # worker reported it again from the store, so Ray knows every slice end either way.
    rep = info["reported"]
    assert [x["slice"] for x in rep] == [1, 2, 3, 4]
    assert [x["resumed"] for x in rep[1:]] == [True, True, True]
    assert out["branches"]["main"]["slice_results"][0]["last_step"] == ends[1]
    # the restarted worker continued from the last committed step: the slice cut short was
    # trained again from its first epoch on top of it, so slice 2 holds more steps than slice 1
    assert ends[2] - ends[1] > ends[1] - 0
    rep = verify_store(store, run)
    assert rep.problems == [] and rep.counts["steps"] == len(steps)
    assert out["branches"]["main"]["acc_restored"] > 0.3
    # every Ray checkpoint still resolves to a committed checkpoint of the branch
    path, _ = ray_storage(store, run)
    res_ckpts = sorted(p for p in Path(path, "main").glob("checkpoint_*") if p.is_dir())
    assert len(res_ckpts) >= 4  # a report lost in the kill leaves its directory behind
    for p in res_ckpts:
        doc = resolve_ray_checkpoint(ray.train.Checkpoint.from_directory(str(p)))
        assert doc["step"] in steps
