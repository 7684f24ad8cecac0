"""Shared fixtures: one real S3 server (SeaweedFS) per test session, a fresh bucket per test,
and a local ``file://`` store."""

from __future__ import annotations

import uuid

import pytest

from raybranch.testing.seaweed import SeaweedServer

# Host settings that would redirect or break SigV4 requests to the test server.
_AWS_VARS_TO_CLEAR = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server on 127.0.0.1 shared by the whole session, stopped at the end."""
    server = SeaweedServer(str(tmp_path_factory.mktemp("seaweed")))
    server.start()
    yield server
    # weed's graceful stop always takes ~15 s (see raybranch.testing.seaweed) and this data
    # is throw-away, so do not wait the default 10 s before SIGKILL.
    server.stop(grace_s=1.0)


@pytest.fixture
def s3_uri(s3_server, monkeypatch):
    """``s3://<fresh bucket>/ckpts?endpoint_override=...``, with AWS_* set for the test."""
    for name in _AWS_VARS_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = s3_server.make_bucket(f"rb-{uuid.uuid4().hex[:20]}")
    return s3_server.store_uri(bucket, "ckpts")


@pytest.fixture
def file_uri(tmp_path):
    """URI of a not-yet-existing local store directory."""
    return "file://" + str(tmp_path / "store")
