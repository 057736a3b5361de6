"""Atomic file writes: a reader never sees half a file, and a crash leaves the old one intact."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "atomic_write_json"]


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], *, binary: bool) -> Path:
    """Call ``write(fh)`` on a temp file in ``path``'s folder, fsync it, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(
            fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})
        ) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(
    path: str | os.PathLike,
    obj: Any,
    *,
    indent: int = 2,
    default: Callable[[Any], Any] | None = None,
    allow_nan: bool = True,
) -> Path:
    """``json.dump(obj)`` (plus a final newline) to ``path`` through :func:`atomic_write`."""

    def write(fh: IO) -> None:
        json.dump(obj, fh, indent=indent, default=default, allow_nan=allow_nan)
        fh.write("\n")

    return atomic_write(path, write, binary=False)
