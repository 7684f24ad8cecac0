"""LoopbackCluster (raybranch.testing.ray_nodes): a head and two worker nodes, all on 127.0.0.1
(one cluster for the module, its own: not the ``local_ray`` fixture). Everything listens on
loopback; a task asking for the workers' resource runs on a worker node, not the head; after one
worker node is killed abruptly, a new task still runs, on the worker that is left."""
from __future__ import annotations

import sys

import pytest
import ray

from raybranch.testing.processes import alive
from raybranch.testing.ray_nodes import LoopbackCluster, is_loopback

WORKER = {"num_cpus": 1, "resources": {"raybranch_worker": 1}}


@ray.remote(num_cpus=0, resources={"raybranch_worker": 0.01})
def where() -> str:
    return ray.get_runtime_context().get_node_id()


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():  # another module's Ray must not take this one's place
        ray.shutdown()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests
    lc = LoopbackCluster(head_cpus=1, workers=[WORKER, WORKER])
    with lc:
        yield lc
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
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
