"""Files written whole or not at all: a reader (a resumed run, another process, a crash) finds
the old file or the new one, never half of one."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def _umask() -> int:
    """The process's umask now (it can change after import)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[str], None], *, fsync: bool = False) -> None:
    """Call `write(tmp)`, then rename the temporary file over `path`. `tmp` lies beside `path` and
    ends in its suffix (matplotlib and numpy pick the format by name); `fsync` puts it on disk
    before the rename (the decoded-image cache, read by later processes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; others may read results on a shared disk
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
