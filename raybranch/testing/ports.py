"""Free loopback ports for SeaweedFS: each service listens on ``p`` and on ``p + 10000`` (gRPC).

A port ``p`` is handed out when both ``p`` and ``p + GRPC_PORT_OFFSET`` can be bound on
127.0.0.1 and no earlier call in this process handed out either of them. Random ports are
drawn from [20000, e − 10000) with e the low end of the kernel's ephemeral range
(``/proc/sys/net/ipv4/ip_local_port_range``, Linux default 32768), so that both ``p`` and
``p + 10000`` lie above Ray's worker ports (10002-19999) and below the ports outgoing
connections take; when that interval is too short (e − 10000 ≤ 20100) it is [20000, 25000).
"""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

from ..errors import SeaweedError

LOOPBACK = "127.0.0.1"
GRPC_PORT_OFFSET = 10000

_ports_handed_out: set[int] = set()
_ports_lock = threading.Lock()


def port_is_free(port: int) -> bool:
    """Whether a listener could bind ``127.0.0.1:port`` (as Go does: SO_REUSEADDR, so
    connections lingering in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def candidate_port_range() -> tuple[int, int]:
    """Ports ``p`` such that ``p`` and ``p + 10000`` both lie in [20000, ephemeral range).

    Outgoing client connections take their local port from the ephemeral range (Linux:
    32768-60999), and Ray workers take theirs from 10002-19999 by default; a listener placed
    between them is raced by neither.
    """
    low_ephemeral = 32768
    try:
        low_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    top = low_ephemeral - GRPC_PORT_OFFSET
    return (20000, top) if top > 20100 else (20000, 25000)


def pick_ports(count: int, fixed: dict[int, int] | None = None) -> list[int]:
    """``count`` ports ``p`` with ``p`` and ``p + 10000`` free and not handed out before.

    ``fixed`` maps a slot index to a port the caller insists on (checked, not searched).
    """
    fixed = fixed or {}
    rng = random.SystemRandom()
    low, high = candidate_port_range()
    chosen: list[int] = []
    with _ports_lock:
        taken = set(_ports_handed_out)
        for slot in range(count):
            if slot in fixed:
                port = fixed[slot]
                if not (1024 <= port <= 65535 - GRPC_PORT_OFFSET):
                    raise ValueError(f"port {port} must lie in [1024, {65535 - GRPC_PORT_OFFSET}]")
                if not (port_is_free(port) and port_is_free(port + GRPC_PORT_OFFSET)):
                    raise SeaweedError(f"port {port} or {port + GRPC_PORT_OFFSET} on {LOOPBACK} is in use")
            else:
                for _ in range(500):
                    port = rng.randrange(low, high)
                    pair = {port, port + GRPC_PORT_OFFSET}
                    if pair & taken:
                        continue
                    if port_is_free(port) and port_is_free(port + GRPC_PORT_OFFSET):
                        break
                else:
                    raise SeaweedError(f"no free port pair (p, p+{GRPC_PORT_OFFSET}) found in [{low}, {high})")
            taken |= {port, port + GRPC_PORT_OFFSET}
            chosen.append(port)
        _ports_handed_out.update(taken)
    return chosen
