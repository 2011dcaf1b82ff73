"""Ctrl-C ends a command with one line that says what was kept, and exit status 130 (a shell's code for SIGINT).

A KeyboardInterrupt traceback tells a user nothing they need; what they need is whether the work so far is on disk.

    >>> exit_on_interrupt(lambda: 0, "punkdiff sample", lambda: "nothing was written")
    0
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil

INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command ended by Ctrl-C


def exit_on_interrupt(work: Callable[[], int], name: str | Callable[[], str], kept: Callable[[], str]) -> int:
    """`work()`'s exit status; on Ctrl-C, `name: interrupted (Ctrl-C); <kept()>` on stderr and 130.

    `name` may be a function, for a command whose name is known only once its flags are parsed.
    A second Ctrl-C while the message is written is ignored, so it cannot end in a traceback either.
    """
    try:
        return work()
    except KeyboardInterrupt:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            what = kept()
        except Exception as err:  # describing what is on disk must not turn an interrupt into a traceback
            what = f"what was written could not be listed ({type(err).__name__}: {err})"
        print(f"{name() if callable(name) else name}: interrupted (Ctrl-C); {what}", file=sys.stderr, flush=True)
        signal.signal(signal.SIGINT, previous)
        return INTERRUPTED


def written_since(paths: Iterable[str | os.PathLike[str] | None], since: float) -> str:
    """`kept: A, B (N files)` for the files among `paths` (files, or folders looked into) written after `since`;
    else `nothing was written`."""
    found: list[Path] = []
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        found += [p for p in files if p.is_file() and p.stat().st_mtime >= since]
    if not found:
        return "nothing was written"
    shown = ", ".join(str(p) for p in found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    return f"kept what was written: {shown}"


def process_start_time() -> float:
    """When this process started: a file modified after that was written by this command."""
    return psutil.Process().create_time()
