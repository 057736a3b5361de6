"""Atomic file writes (a reader never sees half a file, and a crash leaves the old one intact) and
the JSON-safe form of result records."""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import tempfile
import time
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
    """Call ``write(fh)`` on a temp file in ``path``'s folder, fsync it, ``os.replace`` it onto
    ``path`` and fsync the folder (so the rename itself survives a power cut).

    On any failure the temp file is removed; temp files that a killed earlier write of the same
    ``path`` left behind (SIGKILL runs no cleanup) are removed once they are over an hour old.
    An ``OSError`` (read-only folder, full disk) is re-raised naming ``path``, not the temp file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _named(err, path) from err
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
        _fsync_dir(path.parent)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise _named(err, path) from err
        raise
    return path


# A temp file of a killed write is removed by the next write of the same target after this long
# (a younger one may belong to a concurrent writer).
_STALE_SECONDS = 3600.0


def _remove_stale_temps(path: Path) -> None:
    now = time.time()
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > _STALE_SECONDS:
                tmp.unlink()
        except OSError:  # gone meanwhile, or not ours to remove: leave it
            pass


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open a directory: the rename still happened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _named(err: OSError, path: Path) -> OSError:
    """The same kind of OSError, naming the target path (not the temp file)."""
    return type(err)(err.errno, f"cannot write {path}: {err.strerror or err}", str(path))


def _nonfinite_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nonfinite_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nonfinite_to_none(v) for v in obj]
    return obj


def atomic_write_json(
    path: str | os.PathLike,
    obj: Any,
    *,
    indent: int = 2,
    default: Callable[[Any], Any] | None = None,
    allow_nan: bool = False,
) -> Path:
    """``json.dump(obj)`` (plus a final newline) to ``path`` through :func:`atomic_write`.

    The file is strict JSON: non-finite floats (NaN, ±∞) become ``null``, as in
    :func:`to_jsonable` (bare ``NaN`` is not JSON and breaks other readers). ``allow_nan=True``
    writes them as Python's ``NaN`` / ``Infinity`` instead.
    """
    if not allow_nan:
        obj = _nonfinite_to_none(obj)

    def write(fh: IO) -> None:
        text = json.dumps(obj, indent=indent, default=default, allow_nan=allow_nan)
        fh.write(text + "\n")  # serialised first: a failure leaves no half-written temp file

    return atomic_write(path, write, binary=False)


def write_record(path: str | os.PathLike, obj: Any, *, indent: int = 1) -> Path:
    """Write a result record as strict JSON, atomically: :func:`to_jsonable` (tensors → lists,
    NaN → null, …) then :func:`atomic_write_json`. The one JSON writer of the demo, the
    reproduction, the benchmarks and the pipeline runtime (:mod:`ntkscrub.recipes.runtime`)."""
    return atomic_write_json(path, to_jsonable(obj), indent=indent, allow_nan=False)


def save_figure(fig: Any, path: str | os.PathLike, *, dpi: float | None = None) -> Path:
    """Write a matplotlib figure atomically (format from the suffix, PNG by default)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return atomic_write(path, lambda fh: fig.savefig(fh, format=fmt, dpi=dpi), binary=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text report atomically (UTF-8)."""
    return atomic_write(path, lambda fh: fh.write(text), binary=False)
