"""Job submission end to end: a real local Ray head (its own temp dir and free loopback ports), a
real S3 store (SeaweedFS), the run workflow as one ``ray job submit -- raybranch <command> ...``
per command (or per few, chained in one shell line; the Ray ones train 2 DDP workers per branch),
then ``raybranch restore`` from S3 in a separate process where ``import ray`` fails."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import raybranch as rb
from raybranch.ledger.lineage import Lineage
from raybranch.ledger.verify import verify_store
from raybranch.testing.processes import alive, process_table, send_signal, with_descendants

ROOT = Path(__file__).resolve().parents[2]
RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]
NO_RAY_RESTORE = (
    "import sys; sys.modules['ray'] = None\n"  # any `import ray` now raises ImportError
    "from raybranch.cli.main import main\n"
    "rc = main(sys.argv[1:])\n"
    "assert not any(m == 'ray' or m.startswith('ray.') for m in sys.modules if sys.modules[m] is not None)\n"
    "sys.exit(rc)\n"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalHead:
    """A Ray head on 127.0.0.1 with its own temp dir; ``stop`` ends only its own processes."""

    def __init__(self, env: dict[str, str]):
        self.tmp = tempfile.mkdtemp(prefix="rbjob-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        self.dashboard = free_port()
        self.env = env
        self.gcs = free_port()

    def start(self) -> None:
        cmd = [*RAY_CLI, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard}",
               f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
               "--num-cpus=2", f"--temp-dir={self.tmp}", "--disable-usage-stats"]
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr

    def pids(self) -> list[int]:
        """This head's processes: those naming its temp dir or GCS port, and their descendants."""
        table = process_table()
        mine = with_descendants(table, {pid for pid, (_, cmd) in table.items() if self.tmp in cmd or f"127.0.0.1:{self.gcs}" in cmd})
        mine.discard(os.getpid())
        return sorted(mine)

    def stop(self) -> None:
        pids = self.pids()
        send_signal(pids, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.1)
        send_signal([p for p in pids if alive(p)], signal.SIGKILL)
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS", "RAYBRANCH_STORE"))}
    env.update(s3_server.env())
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    for k, v in s3_server.env().items():  # this process reads the store too
        monkeypatch.setenv(k, v)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` in the job = this venv's
    env["RAY_AUTH_MODE"] = "token"
    env["PYTHONUNBUFFERED"] = "1"
    bucket = s3_server.make_bucket(f"rbjob-{uuid.uuid4().hex[:16]}")
    return env, s3_server.store_uri(bucket, "runs")


@pytest.fixture
def head(s3_env):
    env, _ = s3_env
    h = LocalHead(env)  # the head (and so every job, worker and actor) has the S3 credentials
    try:
        h.start()
        yield h
    finally:
        h.stop()
    assert [p for p in h.pids() if alive(p)] == []


def test_workflow_as_ray_jobs_on_a_local_head_with_s3_then_restore_without_ray(tmp_path, s3_env, head):
    """init, slices 1–3 arriving one by one, slice 2 marked poisoned after slice 3 has trained,
    quarantine: each command (or two chained) a `ray job submit -- raybranch …`; train 3 on Ray
    Train workers, 2 DDP ranks."""
    env, uri = s3_env
    address = f"http://127.0.0.1:{head.dashboard}"
    s = ["--store", uri, "--run", "job"]

    def submit(*commands: list[str]) -> str:
        """One job running the raybranch commands in turn (a shell line with && for several)."""
        job_id = f"raybranch-test-{uuid.uuid4().hex[:8]}"
        entry = (["raybranch", *commands[0]] if len(commands) == 1
                 else ["sh", "-c", " && ".join(shlex.join(["raybranch", *c]) for c in commands)])
        sub = subprocess.run(  # waits for the job and follows its logs
            [*RAY_CLI, "job", "submit", "--address", address, "--working-dir", str(tmp_path / "wd"), "--submission-id", job_id,
             "--", *entry],  # ray quotes each argument for the shell
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )
        logs = sub.stdout + sub.stderr
        assert sub.returncode == 0, logs[-6000:]
        return logs

    (tmp_path / "wd").mkdir()
    t0 = time.perf_counter()
    # the run's Ray settings: its --ray commands train each branch as 2 DDP workers
    submit(["init", *s, "--config", str(ROOT / "jobs/configs/quick.yaml"), "mechanisms=[lc]", "epochs=1", "patience=0",
            "branch_point_max_epochs=3", "split=40/30/30", "poison_slice=2", "num_workers=2", "cpus_per_worker=0.5"])
    logs = submit(["train", *s, "--slice", "1"], ["train", *s, "--slice", "2"])
    assert "main trained slice(s) 1 (local" in logs and "main trained slice(s) 2 (local" in logs
    logs = submit(["train", *s, "--slice", "3", "--ray"])
    assert "main trained slice(s) 3 (ray" in logs
    main = Lineage(rb.open_store(uri), "job", "main")
    assert main.log.head["world_size"] == 2 and len(main.entry()["parts"]) == 2  # slice 3: both ranks' parts
    submit(["mark", *s, "--slice", "1", "--verified"], ["mark", *s, "--slice", "3", "--verified"])
    logs = submit(["mark", *s, "--slice", "2", "--poisoned"])
    assert "clean trained slice(s) 3" in logs
    logs = submit(["quarantine", *s, "--slice", "2"])  # the replay trains in the job's driver (on Ray: test_runner.py)
    assert "instant recovery: served → job/clean/" in logs and "it is now main" in logs
    print(f"workflow as jobs in {time.perf_counter() - t0:.1f} s")

    # every report sits in the store (S3), and the Ray runs' bookkeeping too
    store = rb.open_store(uri)
    names = {i.base_name for i in store.list("job/reports")}
    assert {"report.json", "report.md", "accuracy_per_slice.png", "bytes_per_branch.png"} <= names
    report = json.loads(store.read_bytes("job/reports/report.json"))
    lc = report["mechanisms"]["lc"]
    rec = lc["recovery"]
    assert set(lc["branches"]) == {"main", "clean", "replay"}
    assert rec["acc_replay"] == rec["acc_oracle"] and rec["asr_after"] <= lc["branches"]["clean"]["attack_success_rate"] + 0.02
    assert any(i.rel.startswith("job/_ray/") for i in store.list("job/_ray", recursive=True))
    assert [r["run"] for r in json.loads(subprocess.run(["raybranch", "runs", "--store", uri, "--json"], env=env,
                                                        capture_output=True, text=True, timeout=120, check=True).stdout)] == ["job"]

    # the store is on S3: restore the served model in a process that cannot import Ray
    target = tmp_path / "served.safetensors"
    restore_env = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    r = subprocess.run(
        [sys.executable, "-c", NO_RAY_RESTORE, "restore", "--store", uri, "--run", "job", "--branch", "clean",
         "--step", str(rec["served"]["step"]), "--output", str(target)],
        cwd=tmp_path, env=restore_env, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("restored job/clean/")
    tensors = load_file(str(target))
    want = rb.Reader(store, "job").restore("clean", rec["served"]["step"])
    assert set(tensors) == set(want["model"])
    for k, v in want["model"].items():
        assert torch.equal(tensors[k], v), k
    # the served model restored from S3 is the one the report measured
    from raybranch.runs.context import RunContext
    from raybranch.train.loop import evaluate_accuracy

    ctx = RunContext(store, "job")
    model = ctx.base_model()
    model.load_state_dict(tensors)
    assert evaluate_accuracy(model, *ctx.data.test) == pytest.approx(rec["acc_instant"])
    rep = verify_store(store, "job")
    assert rep.problems == [] and rep.counts["steps"] > 0
