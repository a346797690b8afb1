"""Files replaced whole or not at all: a temporary file beside the target, renamed over it.

A process killed mid-write (or a full disk) leaves the previous file as it was and at most a
`.NAME.*.tmp` file, which the run folder's owner removes on resume.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .errors import FlatqError


def replace_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through `write` into a temporary file beside `path`, then rename it over `path`:
    readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_error(path: Path, exc: BaseException) -> FlatqError:
    """The one-line error for a failed write. torch.save reports a full disk as a RuntimeError
    from its zip writer (inline_container.cc), which names no cause: say the likely one."""
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        hint = " (the disk is full)" if exc.errno == errno.ENOSPC else ""
    else:
        reason, hint = " ".join(str(exc).split())[:160], " (is the disk full?)"
    return FlatqError(f"cannot write {path}: {reason}{hint}; the previous file, if any, is "
                      "unchanged")


def write_text_atomic(path: str | Path, text: str) -> None:
    """`path.write_text(text)`, but a kill mid-write leaves the old file whole."""
    path = Path(path)
    try:
        replace_atomically(path, lambda handle: handle.write(text.encode()))
    except OSError as exc:
        raise write_error(path, exc) from None
