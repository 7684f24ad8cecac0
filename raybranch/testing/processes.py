"""Processes of this machine, read from ``/proc`` (Linux): what the tests that start servers
(a Ray head, the local stack) use to find and stop exactly their own processes."""
from __future__ import annotations

import os
from pathlib import Path


def process_table() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, command line)} of every process readable now."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out[int(d.name)] = (ppid, cmd)
    return out


def with_descendants(table: dict[int, tuple[int, str]], roots: set[int]) -> set[int]:
    """``roots`` and every process below them in ``table``."""
    mine = set(roots)
    grew = True
    while grew:
        more = {pid for pid, (ppid, _) in table.items() if ppid in mine and pid not in mine}
        mine |= more
        grew = bool(more)
    return mine


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def send_signal(pids, sig: int) -> None:
    """``sig`` to each of ``pids`` that still exists."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


__all__ = ["alive", "process_table", "send_signal", "with_descendants"]
