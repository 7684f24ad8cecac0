"""Branches as Ray Train workers (raybranch.cluster.runner) on a real local Ray: the branching job
(jobs/branches.py: the run operations on the Ray runner) gives the local runner's report fields
and models, every Ray
checkpoint resolves to a committed raybranch checkpoint that restores. (Killed workers and lost
nodes: tests/cluster/test_loopback.py.)"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import ray
import torch

import raybranch as rb
from raybranch.branches.slices import slice_ends
from raybranch.cluster.pointers import RAY_CHECKPOINT_FILE, RAY_DIR, current_name, resolve_ray_checkpoint, restore_ray_checkpoint
from raybranch.config.classes import ExperimentConfig
from raybranch.ledger.lineage import Lineage
from raybranch.ledger.verify import verify_store
from raybranch.runs.experiment import run_experiment

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(mechanisms=("lc",), epochs=2, patience=0, branch_point_max_epochs=3, settle=1)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The local runner must run with the workers' one thread (other tests may have changed the
    process-wide setting): float sums depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


pytestmark = pytest.mark.usefixtures("local_ray")


def _flat(report: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in report.items():
        keys.add(prefix + k)
        if isinstance(v, dict) and k not in ("config", "timings"):
            keys |= _flat(v, prefix + k + ".")
    return keys


def load_job():
    """jobs/branches.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("branches_job", ROOT / "jobs" / "branches.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ray_runner_gives_the_local_runners_run_and_ray_checkpoints_resolve(tmp_path, capsys):
    keys = dict(**TINY, split="40/30/30", poison_slice=2)
    stores = {name: rb.open_store((tmp_path / name).as_uri()) for name in ("ray", "local")}
    # the Ray run: jobs/branches.py (this process is its driver, Ray is up), with the checkpoint
    # actor; the plain Checkpointer (the default) in the kill test below
    argv = ["--config", str(ROOT / "jobs/configs/quick.yaml"), "name=t", f"store={stores['ray'].uri}", f"out={tmp_path / 'out'}",
            "checkpointer=async", *(f"{k}={','.join(v) if isinstance(v, tuple) else v}" for k, v in keys.items())]
    assert load_job().main(argv) == 0
    assert "report: " in capsys.readouterr().out
    reports = {"ray": json.loads(stores["ray"].read_bytes("_reports/t/report.json"))}
    assert (tmp_path / "out" / "report.json").read_bytes() == stores["ray"].read_bytes("_reports/t/report.json")
    # the same experiment with the local runner
    reports["local"] = json.loads(json.dumps(run_experiment(ExperimentConfig(name="t", **keys), stores["local"]), default=str))
    got, want = reports["ray"]["mechanisms"]["lc"], reports["local"]["mechanisms"]["lc"]
    volatile = {"seconds", "runner", "reports", "targets", "store"}
    assert {k for k in _flat(reports["ray"]) if k.split(".")[0] not in volatile} == \
        {k for k in _flat(reports["local"]) if k.split(".")[0] not in volatile}  # the same report fields
    assert set(got["branches"]) == {"main", "clean", "replay"}
    for b, br in got["branches"].items():
        assert br["checkpoints"] == want["branches"][b]["checkpoints"], b
        assert br["per_slice_acc"] == want["branches"][b]["per_slice_acc"], b
        assert br["acc_restored"] == want["branches"][b]["acc_restored"], b
    # the same models, bit for bit, at every slice end and head of every branch
    for b in ("main", "clean", "main-poisoned-2"):
        ends = [slice_ends(Lineage(s, "t-lc", b)) for s in stores.values()]
        assert ends[0] == ends[1], b
        for step in [*ends[0].values(), None]:
            a, c = (rb.Reader(s, "t-lc").restore(b, step)["model"] for s in stores.values())
            assert all(torch.equal(a[k], c[k]) for k in c), (b, step)
    # Ray's own files are in the run's directory but not in its checkpoint bytes
    assert got["run_total"]["excluded_bytes"] > want["run_total"]["excluded_bytes"]
    assert got["run_total"]["bytes_stored"] == pytest.approx(want["run_total"]["bytes_stored"], rel=0.02)

    # every slice end a worker trained was reported to Ray with a checkpoint naming it
    store, uri = stores["ray"], stores["ray"].uri
    ray_dir = Path(store.root) / "t-lc" / RAY_DIR
    docs = []
    for p in sorted(p for p in ray_dir.glob("*/checkpoint_*") if p.is_dir()):
        assert [f.name for f in p.iterdir()] == [RAY_CHECKPOINT_FILE]  # a pointer, not a copy of the model
        ck = ray.train.Checkpoint.from_directory(str(p))
        doc = resolve_ray_checkpoint(ck)
        assert (doc["store"], doc["run"]) == (uri, "t-lc") and doc["branch_id"]
        restored = restore_ray_checkpoint(ck)
        want_state = rb.Reader(store, "t-lc").restore(current_name(store, "t-lc", doc["branch"], doc["branch_id"]), doc["step"])
        assert all(torch.equal(restored["model"][k], want_state["model"][k]) for k in want_state["model"])
        docs.append((doc["branch"], doc["slice"]))
    # main 1-3, clean 1 and 3, and the replay's slice 3 (its branch now main; the pointer names it as trained)
    assert sorted(docs) == sorted([("main", 1), ("main", 2), ("main", 3), ("clean", 1), ("clean", 3), ("replay-2", 3)])
    rep = verify_store(store, "t-lc")
    assert rep.problems == [] and rep.counts["steps"] > 0
