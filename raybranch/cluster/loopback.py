"""A multi-node Ray cluster on this one machine, every node on 127.0.0.1, for tests.

``LoopbackCluster`` wraps Ray's test cluster (``ray.cluster_utils.Cluster``): a head and worker
nodes (one raylet each), the driver connected to the head. ``check_loopback`` checks that every
node says 127.0.0.1 and every TCP listener of the cluster's processes is on loopback;
``kill_node`` SIGKILLs a worker node, like a lost machine; leaving the ``with`` block stops
every process the cluster started.

Two nudges keep Ray on loopback. ``Cluster`` sets no ``node_ip_address``, so nodes take the
host's address and listen on ``::`` / ``0.0.0.0``; with ``node_ip_address="127.0.0.1"`` all of
them (gcs_server, raylets, core workers, agents, the monitor's and dashboard's metrics ports)
bind 127.0.0.1. ``ray.init(address="127.0.0.1:...")`` rewrites loopback to the host's address
(``services.resolve_ip_for_localhost``) unless ``ray_constants.ENABLE_RAY_CLUSTER`` is false:
``connect`` clears that flag while ``ray.init`` runs.
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
import time
from unittest import mock

import ray  # before psutil: Ray puts its vendored psutil on sys.path
import psutil
from ray._private import ray_constants
from ray.cluster_utils import Cluster

from ..testing.processes import process_table, with_descendants

LOOPBACK = "127.0.0.1"
# GCS marks a SIGKILLed node dead after about period x threshold (Ray's default: 3 s x 5)
FAST_HEALTH_CHECK = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
                     "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}


class LoopbackError(AssertionError):
    """A node or a listening socket of the cluster is not on loopback."""


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1 and IPv4-mapped loopback (``::ffff:127.0.0.1``, what gRPC's IPv6
    sockets report)."""
    addr = ipaddress.ip_address(ip.split("%")[0])
    return addr.is_loopback or bool(getattr(addr, "ipv4_mapped", None) and addr.ipv4_mapped.is_loopback)


