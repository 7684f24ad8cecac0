"""``infra/local.sh`` end to end, as a user runs it: ``up`` in a fresh ``HOME`` (so it must generate
the Ray token itself) with its own state dir and free loopback ports, S3 answering with the
credentials it prints, one ``ray job submit`` through the token-authenticated Jobs API, then
``down``, after which none of the stack's processes may remain."""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from raybranch.testing.processes import alive, process_table, with_descendants

ROOT = Path(__file__).resolve().parents[2]
LOCAL_SH = ROOT / "infra" / "local.sh"
RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]
JOB_CODE = "import raybranch, torch; print('ok', raybranch.__file__)"


def _bindable(port: int) -> bool:
    """Whether a listener could bind 127.0.0.1:port (SO_REUSEADDR, as Go and Ray's servers do)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pick_ports() -> dict[str, str]:
    """The port variables of infra/local.sh, all free now and away from its defaults (a running
    default stack keeps working), from the test suite's other servers (SeaweedFS picks p in
    [20000, 22768) and p + 10000; tests/cluster's heads use Ray's default worker range 10002-19999)
    and from each other."""
    rng = random.SystemRandom()
    for _ in range(200):  # S3 on p, its gRPC side on p + 10000
        s3 = rng.randrange(27000, 28000)
        if _bindable(s3) and _bindable(s3 + 10000):
            break
    else:
        pytest.fail("no free S3 port pair")
    for _ in range(200):  # Ray workers: a block of 100 free ports
        low = rng.randrange(25000, 26900)
        if all(_bindable(p) for p in range(low, low + 100)):
            break
    else:
        pytest.fail("no free block of worker ports")
    ports = {"RAYBRANCH_S3_PORT": s3}
    for name in ("RAYBRANCH_RAY_PORT", "RAYBRANCH_DASHBOARD_PORT", "RAYBRANCH_DASHBOARD_AGENT_PORT",
                 "RAYBRANCH_RAY_CLIENT_PORT"):
        port = _free_port()
        while port in ports.values() or port == s3 + 10000:
            port = _free_port()
        ports[name] = port
    out = {k: str(v) for k, v in ports.items()}
    out["RAYBRANCH_RAY_WORKER_PORTS"] = f"{low}-{low + 99}"
    return out


class Stack:
    """One infra/local.sh stack of this test: its environment, and its processes found by its state
    dir (Ray's temp dir and the S3 data dir lie in it) or its GCS port (Ray's client server), plus
    their descendants."""

    def __init__(self, home: Path, state: str, ports: dict[str, str]):
        self.home, self.state, self.ports = home, state, ports
        keep = {"RAYBRANCH_WEED"}
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "RAY_", "RAYBRANCH_")) or k in keep}
        env.update(ports)
        env.update(HOME=str(home), RAYBRANCH_LOCAL_DIR=state, PYTHON=sys.executable, RAYBRANCH_NUM_CPUS="2",
                   PYTHONUNBUFFERED="1")
        self.env = env
        self.dashboard = f"http://127.0.0.1:{ports['RAYBRANCH_DASHBOARD_PORT']}"
        self._gcs = re.compile(rf"--address=\S*:{ports['RAYBRANCH_RAY_PORT']}(\s|$)")

    def sh(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(LOCAL_SH), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def pids(self) -> dict[int, str]:
        table = process_table()
        mine = with_descendants(table, {pid for pid, (_, cmd) in table.items() if self.state in cmd or self._gcs.search(cmd)})
        mine.discard(os.getpid())
        return {pid: table[pid][1] for pid in sorted(mine) if alive(pid)}

    def logs(self) -> str:
        out = []
        for name in ("s3.out", "ray-start.out", "ray-token.out"):
            p = Path(self.state) / name
            if p.exists():
                out.append(f"--- {name}\n{p.read_text()[-3000:]}")
        return "\n".join(out)


@pytest.fixture
def stack(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    state = tempfile.mkdtemp(prefix="rbls-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    s = Stack(home, state, _pick_ports())
    try:
        yield s
    finally:
        down = s.sh("down", timeout=120)
        left = s.pids()
        for pid in left:  # only processes of this stack (they name its state dir); never others
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(state, ignore_errors=True)
        assert down.returncode == 0, down.stdout + down.stderr
        assert left == {}, f"left after `local.sh down`: {left}\n{down.stdout}{down.stderr}"


@pytest.mark.timeout(300)
def test_local_sh_up_submit_down_in_fresh_home(stack, tmp_path):
    t0 = time.monotonic()
    up = stack.sh("up")
    assert up.returncode == 0, up.stdout + up.stderr + stack.logs()
    out = up.stdout

    # the Ray token was generated, owner-only, in the fresh HOME
    token = stack.home / ".ray" / "auth_token"
    assert "created the auth token" in out
    assert token.is_file() and token.read_text().strip()
    assert stat.S_IMODE(token.stat().st_mode) & 0o077 == 0, oct(token.stat().st_mode)

    # the printed exports: Jobs API and S3 on the ports asked for, credentials to use
    exports = dict(re.findall(r"^export (\w+)=(.*)$", out, re.M))
    assert exports["RAY_ADDRESS"] == stack.dashboard and exports["RAY_AUTH_MODE"] == "token"
    store = exports["RAYBRANCH_STORE"].strip("'")
    endpoint = re.search(r"endpoint_override=([^&]+)", store).group(1)
    assert store.startswith("s3://raybranch/") and endpoint == f"http://127.0.0.1:{stack.ports['RAYBRANCH_S3_PORT']}"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=exports["AWS_REGION"],
                      aws_access_key_id=exports["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=exports["AWS_SECRET_ACCESS_KEY"],
                      config=Config(s3={"addressing_style": "path"}, connect_timeout=5, read_timeout=10,
                                    retries={"max_attempts": 2}))
    assert "raybranch" in [b["Name"] for b in s3.list_buckets()["Buckets"]]

    running = stack.pids()
    names = " ".join(running.values())
    assert "gcs_server" in names and "raylet" in names and "weed server" in names, running

    # `up` again changes nothing; `status` sees both
    again = stack.sh("up")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "S3: already running" in again.stdout and "Ray: already running" in again.stdout
    st = stack.sh("status", timeout=60)
    assert "S3: running" in st.stdout and "Ray: running" in st.stdout, st.stdout + st.stderr

    # one job through the Jobs API, authenticated with the generated token (HOME is the fresh one)
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "hello.txt").write_text("a small working dir\n")
    job_id = f"raybranch-localsh-{uuid.uuid4().hex[:8]}"
    sub = subprocess.run(
        [*RAY_CLI, "job", "submit", "--address", stack.dashboard, "--working-dir", str(wd),
         "--submission-id", job_id, "--", "python", "-c", JOB_CODE],
        cwd=tmp_path, env={**stack.env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=180,
    )
    logs = sub.stdout + sub.stderr
    assert sub.returncode == 0, logs[-6000:] + stack.logs()
    assert f"Job '{job_id}' succeeded" in logs, logs[-6000:]
    printed = re.search(r"^ok (\S+)$", sub.stdout, re.M)
    assert printed, logs[-6000:]
    assert printed.group(1).endswith(os.path.join("raybranch", "__init__.py")) and Path(printed.group(1)).is_file()

    # down stops all of it
    down = stack.sh("down", timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "Ray: stopped" in down.stdout and "S3: stopped" in down.stdout, down.stdout + down.stderr
    assert [pid for pid in running if alive(pid) and pid in stack.pids()] == []
    assert stack.pids() == {}
    st = stack.sh("status", timeout=60)
    assert "S3: not running" in st.stdout and "Ray: not running" in st.stdout, st.stdout + st.stderr
    print(f"local.sh up, job, down: {time.monotonic() - t0:.1f} s")
