"""Atomic file writes (a reader never sees half a file, and a crash leaves the old one intact) and
the JSON-safe form of result records."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

__all__ = ["atomic_write", "atomic_write_json", "to_jsonable", "write_record"]


def to_jsonable(obj: Any) -> Any:
    """A JSON-safe copy of a result record: dicts (keys as str), lists/tuples, tensors and numpy
    arrays → lists, numpy scalars → Python numbers, dataclasses → dicts, dtypes and devices → str,
    non-finite floats → None (strict JSON has no NaN), anything else → ``str``."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    return str(obj)  # torch.dtype, torch.device, paths, enums, ...


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


def write_record(path: str | os.PathLike, obj: Any, *, indent: int = 1) -> Path:
    """Write a result record as strict JSON, atomically: :func:`to_jsonable` (tensors → lists,
    NaN → null, …) then :func:`atomic_write_json`. The one JSON writer of the demo, the
    reproduction, the benchmarks and the pipeline runtime (:mod:`ntkscrub.recipes.runtime`)."""
    return atomic_write_json(path, to_jsonable(obj), indent=indent, allow_nan=False)
