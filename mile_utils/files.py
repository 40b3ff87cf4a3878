"""The one way this package writes a file or folder: into a temporary one, then a rename, so that a reader, or a run
killed mid-write, never sees half of it and the previous version stays intact; and the lock for a shared runs folder."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # nothing left after the rename
    return path


def write_json(path: str | os.PathLike[str], obj: object) -> Path:
    text = json.dumps(obj, indent=2, default=str) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_folder(path: str | os.PathLike[str], write: Callable[[Path], object], *, done: str) -> Path:
    """:func:`atomic_write` for a folder; a complete one (holding ``done``) another process put there first stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        write(tmp)
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / done).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left after the rename
    return path


@contextmanager
def folder_lock(folder: str | os.PathLike[str], timeout_s: float) -> Iterator[Path]:
    """Hold ``folder/.lock`` while working in ``folder``: a second process waits, then finds the work done. The OS
    drops the lock of a process that dies, so a killed run blocks nobody; past ``timeout_s`` the waiter raises."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    lock = FileLock(Path(folder) / ".lock", timeout=timeout_s)
    try:
        held = lock.acquire()
    except Timeout:
        raise TimeoutError(f"{lock.lock_file} stayed locked for {timeout_s:.0f} s: another process is still working "
                           "in this folder (a run of the same name); wait for it, or use another folder") from None
    with held:  # released on leaving
        yield Path(folder)
