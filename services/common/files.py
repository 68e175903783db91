"""Files written whole: a reader sees the old file or the new one, never a part, and a file
is never readable with a wider mode than asked for (keys are created 0600)."""

import os
import tempfile
from pathlib import Path


def synced_temporary(path: Path, data: bytes, mode: int) -> str:
    """A temporary file beside `path`, created with `mode`, holding `data` on disk."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        os.unlink(temporary)
        raise
    return temporary


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` (its directory made when missing) with `data` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = synced_temporary(path, data, mode)
    try:
        os.replace(temporary, path)
    finally:
        if os.path.lexists(temporary):
            os.unlink(temporary)
