"""Background jobs: a `punkdiff` command in its own process group, with its log, its exit code and a safe stop.

The web app starts training and evaluation this way, so a run outlives a browser tab, a crash in it never
takes the server down, and the app can be restarted without losing track: everything about a job is in
its folder (`job.json` and the captured log), not in the server's memory. A job does not outlive the server
that launched it: when that process exits, `stop_launched` stops its jobs as `Job.stop` does (a training run
saves a checkpoint first), so no evaluation keeps a machine busy that nobody watches.

Example:
    >>> job = Job.launch(Path("runs/demo"), ["punkdiff", "train", "--preset", "mnist-fast-16"], log_name="train.log")
    >>> job.status()
    'running'
    >>> job.stop(timeout=60)  # SIGTERM to the whole group, SIGKILL only if it does not exit in time
    'stopped'
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import psutil

from punkdiff.files import write_json

JOB_FILE = "job.json"
Status = Literal["running", "stopping", "finished", "stopped", "failed", "lost"]
STATUS_TEXT = {
    "running": "running",
    "stopping": "stopping (saving what it can)",
    "finished": "finished",
    "stopped": "stopped by you",
    "failed": "failed",
    "lost": "ended without a recorded exit (the app was restarted while it ran, or it was killed)",
}
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_CLI_ERROR = re.compile(r"^punkdiff [a-z]+: ")  # how `punkdiff COMMAND` reports a mistake the user can fix
_write_lock = threading.Lock()
_watched: set[int] = set()  # pids whose exit a watcher thread of this process is about to record
_launched: list[Job] = []  # the jobs this process started, stopped when it exits


class Job:
    """The latest launch of a command in `folder`; earlier launches (e.g. before a resume) stay in `job.json`."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    @classmethod
    def launch(
        cls,
        folder: str | os.PathLike[str],
        argv: Sequence[str],
        log_name: str,
        *,
        env: dict[str, str] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Job:
        """Start `argv` with `folder` as working directory, stdout and stderr appended to `folder/log_name`.

        The process gets its own session (process group), so `stop` reaches the workers it starts and a
        Ctrl-C in the server's terminal does not reach it. `meta` is stored with the launch (e.g. the request
        that built `argv`). A watcher thread records the exit code when the process ends.
        """
        job = cls(folder)
        job.folder.mkdir(parents=True, exist_ok=True)
        log_path = job.folder / log_name
        with open(log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} $ {shlex.join(argv)}\n".encode())
            log.flush()
            process = subprocess.Popen(
                list(argv),
                cwd=job.folder,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                start_new_session=True,
            )
        launch = {
            "argv": list(argv),
            "log": log_name,
            "pid": process.pid,
            "create_time": _create_time(process.pid),
            "started": time.time(),
            "ended": None,
            "returncode": None,
            "stop_requested": False,
            "meta": meta or {},
        }
        job._update(lambda data: data.setdefault("launches", []).append(launch))
        _watched.add(process.pid)
        if not _launched:
            atexit.register(stop_launched)
        _launched.append(job)
        threading.Thread(target=job._watch, args=(process,), daemon=True, name=f"job-{process.pid}").start()
        return job

    def exists(self) -> bool:
        return (self.folder / JOB_FILE).is_file()

    def launches(self) -> list[dict[str, Any]]:
        """Every launch recorded in this folder, oldest first (empty if none)."""
        try:
            return json.loads((self.folder / JOB_FILE).read_text())["launches"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return []

    def latest(self) -> dict[str, Any] | None:
        launches = self.launches()
        return launches[-1] if launches else None

    def is_running(self) -> bool:
        """Whether the latest launch's process is alive (a recycled pid is told apart by its start time)."""
        launch = self.latest()
        if launch is None or launch["returncode"] is not None:
            return False
        if launch["pid"] in _watched:  # our child: running until its watcher has recorded the exit
            return True
        try:
            process = psutil.Process(launch["pid"])
            alive = process.status() != psutil.STATUS_ZOMBIE
            return alive and abs(process.create_time() - (launch["create_time"] or 0)) < 1.0
        except psutil.Error:
            return False

    def status(self) -> Status | None:
        """What the latest launch is doing, or None if nothing was ever launched here."""
        launch = self.latest()
        if launch is None:
            return None
        if self.is_running():
            return "stopping" if launch["stop_requested"] else "running"
        if launch["stop_requested"]:
            return "stopped"
        if launch["returncode"] is None:
            return "lost"
        return "finished" if launch["returncode"] == 0 else "failed"

    def stop(self, timeout: float = 60.0) -> Status | None:
        """SIGTERM the job's process group and wait up to `timeout` s for it to exit; SIGKILL if it does not.

        SIGTERM gives the training loop the chance to save a checkpoint before it exits; checkpoints already
        on disk are never touched either way (they are written to a temporary folder and renamed).
        """
        stop_jobs([self], timeout)
        return self.status()

    def send(self, sig: signal.Signals) -> None:
        """Send `sig` to the job's process group if it runs; a SIGTERM is recorded as a stop the user asked for."""
        launch = self.latest()
        if launch is not None and self.is_running():
            if sig == signal.SIGTERM:
                self._update(lambda data: data["launches"][-1].update(stop_requested=True))
            _signal_group(launch["pid"], sig)  # start_new_session: the group id is the leader's pid

    def log_tail(self, max_lines: int = 30, max_bytes: int = 65536) -> str:
        """The end of the captured log as a terminal would show it: each progress bar at its last state."""
        launch = self.latest()
        if launch is None:
            return ""
        path = self.folder / launch["log"]
        if not path.is_file():
            return ""
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - max_bytes))
            text = f.read().decode("utf-8", errors="replace")
        lines = [_ANSI.sub("", line.rstrip("\r").rsplit("\r", 1)[-1]).rstrip() for line in text.split("\n")]
        return "\n".join([line for line in lines if line][-max_lines:])

    def error_message(self) -> str | None:
        """For a failed launch: the last error line the command printed (`error: ...` from the training script,
        `punkdiff eval: ...` from the CLI), else the last traceback line."""
        if self.status() not in ("failed", "lost"):
            return None
        lines = self.log_tail(max_lines=200).split("\n")
        for line in reversed(lines):
            if line.startswith("error:") or ": error:" in line or _CLI_ERROR.match(line):
                return line
        for line in reversed(lines):
            if re.match(r"^\w+(\.\w+)*(Error|Exception|Interrupt)\b", line):
                return line
        launch = self.latest() or {}
        code = launch.get("returncode")
        return f"the process exited with status {code}" if code is not None else lines[-1] if lines else None

    def _watch(self, process: subprocess.Popen) -> None:
        returncode = process.wait()

        def record(data: dict[str, Any]) -> None:
            for launch in data["launches"]:
                if launch["pid"] == process.pid and launch["returncode"] is None:
                    launch.update(returncode=returncode, ended=time.time())

        self._update(record)
        _watched.discard(process.pid)

    def _wait_recorded(self, timeout: float = 5.0) -> None:
        """After the process is gone, give the watcher thread a moment to write the exit code."""
        deadline = time.time() + timeout
        while time.time() < deadline and (self.latest() or {}).get("returncode") is None:
            time.sleep(0.05)

    def _update(self, change) -> None:
        """Read-modify-write `job.json` atomically (a reader never sees half a file)."""
        path = self.folder / JOB_FILE
        with _write_lock:
            try:
                data = json.loads(path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                data = {}
            change(data)
            write_json(path, data)


def stop_launched(timeout: float = 60.0) -> None:
    """Stop every job this process launched that still runs (see `stop_jobs`). Registered with `atexit` at the
    first launch; the web app also calls it when its server closes."""
    stop_jobs(_launched, timeout)


def stop_jobs(jobs: Sequence[Job], timeout: float = 60.0) -> None:
    """SIGTERM every running job at once, wait up to `timeout` s, SIGKILL what is left, and wait for the exits."""
    running = [job for job in jobs if job.is_running()]
    for job in running:
        job.send(signal.SIGTERM)
    deadline = time.time() + timeout
    while time.time() < deadline and any(job.is_running() for job in running):
        time.sleep(0.2)
    for job in running:
        job.send(signal.SIGKILL)
    for job in running:
        while job.is_running():
            time.sleep(0.1)
        job._wait_recorded()


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(pgid, sig)


class JobFolder:
    """A folder the app runs one kind of command in (a training run, an evaluation), read on demand.

    Subclasses set `request_type`, the dataclass of what the app asked for; it is stored with each launch, so a
    restarted app knows what a folder was started with.
    """

    request_type: type

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.job = Job(self.folder)

    @property
    def name(self) -> str:
        return self.folder.name

    def status(self) -> str:
        return self.job.status() or "unknown"

    def stop(self, timeout: float = 60.0) -> str:
        """Stop this folder's job (SIGTERM, then SIGKILL after `timeout` s); what it wrote stays. The new status."""
        if not self.job.is_running():
            raise ValueError(f"{self.name} is not running ({STATUS_TEXT.get(self.status(), self.status())})")
        self.job.stop(timeout)
        return self.status()

    def request(self):
        """The request of the latest launch from the app (None for a folder the command line filled)."""
        launch = self.job.latest()
        if not launch or "request" not in launch["meta"]:
            return None
        return self.request_type(**launch["meta"]["request"])

