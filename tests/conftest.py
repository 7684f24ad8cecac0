"""Shared fixtures: one real S3 server (SeaweedFS) per test session, fresh buckets per test."""
import itertools
import os

import pytest

from raybranch.testing.seaweed import SeaweedServer

_buckets = itertools.count()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    with SeaweedServer(str(tmp_path_factory.mktemp("seaweed"))) as server:
        yield server


@pytest.fixture
def s3_uri(s3_server, monkeypatch):
    """A fresh bucket on the real S3 server; AWS credentials in the environment for the test."""
    bucket = f"t{os.getpid()}-{next(_buckets)}"
    s3_server.make_bucket(bucket)
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return s3_server.store_uri(bucket, "ckpts")


@pytest.fixture
def file_uri(tmp_path):
    return "file://" + str(tmp_path / "store")
