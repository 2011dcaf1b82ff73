"""One training run per output folder: a second `punkdiff train --output-dir D` fails at once, naming the first.

Two runs writing into one folder would both claim `D/pipeline` and leave checkpoints of either. The main process
takes an operating-system lock (`filelock`, the lock `datasets` already uses) on `D/.punkdiff-train.lock` and
writes who holds it (PID, host, start time) beside it. The kernel releases the lock when its process dies, so a
run killed with `kill -9` blocks nobody; its info file, left behind, is recognised as stale (its PID is gone) and
the new run takes the folder over with a note. The lock is held until the process exits.

    >>> message = claim_output_dir("outputs/mnist16")
    >>> message is None  # this process now owns the folder; a second process would get the reason instead
    True
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from filelock import FileLock, Timeout

from punkdiff.files import write_json

LOCK_NAME = ".punkdiff-train.lock"
INFO_NAME = ".punkdiff-train.lock.json"
_LEFTOVER_WAIT_S = 10.0
_held: dict[Path, FileLock] = {}  # folders this process owns, so a second run() in one process keeps its claim


def claim_output_dir(output_dir: str | os.PathLike[str]) -> str | None:
    """Lock `output_dir` for this run; the reason it cannot (another run holds it) or None once it is ours.

    Only the main process of a multi-process launch claims the folder (`RANK` 0, or no `RANK`). A folder that
    cannot be created is not claimed here: the run's own writability check reports it.
    """
    if os.environ.get("RANK", "0") != "0":
        return None
    folder = Path(output_dir).absolute()
    if folder in _held:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    lock = FileLock(folder / LOCK_NAME, timeout=0, thread_local=False, is_singleton=False)
    try:
        lock.acquire()
    except Timeout:
        owner = read_owner(folder)
        if owner is None or _alive(owner):
            return _busy_message(folder, owner)
        try:  # its run is gone, but processes it forked (data workers) hold the lock a moment longer
            lock.acquire(timeout=_LEFTOVER_WAIT_S)
        except Timeout:
            return _busy_message(folder, owner) + " (that run is gone, but processes it started still hold the lock)"
    except OSError:  # a read-only folder: nothing can be written there, the writability check says so
        return None
    previous = read_owner(folder)
    if previous is not None and previous.get("pid") != os.getpid() and _alive(previous):
        lock.release()  # a file system that ignores locks, and a live run on this host: still refuse
        return _busy_message(folder, previous)
    if previous is not None and previous.get("pid") != os.getpid():
        print(f"note: {folder} was held by a run that ended without releasing it ({_describe(previous)}); "
              "taking it over", file=sys.stderr)
    write_json(folder / INFO_NAME, {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                                    "argv": sys.argv})
    _held[folder] = lock
    atexit.register(_release, folder)
    return None


def read_owner(output_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Who holds (or last held) `output_dir`: `{"pid", "host", "started", "argv"}`, or None."""
    try:
        owner = json.loads((Path(output_dir) / INFO_NAME).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _release(folder: Path) -> None:
    lock = _held.pop(folder, None)
    if lock is None:
        return
    with contextlib.suppress(OSError):
        (folder / INFO_NAME).unlink()
    lock.release()


def _alive(owner: dict[str, Any]) -> bool:
    """Whether the owner's process still runs (on this host; a PID of another host cannot be checked)."""
    if owner.get("host") != socket.gethostname():
        return True
    try:
        process = psutil.Process(int(owner["pid"]))
        return process.create_time() <= float(owner.get("started", 0)) + 1.0  # not a recycled PID
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def _describe(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "its PID is not recorded yet"
    started = owner.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)) if isinstance(started, (int, float)) \
        else "an unknown time"
    return f"PID {owner.get('pid')} on host {owner.get('host')}, started {when}"


def _busy_message(folder: Path, owner: dict[str, Any] | None) -> str:
    return (f"{folder} is in use by another training run ({_describe(owner)}): wait for it to finish, stop it, "
            "or choose another --output-dir")
