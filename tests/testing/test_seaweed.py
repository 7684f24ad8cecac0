"""The SeaweedFS S3 test server: starts, serves signed S3 to boto3 and pyarrow, refuses bad
keys, and keeps its data across pause()/resume()."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from urllib.parse import parse_qs, urlsplit

import boto3
import botocore
import numpy as np
import pyarrow.fs as pafs
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError

from raybranch.errors import RaybranchError
from raybranch.testing.seaweed import SeaweedServer, find_weed_binary


def _payload(seed: int, size: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def _fresh_bucket(server: SeaweedServer) -> str:
    return server.make_bucket(f"t-{uuid.uuid4().hex[:20]}")


def _client(server: SeaweedServer, *, secret: str | None = None, unsigned: bool = False):
    config = Config(
        s3={"addressing_style": "path"},
        retries={"max_attempts": 1},
        connect_timeout=1,
        read_timeout=5,
        **({"signature_version": botocore.UNSIGNED} if unsigned else {}),
    )
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=secret or server.secret_key,
        region_name=server.region,
        config=config,
    )


def test_weed_binary_is_found():
    path = find_weed_binary()
    assert os.path.isfile(path) and os.access(path, os.X_OK)


def test_server_serves_on_loopback(s3_server):
    assert s3_server.running
    assert s3_server.endpoint == f"http://127.0.0.1:{s3_server.port}"
    assert s3_server.startup_s is not None and s3_server.startup_s < 60
    assert isinstance(s3_server.boto3_client().list_buckets()["Buckets"], list)


def test_make_bucket_is_listed_and_idempotent(s3_server):
    bucket = _fresh_bucket(s3_server)
    assert s3_server.make_bucket(bucket) == bucket
    names = [b["Name"] for b in s3_server.boto3_client().list_buckets()["Buckets"]]
    assert names.count(bucket) == 1


@pytest.mark.parametrize("bad", ["ab", "Upper", "under_score", "-lead", "a" * 64, "two..dots"])
def test_bad_bucket_name_is_rejected(s3_server, bad):
    with pytest.raises(ValueError, match="bucket name"):
        s3_server.make_bucket(bad)
    with pytest.raises(ValueError, match="bucket name"):
        s3_server.store_uri(bad)


def test_boto3_put_get_round_trip(s3_server):
    client = s3_server.boto3_client()
    bucket = _fresh_bucket(s3_server)
    small, large = _payload(0, 1000), _payload(1, 6_000_000)  # large > weed's 4 MB chunk
    client.put_object(Bucket=bucket, Key="a/small.bin", Body=small)
    client.put_object(Bucket=bucket, Key="a/b/large.bin", Body=large)
    assert client.get_object(Bucket=bucket, Key="a/small.bin")["Body"].read() == small
    assert client.get_object(Bucket=bucket, Key="a/b/large.bin")["Body"].read() == large
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="a/")["Contents"]]
    assert sorted(keys) == ["a/b/large.bin", "a/small.bin"]
    with pytest.raises(ClientError) as err:
        client.get_object(Bucket=bucket, Key="a/missing")
    assert err.value.response["Error"]["Code"] == "NoSuchKey"


def test_pyarrow_s3filesystem_write_read(s3_server):
    bucket = _fresh_bucket(s3_server)
    fs = pafs.S3FileSystem(
        endpoint_override=s3_server.endpoint,
        scheme="http",
        region=s3_server.region,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
    )
    data = _payload(2, 300_000)
    with fs.open_output_stream(f"{bucket}/x/blob.bin") as out:
        out.write(data)
    with fs.open_input_stream(f"{bucket}/x/blob.bin") as inp:
        assert inp.read() == data
    info = fs.get_file_info(f"{bucket}/x/blob.bin")
    assert info.type == pafs.FileType.File and info.size == len(data)
    assert s3_server.boto3_client().get_object(Bucket=bucket, Key="x/blob.bin")["Body"].read() == data


def test_store_uri_opens_with_pyarrow_from_uri(s3_uri, s3_server):
    parts = urlsplit(s3_uri)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert parts.scheme == "s3" and parts.path == "/ckpts"
    assert query == {"endpoint_override": s3_server.endpoint, "scheme": "http", "region": "us-east-1"}
    assert os.environ["AWS_ACCESS_KEY_ID"] == s3_server.access_key  # set by the fixture
    fs, path = pafs.FileSystem.from_uri(s3_uri)  # credentials come from the environment
    assert path == f"{parts.netloc}/ckpts"
    with fs.open_output_stream(f"{path}/hello.txt") as out:
        out.write(b"hello")
    with fs.open_input_stream(f"{path}/hello.txt") as inp:
        assert inp.read() == b"hello"


def test_store_uri_without_prefix(s3_server):
    uri = s3_server.store_uri("some-bucket")
    assert uri.startswith("s3://some-bucket?endpoint_override=http://127.0.0.1:")
    assert s3_server.store_uri("some-bucket", "/a/b/").startswith("s3://some-bucket/a/b?")


def test_env_names_the_credentials(s3_server):
    env = s3_server.env()
    assert env == {
        "AWS_ACCESS_KEY_ID": "raybranch",
        "AWS_SECRET_ACCESS_KEY": "raybranch-secret",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def test_file_uri_fixture(file_uri, tmp_path):
    assert file_uri == "file://" + str(tmp_path / "store")


def test_wrong_secret_and_anonymous_are_refused(s3_server):
    bucket = _fresh_bucket(s3_server)
    s3_server.boto3_client().put_object(Bucket=bucket, Key="k", Body=b"secret data")
    bad = _client(s3_server, secret="not-the-secret")
    with pytest.raises(ClientError) as err:
        bad.list_buckets()
    assert err.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    with pytest.raises(ClientError) as err:
        bad.get_object(Bucket=bucket, Key="k")
    assert err.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    anonymous = _client(s3_server, unsigned=True)
    with pytest.raises(ClientError) as err:
        anonymous.get_object(Bucket=bucket, Key="k")
    assert err.value.response["Error"]["Code"] == "AccessDenied"
    with pytest.raises(ClientError):
        anonymous.put_object(Bucket=bucket, Key="k2", Body=b"x")


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="secret_key"):
        SeaweedServer(secret_key="")
    with pytest.raises(ValueError, match="region"):
        SeaweedServer(region="us east")
    with pytest.raises(RaybranchError, match="call start"):
        _ = SeaweedServer().endpoint


def test_pause_resume_keeps_data_and_ports(tmp_path):
    data_dir = tmp_path / "s3"
    with SeaweedServer(str(data_dir)) as server:
        assert (data_dir / "weed.log").is_file()
        endpoint, client = server.endpoint, _client(server)
        bucket = _fresh_bucket(server)
        blob = _payload(3, 2_000_000)
        client.put_object(Bucket=bucket, Key="ckpts/step-1.arrow", Body=blob)

        server.pause()
        assert not server.running
        with pytest.raises(EndpointConnectionError):
            client.list_buckets()

        server.resume()
        assert server.running and server.endpoint == endpoint
        assert client.get_object(Bucket=bucket, Key="ckpts/step-1.arrow")["Body"].read() == blob
        client.put_object(Bucket=bucket, Key="ckpts/step-2.arrow", Body=blob[::-1])
        assert client.get_object(Bucket=bucket, Key="ckpts/step-2.arrow")["Body"].read() == blob[::-1]

        server.stop(grace_s=1.0)
        server.stop(grace_s=1.0)  # safe twice
        assert not server.running
    assert data_dir.is_dir()  # a caller-given data dir is kept


def test_owned_data_dir_is_removed_on_stop():
    server = SeaweedServer().start()
    try:
        data_dir = server.data_dir
        assert data_dir is not None and data_dir.is_dir()
    finally:
        server.stop(grace_s=1.0)
    assert not data_dir.exists()


def test_cli_up_prints_exports_and_stops_on_sigterm(tmp_path):
    out_path = tmp_path / "cli.out"
    command = [sys.executable, "-m", "raybranch.testing.seaweed", "up", "--dir", str(tmp_path / "s3"),
               "--bucket", "cli-bucket", "--grace", "0.5"]
    with open(out_path, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while "ready:" not in out_path.read_text():
            assert proc.poll() is None, out_path.read_text()
            assert time.monotonic() < deadline, out_path.read_text()
            time.sleep(0.1)
        lines = out_path.read_text().splitlines()
        endpoint = next(line.split(": ", 1)[1] for line in lines if line.startswith("endpoint: "))
        store = next(line.split(": ", 1)[1] for line in lines if line.startswith("store: "))
        assert store == f"s3://cli-bucket/ckpts?endpoint_override={endpoint}&scheme=http&region=us-east-1"
        assert "export AWS_SECRET_ACCESS_KEY=raybranch-secret" in lines
        weed_pid = int(re.search(r"weed pid (\d+)", lines[-1]).group(1))
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="raybranch",
                              aws_secret_access_key="raybranch-secret", region_name="us-east-1")
        assert [b["Name"] for b in client.list_buckets()["Buckets"]] == ["cli-bucket"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    with pytest.raises(ProcessLookupError):
        os.kill(weed_pid, 0)
