"""Writes that are complete on disk or absent: a reader (a resumed run, a notebook copying the
workdir, a job collecting a bucket) never sees half a file or half an export directory; one
writer per output directory (`exclusive`); a full disk recognised as such (`no_space`).

What a process killed at any instant leaves: the previous file or directory (a staging
sibling `.NAME.partial-PID` may be left behind, removed by the next writer), and a lock that
the kernel has already released.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".lock"


class Busy(RuntimeError):
    """Another live process holds the lock of a directory this process would write."""


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to a sibling temporary file, then rename it over `path` (atomic on POSIX
    file systems): a kill mid-write leaves the previous file, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not keep the half-written copy
        raise
    return path


def read_jsonl(path: str | os.PathLike) -> tuple[list[dict], int]:
    """(the rows of a JSON-lines file, how many lines could not be read: a line torn by a
    kill mid-write); no rows when the file is absent."""
    rows, torn = [], 0
    path = Path(path)
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                torn += 1
    return rows, torn


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _dead_siblings(path: Path, kind: str) -> list[Path]:
    """`.NAME.{kind}-PID` siblings of `path` whose process is gone (a kill mid-write)."""
    out = []
    for p in path.parent.glob(f".{path.name}.{kind}-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
            out.append(p)
    return out


@contextlib.contextmanager
def replace_dir(path: str | os.PathLike, *, write: bool = True) -> Iterator[Path]:
    """Yield a sibling staging directory to fill; on success it takes `path`'s place (an
    earlier `path` is removed only after the new one is in place), on an error it is removed
    and `path` is left as it was. `write=False` (another host's share of a multi-host export)
    yields the staging path without creating or moving anything.

    What a killed writer left is settled first: its staging directory is removed, and a
    previous `path` it had moved aside but not yet replaced is put back."""
    path = Path(path)
    stage = path.with_name(f".{path.name}.partial-{os.getpid()}")
    if not write:
        yield stage
        return
    for old in _dead_siblings(path, "old"):
        if not path.exists():
            os.replace(old, path)  # killed between the two renames: the previous one returns
        else:
            shutil.rmtree(old, ignore_errors=True)
    for dead in _dead_siblings(path, "partial"):
        shutil.rmtree(dead, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(stage, path)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def exclusive(directory: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold `directory/.lock` (an advisory `flock`) while writing into `directory`: a second
    writer gets `Busy` naming the first (process id, host, command, start time). The kernel
    releases the lock when its process dies, however it dies, so a killed run never leaves it
    stuck; the file itself stays (an unlocked file is no lock)."""
    import fcntl

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(f"{directory} is in use by {_holder(path)}; wait for it to finish or "
                       f"stop it (its lock, {path}, is released when it exits), or "
                       f"choose another directory for {what}") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                  "command": " ".join(sys.argv)[:300],
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the flock


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text())
        return (f"another {h.get('what', 'process')} (pid {h['pid']} on {h['host']}, "
                f"started {h['started']}: {h['command']})")
    except (OSError, ValueError, KeyError):  # written between its flock and its pwrite
        return "another process"


def no_space(exc: BaseException | None) -> bool:
    """True when `exc`, or an error that caused it, is a full disk (or quota): an OSError
    with ENOSPC / EDQUOT, or a message carrying it (TensorStore's errors are not OSErrors)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False