class LoopbackCluster:
    """``with LoopbackCluster(head_cpus=1, workers=[{"num_cpus": 1, "resources": {...}}]) as c:``

    ``workers``: ``Cluster.add_node`` keyword arguments, one dict a worker node; ``head_args``:
    more for the head; ``system_config``: Ray's ``_system_config`` (default FAST_HEALTH_CHECK)."""

    def __init__(self, head_cpus: float = 1, workers=(), *, head_args: dict | None = None,
                 system_config: dict | None = None, connect: bool = True, timeout: float = 60):
        sys_cfg = FAST_HEALTH_CHECK if system_config is None else system_config
        self.head_args = {"num_cpus": head_cpus, "node_ip_address": LOOPBACK, "include_dashboard": False,
                          "dashboard_host": LOOPBACK, "_system_config": dict(sys_cfg), **(head_args or {})}
        self.worker_args, self.timeout, self._connect = [dict(w) for w in workers], timeout, connect
        self.cluster: Cluster | None = None
        self._added: list = []  # worker nodes in the order added (Cluster keeps a set)
        self._seen: dict[int, psutil.Process] = {}  # every cluster process met, for the last sweep

    def start(self) -> LoopbackCluster:
        """Start the head and the workers, wait until all are alive, connect the driver."""
        self.cluster = Cluster(initialize_head=True, head_node_args=self.head_args)
        try:
            for args in self.worker_args:
                self.add_worker(**args)
            self.cluster.wait_for_nodes(timeout=self.timeout)
            if self._connect:
                self.connect()
        except BaseException:
            self.shutdown()
            raise
        return self

    def connect(self) -> None:
        """``ray.init`` the driver to the head, keeping the 127.0.0.1 address as given."""
        with mock.patch.object(ray_constants, "ENABLE_RAY_CLUSTER", False):
            ray.init(address=self.address)

    def add_worker(self, num_cpus: float = 1, **node_args):
        """Start one more worker node, wait until it is alive, and return its ``Node``. Main
        thread only (Ray's ``Node`` installs a SIGTERM handler)."""
        node = self.cluster.add_node(num_cpus=num_cpus, **{"node_ip_address": LOOPBACK, **node_args})
        self._added.append(node)
        return node

    def kill_node(self, node, wait_dead: bool = True) -> float:
        """SIGKILL a worker node's processes; with ``wait_dead`` also wait until the GCS marks it
        dead and its orphaned workers have exited. Returns the seconds taken."""
        t0, pids = time.monotonic(), self._pids([node])
        self.cluster.remove_node(node, allow_graceful=False)
        while wait_dead and any(n["NodeID"] == node.node_id and n["Alive"] for n in ray.nodes()):
            if time.monotonic() - t0 > self.timeout:
                raise TimeoutError(f"GCS did not mark node {node.node_id} dead in {self.timeout} s")
            time.sleep(0.1)
        if wait_dead:
            self._reap([self._seen[p] for p in pids if p in self._seen], grace=10)
        return time.monotonic() - t0

    def shutdown(self) -> None:
        """``ray.shutdown``, stop every node, then SIGKILL whatever still runs 10 s later."""
        if ray.is_initialized():
            ray.shutdown()
        if self.cluster is not None:
            self._pids(self.cluster.list_all_nodes())
            try:
                self.cluster.shutdown()
            finally:
                self.cluster = None
                self._reap(list(self._seen.values()), grace=10)

    def __enter__(self) -> LoopbackCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    address = property(lambda self: self.cluster.address, doc="GCS address, 127.0.0.1:port")
    head = property(lambda self: self.cluster.head_node, doc="the head's ``Node``")
    workers = property(lambda self: [n for n in self._added if n in self.cluster.worker_nodes],
                       doc="live worker ``Node``s, in the order added")

    def _pids(self, nodes) -> set[int]:
        """pids of ``nodes``' processes and everything below them (recorded for the last sweep)."""
        roots = {info.process.pid for n in nodes for infos in n.all_processes.values()
                 for info in infos if info.process.poll() is None}  # live children: no reused pid
        pids = with_descendants(process_table(), roots)
        for pid in pids - self._seen.keys():
            with contextlib.suppress(psutil.NoSuchProcess):
                self._seen[pid] = psutil.Process(pid)
        return pids

    def listening_sockets(self, include_driver: bool = True) -> list[tuple[int, str, str, int]]:
        """``(pid, process name, ip, port)`` of each TCP socket in LISTEN owned by the cluster's
        processes (and by this driver's core worker, with ``include_driver``)."""
        pids = self._pids(self.cluster.list_all_nodes()) | ({os.getpid()} if include_driver else set())
        out = []
        for pid in sorted(pids):
            try:  # other errors (AccessDenied) propagate: a process not checked is no pass
                proc = psutil.Process(pid)
                conns, name, cmd = proc.net_connections(kind="tcp"), proc.name(), proc.cmdline()
            except psutil.NoSuchProcess:  # exited meanwhile (a zombie too)
                continue
            if name.startswith("python"):  # the monitor, dashboard, log monitor: name the script
                name = next((a.rsplit("/", 1)[-1] for a in cmd[1:] if a.endswith(".py")), name)
            out += [(pid, name, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
        return out

    def check_loopback(self, include_driver: bool = True) -> list[tuple[int, str, str, int]]:
        """Raise ``LoopbackError`` naming every node not on 127.0.0.1 and every listener not on
        loopback; else return the listeners checked."""
        bad = [f"node {n['NodeID']} at {n['NodeManagerAddress']}" for n in ray.nodes()
               if n["NodeManagerAddress"] != LOOPBACK]
        socks = self.listening_sockets(include_driver)
        bad += [f"pid {pid} ({name}) listens on {ip}:{port}"
                for pid, name, ip, port in socks if not is_loopback(ip)]
        if bad:
            raise LoopbackError("not on loopback:\n  " + "\n  ".join(bad))
        return socks

    @staticmethod
    def _reap(procs, grace: float) -> None:
        _, alive = psutil.wait_procs(procs, timeout=grace)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
