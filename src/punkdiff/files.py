"""Atomic file writes: the one place every layer (training, metrics, jobs, hub) writes a file a reader may open.

A reader never sees half a file, and nothing is written through a symbolic link: the new content goes to a fresh
temporary file beside the target (created exclusively, so a planted link at the temporary name is refused), then
`os.replace` swaps the directory entry. A target that is a link is replaced by a plain file, never followed.

    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> write_json(folder / "summary.json", {"steps": 10})
    >>> read_back = (folder / "summary.json").read_text()
    >>> '"steps": 10' in read_back
    True
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to; it replaces `path` only if the block succeeds.

    For writers that want a file name (safetensors' `save_file`, PIL's `save`). On an error the temporary file is
    removed and `path` keeps its old content.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        if tmp.is_symlink():  # the writer followed or planted a link: never let it become the target
            raise OSError(f"refusing to install {target}: its temporary file {tmp} became a symbolic link")
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically, never through a link (see the module docstring)."""
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically, never through a link."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], data: Any, *, indent: int | None = 2, sort_keys: bool = False) -> None:
    """Write `data` as JSON atomically; values JSON cannot hold (paths, dates) are written as strings."""
    write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys, default=str) + "\n")


# how writers that are not Python's own say "disk full": torch's zip writer, safetensors' Rust writer
_FULL_DISK_WORDS = ("no space left on device", "disk quota exceeded", "file write failed")


def is_disk_full(err: BaseException) -> bool:
    """Whether `err` (an `OSError`, or the `RuntimeError` of torch's or safetensors' writer) means a full disk."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(word in str(err).lower() for word in _FULL_DISK_WORDS)


def disk_full_message(folder: str | os.PathLike[str], needed: int, what: str) -> str:
    """`the disk holding FOLDER is full (X MB free): WHAT needs about Y MB`, for a write that failed on a full disk."""
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.0f} MB free"
    except OSError:
        free = "free space unknown"
    return f"the disk holding {folder} is full ({free}): {what} needs about {max(needed, 1) / 2**20:.1f} MB"


def folder_bytes(folder: str | os.PathLike[str]) -> int:
    """The bytes of the files under `folder` (0 if it is gone)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) if Path(folder).is_dir() else 0
