"""SeaweedServer: one SeaweedFS ``weed server -s3`` process on loopback, its lifecycle and S3 clients.

One ``weed server`` process runs master, volume server, filer and S3 gateway; every service
listens on 127.0.0.1 only, on a port ``p`` picked free (:mod:`raybranch.testing.ports`) and on
``p + 10000`` for its gRPC side. The binary is found by
:func:`raybranch.testing.weed_binary.find_weed_binary`. Clients must sign requests (SigV4)
with the configured access/secret key.

Quirks of SeaweedFS 4.x handled here:

* A graceful stop (SIGTERM) always takes about 15 s, because the filer's gRPC server waits
  for its own metadata subscription. ``stop(grace_s)`` therefore ends in SIGKILL after
  ``grace_s``; nothing is lost, since needles, ``.idx`` entries and the filer's leveldb
  journal are written with plain ``write()`` calls before a request is acknowledged
  (``pause()``/``resume()`` checks exactly that in the tests).
* The master runs with ``-master.peers=none -master.resumeState=false`` (single-master mode):
  otherwise a restart waits ~2-12 s for a Raft leader election, and a volume server whose
  first heartbeat loses that race retries only 5 s later. The volume server re-reports
  every volume on its first heartbeat, so no state is lost. Start to ready: ~2.3 s.
* Each S3 bucket is a SeaweedFS collection; ``WEED_MASTER_VOLUME_GROWTH_COPY_1=1`` makes a
  new bucket take one volume instead of seven, so a test session can make hundreds.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
import weakref
from pathlib import Path
from typing import Any

from ..errors import SeaweedError
from .ports import GRPC_PORT_OFFSET, LOOPBACK, pick_ports
from .weed_binary import find_weed_binary

DEFAULT_ACCESS_KEY = "raybranch"
DEFAULT_SECRET_KEY = "raybranch-secret"
DEFAULT_REGION = "us-east-1"
STARTUP_DEADLINE_S = 60.0
STOP_GRACE_S = 10.0
LOG_NAME = "weed.log"
S3_CONFIG_NAME = "s3-identities.json"
VOLUME_SIZE_LIMIT_MB = 64
MAX_VOLUMES = 1000
# SeaweedFS leaves unix sockets named /tmp/seaweedfs-<service>-<port>.sock behind on SIGKILL.
_SOCKET_DIR = Path("/tmp")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SERVICES = ("master", "volume", "filer", "s3")

_live_servers: "weakref.WeakSet[SeaweedServer]" = weakref.WeakSet()


def check_bucket_name(name: str) -> str:
    """``name`` if it is a valid S3 bucket name (3-63 of a-z, 0-9, '.', '-'), else ValueError."""
    if not isinstance(name, str) or not _BUCKET_RE.match(name) or ".." in name:
        raise ValueError(f"bad S3 bucket name {name!r}: need 3-63 chars of a-z, 0-9, '.', '-'")
    return name


class SeaweedServer:
    """One SeaweedFS ``weed server`` with an S3 gateway on 127.0.0.1.

    Use as a context manager or call ``start()``/``stop()``. ``pause()`` kills the process
    (as a crash would) and ``resume()`` restarts it on the same ports and data dir.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
        region: str = DEFAULT_REGION,
        *,
        port: int | None = None,
        startup_deadline_s: float = STARTUP_DEADLINE_S,
    ) -> None:
        for label, value in (("access_key", access_key), ("secret_key", secret_key), ("region", region)):
            if not isinstance(value, str) or not value or any(c.isspace() for c in value):
                raise ValueError(f"bad {label} {value!r}: need a non-empty string without whitespace")
        if startup_deadline_s <= 0:
            raise ValueError(f"bad startup_deadline_s {startup_deadline_s!r}: must be > 0")
        self._owns_dir = data_dir is None
        # absolute: weed runs with cwd=data_dir, where a relative -dir would nest
        self.data_dir = Path(data_dir).expanduser().absolute() if data_dir is not None else None
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.startup_deadline_s = float(startup_deadline_s)
        self._requested_port = port
        self._ports: dict[str, int] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self.startup_s: float | None = None  # wall time of the last start, to ready

    # ----------------------------------------------------------------- attributes
    @property
    def port(self) -> int:
        """The S3 HTTP port."""
        return self._require_ports()["s3"]

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def master_port(self) -> int:
        return self._require_ports()["master"]

    @property
    def log_path(self) -> Path:
        return self._require_dir() / LOG_NAME

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _require_ports(self) -> dict[str, int]:
        if self._ports is None:
            raise SeaweedError("SeaweedServer has no ports yet: call start() first")
        return self._ports

    def _require_dir(self) -> Path:
        if self.data_dir is None:
            raise SeaweedError("SeaweedServer has no data dir yet: call start() first")
        return self.data_dir

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> "SeaweedServer":
        """Start the server (no-op if it runs) and block until S3 and storage serve."""
        if self.running:
            return self
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="raybranch-seaweed-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._ports is None:
            fixed = {_SERVICES.index("s3"): self._requested_port} if self._requested_port else None
            self._ports = dict(zip(_SERVICES, pick_ports(len(_SERVICES), fixed)))
        self._write_s3_config()
        self._launch()
        _live_servers.add(self)
        return self

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM the process group, wait up to ``grace_s``, then SIGKILL. Safe to repeat.

        Removes the data dir if this object created it (``data_dir=None``).
        """
        self._halt(grace_s)
        _live_servers.discard(self)
        if self._owns_dir and self.data_dir is not None and self.data_dir.exists():
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def pause(self) -> None:
        """Take S3 down now (SIGKILL, like a crash); data dir and ports are kept."""
        if self._proc is None:
            raise SeaweedError("pause() on a SeaweedServer that is not running")
        self._halt(0.0)

    def resume(self) -> None:
        """Restart a paused server on the same ports and data dir; blocks until ready."""
        if self._ports is None:
            raise SeaweedError("resume() on a SeaweedServer that was never started")
        if not self.running:
            self._launch()

    def __enter__(self) -> "SeaweedServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.endpoint if self._ports else "not started"
        return f"SeaweedServer({where}, dir={str(self.data_dir)!r}, running={self.running})"

    def _command(self) -> list[str]:
        ports = self._require_ports()
        data_dir = self._require_dir()
        args = [
            find_weed_binary(),
            "server",
            f"-dir={data_dir}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            "-master.telemetry=false",
            "-master.resumeState=false",
            "-master.peers=none",
            f"-master.volumeSizeLimitMB={VOLUME_SIZE_LIMIT_MB}",
            f"-volume.max={MAX_VOLUMES}",
            "-volume.preStopSeconds=0",
            "-filer",
            "-s3",
            f"-s3.config={data_dir / S3_CONFIG_NAME}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        for service in _SERVICES:
            args.append(f"-{service}.port={ports[service]}")
            args.append(f"-{service}.port.grpc={ports[service] + GRPC_PORT_OFFSET}")
        return args

    def _write_s3_config(self) -> None:
        identity = {
            "name": self.access_key,
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        path = self._require_dir() / S3_CONFIG_NAME
        path.write_text(json.dumps({"identities": [identity]}, indent=2) + "\n")
        path.chmod(0o600)

    def _launch(self) -> None:
        data_dir = self._require_dir()
        env = dict(os.environ)
        env["WEED_MASTER_VOLUME_GROWTH_COPY_1"] = "1"
        log_path = self.log_path
        self._log_offset = log_path.stat().st_size if log_path.exists() else 0
        started = time.monotonic()
        with open(log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=data_dir,  # keep weed from reading a stray ./master.toml or ./filer.toml
                env=env,
                start_new_session=True,
            )
        try:
            self._wait_ready(started + self.startup_deadline_s)
        except BaseException:
            self._halt(0.0)
            raise
        self.startup_s = time.monotonic() - started

    def _wait_ready(self, deadline: float) -> None:
        """Poll until S3 answers a signed ListBuckets and the master knows a volume server."""
        client = self.boto3_client(connect_timeout=0.5, read_timeout=2.0, max_attempts=1)
        s3_ok = False
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise SeaweedError(f"weed server exited with code {code} during start\n{self.log_tail()}")
            try:
                if not s3_ok:
                    client.list_buckets()
                    s3_ok = True
                if self._volume_server_registered():
                    return
                last_error = "master has no volume server yet"
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
                last_error = f"{type(exc).__name__}: {exc}"
            time.sleep(0.1)
        raise SeaweedError(
            f"SeaweedFS S3 at {self.endpoint} not ready after {self.startup_deadline_s:.0f} s "
            f"({last_error})\n{self.log_tail()}"
        )

    def _volume_server_registered(self) -> bool:
        url = f"http://{LOOPBACK}:{self.master_port}/dir/status"
        with urllib.request.urlopen(url, timeout=2.0) as response:  # noqa: S310 - fixed loopback URL
            status = json.load(response)
        return int(status.get("Topology", {}).get("Max", 0)) > 0

    def _halt(self, grace_s: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=grace_s if grace_s > 0 else 10.0)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10.0)
        self._remove_stale_sockets()

    def _remove_stale_sockets(self) -> None:
        if self._ports is None:
            return
        for port in self._ports.values():
            for number in (port, port + GRPC_PORT_OFFSET):
                for path in _SOCKET_DIR.glob(f"seaweedfs-*-{number}.sock"):
                    if path.is_socket():
                        path.unlink(missing_ok=True)

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines the current (or last) run wrote to its log."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode("utf-8", errors="replace")
        except (OSError, SeaweedError):
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # ----------------------------------------------------------------- clients
    def boto3_client(
        self, *, connect_timeout: float = 5.0, read_timeout: float = 60.0, max_attempts: int = 3
    ) -> Any:
        """A boto3 S3 client for this server (path-style addressing, SigV4)."""
        import boto3
        from botocore.config import Config

        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": max_attempts, "mode": "standard"},
        )
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=config,
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (fine if it already exists); returns the name."""
        check_bucket_name(name)
        client = self.boto3_client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return name

    def store_uri(self, bucket: str, prefix: str = "") -> str:
        """``s3://bucket/prefix?endpoint_override=http://127.0.0.1:P&scheme=http&region=R``."""
        check_bucket_name(bucket)
        path = bucket + ("/" + prefix.strip("/") if prefix.strip("/") else "")
        return f"s3://{path}?endpoint_override={self.endpoint}&scheme=http&region={self.region}"

    def env(self) -> dict[str, str]:
        """AWS credential/region variables that let SDKs talk to this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }


@atexit.register
def _stop_leftover_servers() -> None:
    for server in list(_live_servers):
        server.stop(grace_s=1.0)

