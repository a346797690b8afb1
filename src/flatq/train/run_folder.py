"""A run folder's life on disk: checked before any work, claimed (locked) before any write.

Two steps, so that nothing on disk changes until the whole run has validated:
`check_run_folder` only reads (is `--out` usable, does `--overwrite` point at a flatq run,
is there a checkpoint to resume), and `claim_run_folder` runs after the configuration, data,
model and objective are all built: it creates the folder, takes the lock and only then, with
`--overwrite`, removes the old run's files. `--overwrite` removes only the files a flatq run
writes (RUN_FILES); anything else a user keeps in the folder stays.

The lock is an advisory `fcntl` lock on `.flatq.lock` holding the owner's pid and host: the
kernel drops it when the process ends, however it ends, so a killed run never leaves a stale
lock, and a second run into the same folder is refused while the first lives.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from ..errors import CheckpointError, FlatqError
from .checkpoint import CHECKPOINT_NAME, MODEL_NAME
from .distributed import main_first

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"
LOCK_NAME = ".flatq.lock"
RUN_FILES = (CONFIG_NAME, METRICS_NAME, CHECKPOINT_NAME, MODEL_NAME, SUMMARY_NAME)
NAME_MAX = 255


def _check_path(run_dir: Path, text: str) -> None:
    if not text.strip():
        raise FlatqError("--out is empty; name the run folder to write")
    long = next((part for part in run_dir.parts if len(os.fsencode(part)) > NAME_MAX), None)
    if long is not None:
        raise FlatqError(f"--out {text[:60]}...: the name {long[:40]}... is longer than "
                         f"{NAME_MAX} bytes, the file system's limit")
    if run_dir.is_symlink():
        raise FlatqError(f"--out {text} is a symbolic link; give the folder it points to "
                         f"({os.path.realpath(run_dir)})")
    if run_dir.exists() and not run_dir.is_dir():
        raise FlatqError(f"--out {text} is a file, not a folder; choose another --out")


def _entries(run_dir: Path) -> list[Path]:
    """What the folder holds, but for the lock file (left by any run, finished or not)."""
    return [p for p in run_dir.iterdir() if p.name != LOCK_NAME] if run_dir.is_dir() else []


def is_flatq_run(run_dir: Path) -> bool:
    """A folder a flatq run wrote: its config.yaml beside a checkpoint or final model, or
    (a run stopped before its first checkpoint) nothing but flatq's own files."""
    if not (run_dir / CONFIG_NAME).is_file():
        return False
    return any((run_dir / name).is_file() for name in (CHECKPOINT_NAME, MODEL_NAME)) or all(
        p.name in RUN_FILES for p in _entries(run_dir))


def check_run_folder(run_dir: str | Path, resume: bool, overwrite: bool) -> Path:
    """Refuse an `--out` that cannot hold this run, reading only: nothing is created or removed."""
    text = str(run_dir)
    run_dir = Path(run_dir)
    _check_path(run_dir, text)
    if resume:
        if overwrite:
            raise FlatqError("--resume continues the run in --out and --overwrite replaces it; "
                             "give one of them")
        if not (run_dir / CHECKPOINT_NAME).is_file():
            raise CheckpointError(f"--resume: no {CHECKPOINT_NAME} in {run_dir}")
        return run_dir
    if _entries(run_dir):
        if not is_flatq_run(run_dir):
            raise FlatqError(f"--out {run_dir} holds files but no flatq run (no {CONFIG_NAME} "
                             f"with {CHECKPOINT_NAME} or {MODEL_NAME}); flatq replaces only its "
                             "own runs: choose another --out")
        if not overwrite:
            raise FlatqError(f"run folder {run_dir} already holds a run; use --resume to continue "
                             "it, --overwrite to replace it, or another --out")
    return run_dir


class RunFolderLock:
    """Holds `.flatq.lock` in a run folder until `release()` (which removes the file) or the
    end of the process (which drops the lock and leaves an unlocked file the next run takes)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        while True:
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                handle.seek(0)
                owner = handle.read().strip() or "another process"
                handle.close()
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise FlatqError(f"run folder {run_dir} is in use by {owner} ({LOCK_NAME}); "
                                     "wait for it to finish or choose another --out") from None
                raise FlatqError(f"cannot lock run folder {run_dir}: {exc.strerror}") from None
            if self._still_linked(handle):
                break
            handle.close()      # the holder removed it as we opened it: take the new file
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._handle: IO[str] | None = handle

    def _still_linked(self, handle: IO[str]) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self._handle is not None:
            self.path.unlink(missing_ok=True)   # while still locked: no one holds a stale copy
            self._handle.close()
            self._handle = None


def remove_partial_writes(run_dir: Path) -> list[Path]:
    """Delete the temporary files an atomic write leaves when its process is killed mid-write
    (never read: the file they were to replace is still whole); returns them."""
    partial = sorted(p for name in RUN_FILES for p in run_dir.glob(f".{name}.*.tmp"))
    for path in partial:
        path.unlink(missing_ok=True)
    return partial


def clear_run(run_dir: Path) -> list[Path]:
    """Remove the files an earlier flatq run wrote in `run_dir` (and only those)."""
    removed = [run_dir / name for name in RUN_FILES if (run_dir / name).is_file()]
    for path in removed:
        path.unlink()
    return removed + remove_partial_writes(run_dir)


def claim_run_folder(run_dir: str | Path, resume: bool, overwrite: bool) -> RunFolderLock:
    """Create the folder, lock it, and (with `--overwrite`) remove the old run's files.

    Call it once the run has validated; it repeats `check_run_folder` under the lock, so a
    folder that changed since (another run finished into it) is still refused.
    """
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunFolderLock(run_dir)
    except OSError as exc:
        raise FlatqError(f"cannot write to run folder {run_dir}: {exc.strerror}") from None
    try:
        check_run_folder(run_dir, resume, overwrite)
        if resume:
            remove_partial_writes(run_dir)
        elif overwrite:
            clear_run(run_dir)
    except BaseException:
        lock.release()
        raise
    return lock


@contextmanager
def claimed_run_folder(run_dir: str | Path, resume: bool, overwrite: bool) -> Iterator[Path]:
    """The run folder, created, locked and (with `overwrite`) cleared by rank 0 for the
    duration of the block. Enter it only once the whole run has validated."""
    locks: list[RunFolderLock] = []
    main_first(lambda: locks.append(claim_run_folder(run_dir, resume, overwrite)))
    try:
        yield Path(run_dir)
    finally:
        for lock in locks:
            lock.release()
