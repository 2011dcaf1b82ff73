"""Training runs in child processes that a test can SIGKILL or SIGTERM at any moment, started in milliseconds.

A forkserver that has already imported the training code forks each run, so a test can afford a dozen runs on two
cores. Each run leads its own process group, which the test signals by id (`os.killpg`), as a cluster scheduler or
an out-of-memory killer would.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["punkdiff.scripts.train", "killable"])


def _run(argv: list[str], log: str, ready, user: int | None, home: str | None, stdlib: list[str]) -> None:
    os.setpgid(0, 0)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout.reconfigure(line_buffering=True)  # the test reads the log while the run is going
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1")
    if home is not None:  # every per-user cache (Hugging Face, matplotlib) under a home this user may write
        os.environ.update(HOME=home, HF_HOME=f"{home}/hf", XDG_CACHE_HOME=f"{home}/cache", MPLCONFIGDIR=f"{home}/mpl")
    if user is not None:
        # the standard library modules this test process has loaded (it ran the same code), imported while they may
        # still be read: a Python installed under root's private home (as pyenv does) is unreadable to other users
        for name in stdlib:
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
        import matplotlib.font_manager  # noqa: F401  (its font list, built where every font folder may be read)

        # gid first: once the uid is dropped, the process may no longer change its groups
        os.setgroups([])
        os.setgid(user)
        os.setuid(user)
    import torch

    from punkdiff.scripts.train import main

    torch.set_num_threads(1)
    ready.set()
    os._exit(main(argv))


def _stdlib_loaded() -> list[str]:
    """Names of the loaded modules that come from the interpreter's own library (not from site-packages)."""
    stdlib = os.path.dirname(os.__file__)
    return [name for name, module in list(sys.modules.items())
            if (getattr(module, "__file__", None) or "").startswith(stdlib + os.sep)
            and "site-packages" not in module.__file__]


class TrainingProcess:
    """`training/train.py` with `argv` in a child process; output goes to `log`.

    With `user` (a uid, e.g. 65534 "nobody"), the child drops root's privileges before it runs, so file permissions
    apply to it (root ignores them), and keeps its caches under `home`.
    """

    def __init__(self, argv: Sequence[str], log: Path, user: int | None = None, home: Path | None = None) -> None:
        self._ready = _CONTEXT.Event()
        self.process = _CONTEXT.Process(
            target=_run,
            args=(list(argv), str(log), self._ready, user, None if home is None else str(home), _stdlib_loaded()),
        )
        self.process.start()
        if not self._ready.wait(timeout=120):
            raise TimeoutError(f"training child did not start; see {log}")

    def signal_group(self, sig: signal.Signals) -> bool:
        """Send `sig` to the run's whole process group; False if it had already exited."""
        if self.process.exitcode is not None:
            return False
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def kill_when(self, condition: Callable[[], bool], timeout: float, sig: signal.Signals = signal.SIGKILL) -> bool:
        """Poll `condition` every millisecond; signal the group as soon as it holds. False if the run ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.is_alive():
            if condition():
                return self.signal_group(sig)
            time.sleep(0.001)
        return False

    def wait(self, timeout: float = 300) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.signal_group(signal.SIGKILL)
            self.process.join()
            raise TimeoutError("training child did not finish in time")
        return self.process.exitcode
