"""Format v2 of the store's metadata: object keys, documents and their checksums (docs/FORMAT.md).

Keys under ``<run>/``::

    refs/branches/<name>.json                       branch name → branch id  (compare-and-swap)
    refs/links/<name>.json                          "main", "served", … → a branch step (compare-and-swap)
    branches/<id>/branch.json                       what the branch is: name at birth, fork point
    branches/<id>/commits/<seq÷1000>/<seq>.json     one commit (created only if absent)
    branches/<id>/pages/<first>-<last>.g<gen>.json.zst   a sealed run of commits (created only if absent)
    branches/<id>/top.json                          the list of sealed pages (a hint, rewritten)
    blobs/<sha256>.arrow, layouts/<sha256>.json     content-addressed payloads

Every JSON document is canonical (sorted keys, no spaces) and carries ``checksum`` = sha256 of
the canonical JSON of the rest, so a flipped bit is detected wherever it lands.
"""
from __future__ import annotations

import hashlib
import re

from ..errors import CorruptBlobError, RaybranchError
from ..store.store import json_bytes

VERSION = 2
COMMIT_FORMAT = "raybranch.commit/2"
PAGE_FORMAT = "raybranch.page/2"
TOP_FORMAT = "raybranch.top/2"
BRANCH_FORMAT = "raybranch.branch/2"
REF_FORMAT = "raybranch.ref/2"
LINK_FORMAT = "raybranch.link/2"
SHARD = 1000  # commits per directory: one S3 LIST page
PAGE_SIZE = 64  # commits per sealed page (default; a branch records its own)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PAGE_KEY = re.compile(r"(\d{12})-(\d{12})\.g(\d{3})\.json\.zst$")


def check_name(what: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise RaybranchError(f"{what} name {name!r} must be 1-128 characters of letters, digits, '.', '_' or '-'")
    return name


def seal(doc: dict) -> dict:
    body = {k: v for k, v in doc.items() if k != "checksum"}
    return {**body, "checksum": hashlib.sha256(json_bytes(body)).hexdigest()}


def unseal(doc: dict, where: str, fmt: str | None = None) -> dict:
    """The document, checked: its checksum matches and (when given) its format is ``fmt``."""
    want = doc.get("checksum")
    body = {k: v for k, v in doc.items() if k != "checksum"}
    if want != hashlib.sha256(json_bytes(body)).hexdigest():
        raise CorruptBlobError(f"{where} is corrupt: its checksum does not match its content")
    if fmt is not None and doc.get("format") != fmt:
        raise CorruptBlobError(f"{where} is not a {fmt} document (format {doc.get('format')!r})")
    return doc


def branch_dir(run: str, bid: str) -> str:
    return f"{run}/branches/{bid}"


def branch_doc_key(run: str, bid: str) -> str:
    return f"{branch_dir(run, bid)}/branch.json"


def commits_dir(run: str, bid: str) -> str:
    return f"{branch_dir(run, bid)}/commits"


def commit_key(run: str, bid: str, seq: int) -> str:
    return f"{commits_dir(run, bid)}/{seq // SHARD:06d}/{seq:012d}.json"


def seq_of_commit_key(rel: str) -> int | None:
    name = rel.rsplit("/", 1)[-1]
    if len(name) == 17 and name.endswith(".json") and name[:12].isdigit():
        return int(name[:12])
    return None


def pages_dir(run: str, bid: str) -> str:
    return f"{branch_dir(run, bid)}/pages"


def page_key(run: str, bid: str, first: int, last: int, gen: int) -> str:
    return f"{pages_dir(run, bid)}/{first:012d}-{last:012d}.g{gen:03d}.json.zst"


def parse_page_key(rel: str) -> tuple[int, int, int] | None:
    m = _PAGE_KEY.search(rel)
    return None if m is None else (int(m.group(1)), int(m.group(2)), int(m.group(3)))


def top_key(run: str, bid: str) -> str:
    return f"{branch_dir(run, bid)}/top.json"


def ref_key(run: str, name: str) -> str:
    return f"{run}/refs/branches/{name}.json"


def link_key(run: str, name: str) -> str:
    return f"{run}/refs/links/{name}.json"


def blob_key(run: str, h: str) -> str:
    return f"{run}/blobs/{h}.arrow"


def layout_key(run: str, h: str) -> str:
    return f"{run}/layouts/{h}.json"


def page_bounds(seq: int, page_size: int) -> tuple[int, int]:
    """(first, last) commit seq of the page that holds ``seq``."""
    first = seq - seq % page_size
    return first, first + page_size - 1


def compact_steps(steps: list[dict], keep: str = "step") -> tuple[dict, list[dict]]:
    """(common, rest): the fields every entry shares with the same value, and what differs.

    Commits and pages store their step entries this way (``"common"`` beside ``"steps"``), so a
    group of 64 steps pays for its codec, layout, parts and optimizer JSON once, not 64 times."""
    if len(steps) < 2:
        return {}, steps
    first = steps[0]
    common = {k: v for k, v in first.items() if k != keep and all(k in e and e[k] == v for e in steps[1:])}
    return common, [{k: v for k, v in e.items() if k not in common} for e in steps]


def expand_steps(doc: dict) -> dict:
    """A stored commit or page with its step entries (and a page's commit headers) whole again
    (see :func:`compact_steps`)."""
    common, shared = doc.get("common") or {}, doc.get("commits_common") or {}
    if not common and not shared:
        return doc
    out = {**doc, "steps": [{**common, **e} for e in doc["steps"]], "common": {}}
    if shared:
        out["commits"], out["commits_common"] = [{**shared, **h} for h in doc["commits"]], {}
    return out


def stored(doc: dict) -> dict:
    """The form a commit or page is written in: entries (and a page's headers) compacted, then sealed."""
    common, rest = compact_steps(doc["steps"])
    out = {**{k: v for k, v in doc.items() if k != "checksum"}, "common": common, "steps": rest}
    if "commits" in doc:
        out["commits_common"], out["commits"] = compact_steps(doc["commits"], keep="seq")
    return seal(out)
