"""Local records of persistent kernels, so that a later process can reattach.

One JSON file per kernel in the user's state dir (platformdirs; ``SSHPYK_STATE_DIR``
overrides it), 0600 inside a 0700 directory: a record holds the kernel's HMAC key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import platformdirs

__all__ = ["forget", "records", "remember", "state_dir"]


def state_dir() -> Path:
    override = os.environ.get("SSHPYK_STATE_DIR")
    base = Path(override) if override else platformdirs.user_state_path("sshpyk")
    return base / "kernels"


def _path(kernel_id: str) -> Path:
    if not kernel_id or "/" in kernel_id or kernel_id.startswith("."):
        raise ValueError(f"invalid kernel id {kernel_id!r}")
    return state_dir() / f"{kernel_id}.json"


def remember(record: dict[str, Any]) -> Path:
    """Write (or replace) the record of ``record["kernel_id"]`` atomically, 0600."""
    path = _path(str(record["kernel_id"]))
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(record, f)
    os.replace(tmp, path)
    return path


def records() -> list[dict[str, Any]]:
    """Every readable record, oldest first."""
    found = []
    directory = state_dir()
    if not directory.is_dir():
        return []
    for path in sorted(directory.glob("*.json"), key=lambda p: p.stat().st_mtime):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("kernel_id"):
            found.append(data)
    return found


def forget(kernel_id: str) -> None:
    try:
        _path(kernel_id).unlink()
    except (FileNotFoundError, ValueError):
        pass
