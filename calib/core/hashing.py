"""Content hashes: of JSON-able values (cache keys), of files, and of calib's own source code."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hex digest of the canonical JSON of ``obj`` (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def file_hash(path: Path, length: int = 16) -> str:
    """sha256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


_CODE_HASH: str | None = None


def code_hash(length: int = 12) -> str:
    """Hash of calib's own source (every .py, .json, .mplstyle file in the package).

    Stored with every result row: a row is reused only by the code that produced it.
    """
    global _CODE_HASH
    if _CODE_HASH is None:
        from calib.core.paths import PACKAGE_DIR

        h = hashlib.sha256()
        for f in sorted(PACKAGE_DIR.rglob("*")):
            if f.suffix in (".py", ".json", ".mplstyle") and "__pycache__" not in f.parts:
                h.update(str(f.relative_to(PACKAGE_DIR)).encode())
                h.update(f.read_bytes())
        _CODE_HASH = h.hexdigest()
    return _CODE_HASH[:length]
