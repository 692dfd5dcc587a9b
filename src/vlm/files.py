"""Writing files so that a reader sees the old file or the new one, never a part of one."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any], remove_stale: bool = False) -> None:
    """`write` a temporary file of this call's own in `path`'s folder (the same file system), flush it to
    disk and rename it over `path`. Two processes writing the same file at once do not collide: the later
    rename wins whole. `remove_stale`: first delete temporary files of `path` that a killed write left
    behind (only where one process writes `path`, e.g. rank 0's checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if remove_stale:
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a crash of the machine
    finally:
        os.close(folder)
