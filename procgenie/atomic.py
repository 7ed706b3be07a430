"""Atomic file writes: write to a temporary name in the same folder, fsync, then rename.

A process killed at any instant leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from procgenie.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one process per folder is then the user's care
    fcntl = None


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` and move the result over `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


# The folder locks this process holds (their fds). A forked child (a DataLoader worker, a collector worker)
# shares each lock's open file, and flock holds a lock while any process keeps it open: a worker orphaned by a
# SIGKILL of its parent kept the folder locked for about 30 s, and an immediate rerun was refused. Every
# forked child closes its copies at once, so a lock lives exactly as long as the process that took it.
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


@contextmanager
def exclusive(folder: str | os.PathLike, doing: str) -> Iterator[None]:
    """Hold an advisory lock on `folder` (made if missing) while the block runs, or stop at once if another
    process holds it. No lock file: the lock lives on the folder itself, and the system drops it when its
    holder dies, so a killed run leaves nothing behind."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"another process is {doing}: wait for it to finish, or stop it (a rerun resumes where it stopped)"
            ) from None
        _HELD.add(fd)
        yield
    finally:
        _HELD.discard(fd)
        os.close(fd)  # releases the lock


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    write_atomic(path, write)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def remove_stale_tmp(folder: str | os.PathLike) -> int:
    """Delete the temporary files that killed processes left in `folder`; returns how many.

    `write_atomic` names them `.NAME.PID.tmp`: one whose process still runs is another writer's, and stays.
    """
    removed = 0
    for tmp in Path(folder).glob(".*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and _running(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def _running(pid: int) -> bool:
    if os.name == "nt":  # os.kill there terminates the process: keep the file
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json_object(path: Path, fix: str) -> dict:
    """A JSON object from `path`, or a UserError that names the damage and `fix` (what to do about it)."""
    try:
        obj = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is damaged ({getattr(e, 'msg', e)}): {fix}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is damaged (not a JSON object): {fix}")
    return obj
