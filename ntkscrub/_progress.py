"""Progress bars, the ``ntkscrub`` logger and warnings that point at the user's code.

* :func:`progress_bar` — a ``tqdm`` bar on stderr. ``progress=None`` (the default everywhere in
  ntkscrub) shows the bar only when someone watches: stderr is a terminal, or the code runs in a
  Jupyter kernel (a notebook widget through ``tqdm.auto``) — logs and CI output redirected to
  files stay clean; ``True`` forces it, ``False`` turns it off.
* :data:`logger` — ``logging.getLogger("ntkscrub")``; library code logs there at INFO/DEBUG (what
  was built, how long it took) and never configures handlers (that is the application's choice).
* :func:`warn` — ``warnings.warn`` with a stacklevel that skips every frame inside the ntkscrub
  package, so the warning names the line of *user* code that called into ntkscrub (Python 3.11 has
  no ``skip_file_prefixes``).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

from tqdm.auto import tqdm

__all__ = ["logger", "progress_bar", "check_progress", "resolve_progress", "warn"]

logger = logging.getLogger("ntkscrub")

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def check_progress(progress: Any, name: str = "progress") -> bool | None:
    """``None`` (auto: on when stderr is a TTY), ``True`` or ``False``; else a TypeError."""
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(
            f"{name}: expected True, False or None (auto), got {type(progress).__name__}"
        )
    return progress


def progress_bar(
    total: int | float | None, desc: str, progress: bool | None = None, unit: str = "it"
) -> tqdm:
    """A tqdm bar on stderr; ``progress=None`` shows it only on a terminal or in a Jupyter
    kernel (:func:`resolve_progress`).

    ``leave=False``: a finished bar is erased, the caller logs a one-line summary instead.
    """
    # explicit, not tqdm's disable=None: that checks file.isatty(), False in a notebook kernel
    show = resolve_progress(progress)
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=not show,
        leave=False,
        file=sys.stderr,
        dynamic_ncols=True,
    )


def resolve_progress(progress: bool | None, name: str = "progress") -> bool:
    """``None`` → whether someone watches stderr (a terminal or a Jupyter kernel), else the
    bool given."""
    progress = check_progress(progress, name)
    return _watched() if progress is None else progress


def _watched() -> bool:
    """Whether a person watches stderr: a terminal, or a Jupyter kernel (whose stderr is a
    stream to the notebook, not a TTY — there ``tqdm.auto`` draws its widget). Without the
    kernel case every notebook user got a silent scrub by default (a torchvision ResNet-18 CE
    scrub on a 2-core CPU ran > 13 minutes without a line)."""
    try:
        if sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):  # closed or replaced stream
        return False
    return _in_jupyter_kernel()


def _in_jupyter_kernel() -> bool:
    ipython = sys.modules.get("IPython")  # only if the user's process imported it already
    get = getattr(ipython, "get_ipython", None)
    shell = get() if callable(get) else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def warn(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn`` pointing at the user's call site (first frame outside ntkscrub)."""
    # stacklevel=1 is this frame (inside the package); climb while frames are ntkscrub's own.
    frame = sys._getframe(0)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
