"""The S3 back end (AWS S3, MinIO, SeaweedFS) over boto3.

* ``create`` is a PUT with ``If-None-Match: *``: the server refuses (412) when the key exists.
* ``cas`` is a PUT with ``If-Match: <etag>`` (or ``If-None-Match: *`` to create).
* Every request is retried with exponential backoff (0.1 s doubling to 2 s) while the server is
  unreachable or answers 5xx/429, until ``retry_deadline`` seconds have passed; then a
  :class:`StoreError` names the operation. A conditional PUT whose first attempt may have landed
  and whose retry is refused (412) is resolved by reading the object back: the same bytes mean
  the first attempt won.
* Credentials come from the usual AWS chain (environment, config files); they are never logged.
"""
from __future__ import annotations

import random
import time

from ..errors import ConflictError, NotFoundError, StoreError
from .objects import ObjInfo, RequestStats, one_line

_TRANSIENT_CODES = {"500", "502", "503", "504", "429", "SlowDown", "InternalError", "ServiceUnavailable",
                    "RequestTimeout", "ConditionalRequestConflict", "409", "OperationAborted"}


class S3Backend:
    is_local = False

    def __init__(self, bucket: str, prefix: str, client_kwargs: dict, stats: RequestStats, retry_deadline: float):
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.root = f"{bucket}/{self.prefix}".rstrip("/")
        self.stats = stats
        self.retry_deadline = retry_deadline
        # one attempt per call (our loop retries), and no attempt may outlast the deadline: a hung
        # server (it accepts connections and never answers) then fails within about 2 × deadline
        bound = max(0.5, retry_deadline)
        cfg = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            connect_timeout=min(client_kwargs.pop("connect_timeout", 3.0), bound),
            read_timeout=min(client_kwargs.pop("read_timeout", 30.0), bound),
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=32,
        )
        self.client = boto3.session.Session().client("s3", config=cfg, **client_kwargs)
        try:  # no "Expect: 100-continue" wait before each PUT body (a round trip, or 1 s on a hung server)
            from botocore.handlers import add_expect_header

            self.client.meta.events.unregister("before-call.s3.PutObject", add_expect_header)
        except ImportError:
            pass
        from botocore.exceptions import BotoCoreError, ClientError

        self._ClientError, self._BotoCoreError = ClientError, BotoCoreError

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _rel(self, key: str) -> str:
        return key[len(self.prefix) + 1:] if self.prefix else key

    def _call(self, kind: str, what: str, fn, _deadline: float | None = None, **kw):
        """fn(**kw) with retries on transient failures; returns (response, attempts)."""
        budget = self.retry_deadline if _deadline is None else _deadline
        deadline = time.monotonic() + budget
        delay, attempt = 0.1, 0
        while True:
            attempt += 1
            self.stats.add(kind)
            try:
                return fn(**kw), attempt
            except self._ClientError as exc:
                code = _code(exc)
                if code not in _TRANSIENT_CODES:
                    raise
                err = exc
            except self._BotoCoreError as exc:  # connection refused / reset / timeout
                err = exc
            if time.monotonic() + delay > deadline:
                raise StoreError(f"cannot {what} at s3://{self.root}: gave up after {attempt} attempt(s) in "
                                 f"{budget:g} s: {one_line(err)}") from None
            self.stats.add("retries")
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)

    # -- operations ---------------------------------------------------------------------------
    def read_tagged(self, rel: str) -> tuple[bytes, str]:
        def get(**kw):
            r = self.client.get_object(**kw)
            return r["Body"].read(), r["ETag"]
        try:
            (data, etag), _ = self._call("get", f"read {rel}", get, Bucket=self.bucket, Key=self._key(rel))
            return data, etag
        except self._ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                raise NotFoundError(f"{rel} does not exist") from None
            raise StoreError(f"cannot read {rel}: {one_line(exc)}") from None

    def read(self, rel: str) -> bytes:
        return self.read_tagged(rel)[0]

    def write(self, rel: str, data: bytes) -> None:
        try:
            self._call("put", f"write {rel}", self.client.put_object, Bucket=self.bucket, Key=self._key(rel), Body=data)
        except self._ClientError as exc:
            raise StoreError(f"cannot write {rel}: {one_line(exc)}") from None

    def touch(self, rel: str) -> None:
        self.write(rel, self.read(rel))

    def _conditional(self, rel: str, data: bytes, **cond) -> str | None:
        """The new ETag, or None when the condition failed (and the object is not ours)."""
        try:
            r, attempts = self._call("put", f"write {rel}", self.client.put_object, Bucket=self.bucket,
                                     Key=self._key(rel), Body=data, **cond)
            return r["ETag"]
        except self._ClientError as exc:
            if _code(exc) not in ("PreconditionFailed", "412"):
                raise StoreError(f"cannot write {rel}: {one_line(exc)}") from None
        try:  # an earlier attempt may have landed and its answer been lost: ours if the bytes match
            have, etag = self.read_tagged(rel)
        except NotFoundError:
            return None
        return etag if have == data else None

    def create(self, rel: str, data: bytes) -> bool:
        return self._conditional(rel, data, IfNoneMatch="*") is not None

    def cas(self, rel: str, data: bytes, expect: str | None) -> str:
        cond = {"IfNoneMatch": "*"} if expect is None else {"IfMatch": expect}
        etag = self._conditional(rel, data, **cond)
        if etag is None:
            raise ConflictError(f"{rel} changed under us (expected {expect or 'absent'})")
        return etag

    def delete(self, rel: str) -> None:
        try:
            self._call("delete", f"delete {rel}", self.client.delete_object, Bucket=self.bucket, Key=self._key(rel))
        except self._ClientError as exc:
            if _code(exc) not in ("NoSuchKey", "404"):
                raise StoreError(f"cannot delete {rel}: {one_line(exc)}") from None

    def temporaries(self, rel_dir: str) -> list[ObjInfo]:
        """An S3 PUT is atomic: nothing half-written is ever left."""
        return []

    def prune(self, rel_dir: str) -> None:
        """S3 has no directories."""

    def stat(self, rel: str) -> ObjInfo | None:
        try:
            r, _ = self._call("head", f"stat {rel}", self.client.head_object, Bucket=self.bucket, Key=self._key(rel))
        except self._ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise StoreError(f"cannot stat {rel}: {one_line(exc)}") from None
        return ObjInfo(rel, int(r["ContentLength"]), r["LastModified"].timestamp(), self.root)

    def _pages(self, what: str, **kw):
        token = None
        while True:
            args = dict(Bucket=self.bucket, MaxKeys=1000, **kw)
            if token:
                args["ContinuationToken"] = token
            try:
                r, _ = self._call("list", what, self.client.list_objects_v2, **args)
            except self._ClientError as exc:
                if _code(exc) == "NoSuchBucket":
                    raise StoreError(f"bucket {self.bucket!r} does not exist") from None
                raise StoreError(f"cannot {what}: {one_line(exc)}") from None
            yield r
            if not r.get("IsTruncated"):
                return
            token = r["NextContinuationToken"]

    def _infos(self, pages) -> list[ObjInfo]:
        return [ObjInfo(self._rel(o["Key"]), int(o["Size"]), o["LastModified"].timestamp(), self.root)
                for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/")]

    def list(self, rel_dir: str, recursive: bool) -> list[ObjInfo]:
        prefix = self._key(rel_dir).rstrip("/") + "/" if rel_dir or self.prefix else ""
        kw = {"Prefix": prefix} if recursive else {"Prefix": prefix, "Delimiter": "/"}
        return self._infos(self._pages(f"list {rel_dir or '/'}", **kw))

    def list_after(self, rel_dir: str, start_after: str) -> list[ObjInfo]:
        prefix = self._key(rel_dir).rstrip("/") + "/"
        return self._infos(self._pages(f"list {rel_dir}", Prefix=prefix, StartAfter=self._key(start_after)))

    def list_dirs(self, rel_dir: str) -> list[str]:
        prefix = self._key(rel_dir).rstrip("/") + "/" if rel_dir or self.prefix else ""
        out = []
        for page in self._pages(f"list {rel_dir or '/'}", Prefix=prefix, Delimiter="/"):
            out += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return sorted(out)

    def reachable(self) -> None:
        try:
            self._call("head", "reach the bucket", self.client.head_bucket, _deadline=0.0, Bucket=self.bucket)
        except self._ClientError as exc:
            if _code(exc) in ("404", "NoSuchBucket", "NotFound"):
                raise StoreError(f"bucket {self.bucket!r} does not exist") from None
            raise StoreError(f"cannot reach bucket {self.bucket!r}: {one_line(exc)}") from None


def _code(exc) -> str:
    return str(exc.response.get("Error", {}).get("Code", exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")))
