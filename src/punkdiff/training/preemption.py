"""SIGTERM, as clusters and spot machines send it before they take a machine away: finish the step, checkpoint, exit.

The handler only sets a flag; the loop reads it after each optimizer step, where the state is consistent, and
saves a checkpoint there, so a preempted run loses at most the step in progress.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator


class StopRequest:
    """SIGTERM turned into a flag the training loop polls (`requested(accelerator)`), between `install` and `uninstall`.

    Examples:
        ```py
        >>> stop = StopRequest().install()
        >>> try:
        ...     for step in range(max_steps):
        ...         train_one_step()
        ...         if stop.requested(accelerator):
        ...             save_checkpoint(...)
        ...             break
        ... finally:
        ...     stop.uninstall()
        ```
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)) -> None:
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def install(self) -> StopRequest:
        """Catch the signals from now on (a no-op outside the main thread, where Python cannot catch them)."""
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Give the signals their previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)

    def requested(self, accelerator: Accelerator) -> bool:
        """Whether any process got the signal; all processes agree, so they checkpoint and stop together."""
        if accelerator.num_processes == 1:
            return self.received is not None
        flag = torch.tensor([float(self.received is not None)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
