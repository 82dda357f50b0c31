"""Writes that are complete on disk or absent: a reader (a resumed run, a notebook copying the
workdir, a job collecting a bucket) never sees half a file or half an export directory."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to a sibling temporary file, then rename it over `path` (atomic on POSIX
    file systems): a kill mid-write leaves the previous file, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def replace_dir(path: str | os.PathLike, *, write: bool = True) -> Iterator[Path]:
    """Yield a sibling staging directory to fill; on success it takes `path`'s place (an
    earlier `path` is removed only after the new one is in place), on an error it is removed
    and `path` is left as it was. `write=False` (another host's share of a multi-host export)
    yields the staging path without creating or moving anything."""
    path = Path(path)
    stage = path.with_name(f".{path.name}.partial-{os.getpid()}")
    if not write:
        yield stage
        return
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(stage, path)
    shutil.rmtree(old, ignore_errors=True)
