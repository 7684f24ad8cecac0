"""Store URIs: file://, plain paths, s3:// with query options and AWS-environment fallbacks."""
from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest

from raybranch.errors import StoreError
from raybranch.store.uri import parse_uri

_AWS_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")


@pytest.fixture
def clean_aws_env(monkeypatch):
    for v in _AWS_VARS:
        monkeypatch.delenv(v, raising=False)
    return monkeypatch


def s3_options(loc) -> dict:
    assert isinstance(loc.fs, pafs.S3FileSystem)
    return loc.fs.__reduce__()[1][0]


def test_file_uri(tmp_path):
    loc = parse_uri(f"file://{tmp_path}/store/")
    assert loc.is_local and isinstance(loc.fs, pafs.LocalFileSystem)
    assert loc.root == f"{tmp_path}/store"
    assert loc.uri == f"file://{tmp_path}/store"
    assert parse_uri(f"file://localhost{tmp_path}").root == str(tmp_path)


def test_plain_path_is_local_and_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loc = parse_uri("rel/dir")
    assert loc.is_local and loc.root == os.path.join(str(tmp_path), "rel", "dir")
    assert parse_uri(str(tmp_path / "abs")).root == str(tmp_path / "abs")


def test_s3_uri_with_query(clean_aws_env):
    loc = parse_uri("s3://bkt/a/b/?endpoint_override=http://127.0.0.1:9000&region=eu-west-1&connect_timeout=1.5&retries=4")
    assert not loc.is_local and loc.root == "bkt/a/b"
    opts = s3_options(loc)
    assert opts["endpoint_override"] == "127.0.0.1:9000"
    assert opts["scheme"] == "http"
    assert opts["region"] == "eu-west-1"
    assert opts["connect_timeout"] == 1.5
    assert opts["force_virtual_addressing"] is False
    assert loc.uri == "s3://bkt/a/b (endpoint http://127.0.0.1:9000)"


def test_s3_scheme_option_for_bare_host(clean_aws_env):
    opts = s3_options(parse_uri("s3://bkt?endpoint_override=127.0.0.1:9000&scheme=http"))
    assert (opts["endpoint_override"], opts["scheme"]) == ("127.0.0.1:9000", "http")
    assert s3_options(parse_uri("s3://bkt?endpoint_override=minio.example:9000"))["scheme"] == "https"


def test_s3_bucket_only_root(clean_aws_env):
    assert parse_uri("s3://bkt").root == "bkt"
    assert parse_uri("s3://bkt/").root == "bkt"


def test_s3_env_fallback(clean_aws_env):
    clean_aws_env.setenv("AWS_ENDPOINT_URL_S3", "http://10.1.2.3:8333")
    clean_aws_env.setenv("AWS_ENDPOINT_URL", "http://10.9.9.9:1")
    clean_aws_env.setenv("AWS_REGION", "ap-south-1")
    opts = s3_options(parse_uri("s3://bkt/p"))
    assert (opts["endpoint_override"], opts["scheme"], opts["region"]) == ("10.1.2.3:8333", "http", "ap-south-1")

    clean_aws_env.delenv("AWS_ENDPOINT_URL_S3")
    clean_aws_env.delenv("AWS_REGION")
    clean_aws_env.setenv("AWS_DEFAULT_REGION", "eu-north-1")
    opts = s3_options(parse_uri("s3://bkt/p"))
    assert (opts["endpoint_override"], opts["region"]) == ("10.9.9.9:1", "eu-north-1")

    # the query wins over the environment
    opts = s3_options(parse_uri("s3://bkt/p?endpoint_override=http://127.0.0.1:7&region=us-west-2"))
    assert (opts["endpoint_override"], opts["region"]) == ("127.0.0.1:7", "us-west-2")


def test_s3_defaults_without_env(clean_aws_env):
    opts = s3_options(parse_uri("s3://bkt/p"))
    assert opts["region"] == "us-east-1"
    assert opts["endpoint_override"] == ""


def test_credentials_only_from_env_and_never_shown(clean_aws_env):
    clean_aws_env.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    clean_aws_env.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    loc = parse_uri("s3://bkt/p?endpoint_override=http://127.0.0.1:9000")
    assert s3_options(loc)["access_key"] == "AKIDEXAMPLE"
    assert "very-secret-value" not in loc.uri and "AKIDEXAMPLE" not in loc.uri


@pytest.mark.parametrize(
    "uri, names",
    [
        ("s3://", "s3://"),
        ("s3:///prefix", "s3:///prefix"),
        ("s3://user:pw@bkt/p", "credentials"),
        ("ftp://x", "ftp"),
        ("http://host/path", "http"),
        ("file://relative", "file://relative"),
        ("file://host/abs", "file://host/abs"),
        ("file:relative", "file:relative"),
        ("s3://bkt/p?endpoint=http://h:1", "endpoint"),
        ("s3://bkt/p?region=x&colour=blue", "colour"),
        ("s3://bkt/p?connect_timeout=soon", "connect_timeout"),
        ("s3://bkt/p?retries=many", "retries"),
        ("", "empty"),
        ("   ", "empty"),
    ],
)
def test_malformed_uri_one_line_error(uri, names, clean_aws_env):
    with pytest.raises(StoreError) as ei:
        parse_uri(uri)
    msg = str(ei.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    assert names in msg


def test_non_string_uri():
    with pytest.raises(StoreError):
        parse_uri(None)  # type: ignore[arg-type]
