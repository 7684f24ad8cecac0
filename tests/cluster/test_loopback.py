"""LoopbackCluster (raybranch.cluster.loopback): a head and two worker nodes, all on 127.0.0.1
(one cluster for the module, its own: not the ``local_ray`` fixture). Everything listens on
loopback; a task asking for the workers' resource runs on a worker node, not the head; after one
worker node is killed abruptly, a new task still runs, on the worker that is left.

Then data-parallel branches on the worker nodes, with the store on the S3 server: main and clean,
two DDP workers each (gloo), placed by ``worker_resources`` off the head, a checkpoint every step
of both ranks' parts. Main's node is killed in the middle of its slice and one of clean's workers
is SIGKILLed: each group restarts from its last commit (main on another node), with no gap and no
duplicate step, and each head restores bit for bit as rank 0's live model, without ``module.``."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import ray

import raybranch as rb
from raybranch.cluster.runner import RayRunner
from raybranch.config.classes import ExperimentConfig, RayJobConfig
from raybranch.ledger.lineage import Lineage
from raybranch.ledger.verify import verify_store
from raybranch.runs.branch_training import state_digest
from raybranch.runs.context import RunContext
from raybranch.runs.ops import init_run

from raybranch.testing.processes import alive
from raybranch.cluster.loopback import LoopbackCluster, is_loopback

WORKER = {"num_cpus": 1, "resources": {"raybranch_worker": 1}}


@ray.remote(num_cpus=0, resources={"raybranch_worker": 0.01})
def where() -> str:
    return ray.get_runtime_context().get_node_id()


@pytest.fixture(scope="module")
def cluster(s3_server):
    if ray.is_initialized():  # another module's Ray must not take this one's place
        ray.shutdown()
    saved = {k: os.environ.get(k) for k in s3_server.env()}
    os.environ.update(s3_server.env())  # the nodes' workers inherit the S3 server's credentials
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests
    lc = LoopbackCluster(head_cpus=1, workers=[WORKER, WORKER])
    with lc:
        yield lc
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    left = [pid for pid, proc in lc._seen.items() if alive(pid) and proc.is_running()]
    assert not left, f"cluster processes left after shutdown: {left}"


def test_is_loopback():
    assert all(map(is_loopback, ["127.0.0.1", "::1", "::ffff:127.0.0.1", "127.0.1.1"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.0.2.2", "::ffff:192.0.2.2"]))


def test_every_node_and_listener_on_loopback(cluster):
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 3 and {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}
    socks = cluster.check_loopback()
    names = {name for _, name, _, _ in socks}
    assert {"gcs_server", "raylet"} <= names, names  # the walk did find the cluster's servers
    assert len({pid for pid, name, _, _ in socks if name == "raylet"}) == 3


def test_task_runs_on_a_worker_node_and_survives_a_lost_node(cluster):
    head_id = cluster.head.node_id
    worker_ids = {n.node_id for n in cluster.workers}
    ran_on = ray.get(where.remote(), timeout=60)
    assert ran_on != head_id and ran_on in worker_ids

    victim, survivor = cluster.workers
    took = cluster.kill_node(victim)
    assert took < 30
    assert [n.node_id for n in cluster.workers] == [survivor.node_id]
    dead = {n["NodeID"] for n in ray.nodes() if not n["Alive"]}
    assert victim.node_id in dead

    assert ray.get([where.remote() for _ in range(3)], timeout=60) == [survivor.node_id] * 3
    cluster.check_loopback()


def faults(d: str, pause_at: tuple[str, int], kill_at: tuple[str, int]):
    """A step hook: every worker process records its node once; rank 0 of branch ``pause_at[0]``
    at step ``pause_at[1]`` (the first time) writes ``pause`` naming its node and waits to be
    killed with it; rank 1 of branch ``kill_at[0]`` SIGKILLs itself at step ``kill_at[1]`` (once)."""

    def hook(b: str, step: int) -> None:
        rank = ray.train.get_context().get_world_rank()
        node = ray.get_runtime_context().get_node_id()
        rec = Path(d) / f"{b}-{rank}-{os.getpid()}.node"
        if not rec.exists():
            rec.write_text(node)
        pause, killed = Path(d) / "pause", Path(d) / "killed"
        if (b, step) == pause_at and rank == 0 and not pause.exists():
            pause.write_text(node)
            time.sleep(300)
        if (b, step) == kill_at and rank == 1 and not killed.exists():
            killed.write_text(f"{os.getpid()}")
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def test_ddp_branches_on_worker_nodes_survive_a_lost_node(cluster, s3_server, tmp_path):
    while len(cluster.workers) < 3:  # one node for each branch, and one to resume on
        cluster.add_worker(**WORKER)
    store = rb.open_store(s3_server.store_uri(s3_server.make_bucket(f"rb-{uuid.uuid4().hex[:20]}"), "ckpts"))
    cfg = ExperimentConfig(name="n", mechanisms=("lc",), split="40/30/30", epochs=2, patience=0,
                           branch_point_max_epochs=2, flush_every=4)
    init_run(store, "n", cfg, "lc")
    ctx = RunContext(store, "n")
    marks = tmp_path / "marks"
    marks.mkdir()
    job = RayJobConfig(num_workers=2, cpus_per_worker=0.5, worker_resources={"raybranch_worker": 0.5}, max_failures=1)
    runner = RayRunner(job, step_hook=faults(str(marks), pause_at=("main", 8), kill_at=("clean", 5)))
    out: dict = {}

    def fit():
        try:
            out["result"] = runner.train(ctx, [("main", [1]), ("clean", [1])])
        except BaseException as exc:  # noqa: BLE001 - asserted below
            out["error"] = exc

    t = threading.Thread(target=fit, daemon=True)
    t.start()
    deadline = time.monotonic() + 240
    while not (marks / "pause").exists() and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    killed = (marks / "pause").read_text()
    cluster.kill_node(next(n for n in cluster.workers if n.node_id == killed))
    t.join(timeout=400)
    assert not t.is_alive(), "the branches did not finish after the node was lost"
    assert "error" not in out, out.get("error")

    nodes = {p.name: p.read_text() for p in marks.glob("*.node")}
    head = cluster.head.node_id
    assert head not in nodes.values()  # every worker ran off the head
    main_nodes = {n for name, n in nodes.items() if name.startswith("main-")}
    assert killed in main_nodes and len(main_nodes) == 2  # main ran on the killed node, then on another
    for b in ("main", "clean"):  # each restarted once: main after its node, clean after its rank 1
        assert len([name for name in nodes if name.startswith(f"{b}-")]) == 4, b  # 2 ranks × 2 attempts
    assert (marks / "killed").exists()
    for b in ("main", "clean"):
        lin = Lineage(store, "n", b)
        own = lin.entries_between(1, lin.head_step)
        assert [e["step"] for e in own] == list(range(1, lin.head_step + 1)), b  # no gap, no duplicate
        assert all([p["name"] for p in e["parts"]] == ["0", "1"] for e in own), b
        restored = ctx.restored(b).state_dict()
        assert not any(k.startswith("module.") for k in restored)
        assert state_digest(restored) == out["result"][b]["state_sha256"], b
        assert lin.log.head["world_size"] == 2
        # the restarted group resumed from the last commit (not from the fork at step 0): the cut
        # slice was trained again from its first epoch on top of it; Ray got its slice end once
        assert out["result"][b]["trained"][0]["first_step"] > 1, b
        fit = next(f for f in runner.fits if f["branch"] == b)
        assert fit["reported"] == [f"n/{b}/{lin.head_step}"], b
    # init created both branches (epoch 1); each attempt registered a writer with a new epoch, fencing the one before
    assert [Lineage(store, "n", b).log.head["epoch"] for b in ("main", "clean")] == [3, 3]
    rep = verify_store(store, "n")
    assert rep.problems == [] and rep.counts["steps"] > 0
