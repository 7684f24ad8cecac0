"""Store URIs → a ``pyarrow.fs`` filesystem and a root path.

``file:///abs/path`` (or a plain path) → LocalFileSystem.
``s3://bucket/prefix?endpoint_override=http://127.0.0.1:8333&region=us-east-1&scheme=http``
→ S3FileSystem. Endpoint, region and scheme come from the query, else from the usual AWS
environment (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``,
``AWS_DEFAULT_REGION``); credentials only from the AWS environment / config chain — never from
the URI, and never logged.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import pyarrow.fs as pafs

from ..errors import StoreError

_S3_QUERY_KEYS = {"endpoint_override", "region", "scheme", "connect_timeout", "request_timeout", "retries", "retry_deadline"}
RETRY_DEADLINE_S = 60.0  # how long a request to an unreachable S3 server is retried before it fails


@dataclass
class Location:
    fs: pafs.FileSystem
    root: str  # no trailing slash
    uri: str  # what to show a user (no credentials)
    is_local: bool
    bucket: str = ""
    prefix: str = ""
    s3_kwargs: dict | None = None  # boto3 client arguments (endpoint, region, timeouts), no credentials
    retry_deadline: float = RETRY_DEADLINE_S
    source: str = ""  # the URI to open it again in another process (as given; a URI never holds credentials)


def parse_uri(uri: str) -> Location:
    if not isinstance(uri, str) or not uri.strip():
        raise StoreError("store URI is empty; use file:///path or s3://bucket/prefix")
    uri = uri.strip()
    if "://" not in uri:
        if ":" in uri.split("/")[0]:
            raise StoreError(f"malformed store URI {uri!r}; use file:///path or s3://bucket/prefix")
        return _local(os.path.abspath(uri))
    parts = urlsplit(uri)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise StoreError(f"malformed file URI {uri!r}; use file:///absolute/path")
        return _local(parts.path)
    if parts.scheme == "s3":
        return _s3(uri, parts)
    raise StoreError(f"unsupported store URI scheme {parts.scheme!r} in {uri!r}; use file:// or s3://")


def _local(path: str) -> Location:
    root = path.rstrip("/") or "/"
    return Location(pafs.LocalFileSystem(), root, "file://" + root, True, source="file://" + root)


def _s3(uri: str, parts) -> Location:
    bucket = parts.netloc
    if not bucket or "@" in bucket:
        raise StoreError(f"malformed S3 URI {uri!r}; use s3://bucket/prefix (credentials go in the AWS environment)")
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    unknown = set(query) - _S3_QUERY_KEYS
    if unknown:
        raise StoreError(f"unknown S3 URI option(s) {sorted(unknown)}; allowed: {sorted(_S3_QUERY_KEYS)}")
    endpoint = query.get("endpoint_override") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = query.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    scheme = query.get("scheme")
    kwargs = {"region": region}
    if endpoint:
        ep = urlsplit(endpoint if "://" in endpoint else f"{scheme or 'https'}://{endpoint}")
        if not ep.hostname:
            raise StoreError(f"malformed S3 endpoint {endpoint!r}")
        kwargs["endpoint_override"] = ep.netloc
        kwargs["scheme"] = scheme or ep.scheme or "https"
        kwargs["force_virtual_addressing"] = False
    elif scheme:
        kwargs["scheme"] = scheme
    try:
        kwargs["connect_timeout"] = float(query.get("connect_timeout", 3))
        kwargs["request_timeout"] = float(query.get("request_timeout", 30))
        retries = int(query.get("retries", 2))
        deadline = float(query.get("retry_deadline", RETRY_DEADLINE_S))
    except ValueError as exc:
        raise StoreError(f"bad S3 URI option in {uri!r}: {exc}") from None
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=max(1, retries))
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs["access_key"], kwargs["secret_key"] = key, secret
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    fs = pafs.S3FileSystem(**kwargs)
    root = (bucket + "/" + parts.path.strip("/")).rstrip("/")
    shown = f"s3://{root}" + (f" (endpoint {kwargs['scheme']}://{kwargs['endpoint_override']})" if endpoint else "")
    s3_kwargs = {"region_name": region, "connect_timeout": kwargs["connect_timeout"], "read_timeout": kwargs["request_timeout"]}
    if endpoint:
        s3_kwargs["endpoint_url"] = f"{kwargs['scheme']}://{kwargs['endpoint_override']}"
    return Location(fs, root, shown, False, bucket, parts.path.strip("/"), s3_kwargs, deadline, source=uri)
