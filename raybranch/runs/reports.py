"""Reports in the store: every report (report.json, report.md, PNG plots) and sweep table is
written under a prefix of the store, and copied to a local directory when one is given.

Prefixes: ``<run>/reports/`` for a run's own report; ``_reports/<name>/`` for what spans runs
(the demo's two mechanisms, a sweep's table). A run name starts with a letter or digit, so
``_reports`` is never a run. None of these bytes count as checkpoint storage
(:func:`raybranch.runs.evaluate.excluded_bytes`).
"""
from __future__ import annotations

import os
import shutil
import tempfile

from ..branches.report import write_report
from ..errors import NotFoundError
from ..store.store import Store

def run_reports(run: str) -> str:
    return f"{run}/reports"


def shared_reports(name: str) -> str:
    return f"_reports/{name}"


def upload_dir(store: Store, prefix: str, local_dir: str) -> list[str]:
    """Copy every file of ``local_dir`` (not recursive) to ``<prefix>/<name>``; returns the keys."""
    keys = []
    for name in sorted(os.listdir(local_dir)):
        path = os.path.join(local_dir, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                store.write_bytes(f"{prefix}/{name}", f.read())
            keys.append(f"{prefix}/{name}")
    return keys


def publish(store: Store, prefix: str, result: dict, out_dir: str | None = None) -> dict:
    """Write report ``result``'s files (:func:`raybranch.branches.report.write_report`) to
    ``<prefix>/`` in the store and to ``out_dir``. Returns {"store": [paths], "local": out_dir}."""
    with tempfile.TemporaryDirectory(prefix="raybranch-report-") as tmp:
        write_report(result, tmp)
        keys = upload_dir(store, prefix, tmp)
        if out_dir is not None:
            os.makedirs(out_dir, exist_ok=True)
            for name in os.listdir(tmp):
                shutil.copyfile(os.path.join(tmp, name), os.path.join(out_dir, name))
    return {"store": [store.path(k) for k in keys], "local": out_dir}


def fetch(store: Store, prefix: str, out_dir: str) -> list[str]:
    """Copy every report file under ``<prefix>/`` to ``out_dir``; NotFoundError when there is none."""
    infos = [i for i in store.list(prefix) if i.base_name.endswith((".png", ".csv", ".md", ".json"))]
    if not infos:
        raise NotFoundError(f"no report under {store.path(prefix)}")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i in infos:
        path = os.path.join(out_dir, i.base_name)
        with open(path, "wb") as f:
            f.write(store.read_bytes(i.rel))
        paths.append(path)
    return paths


__all__ = ["fetch", "publish", "run_reports", "shared_reports", "upload_dir"]
