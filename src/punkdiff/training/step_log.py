"""The loop's per-step log (loss, gradient norm, images/s), kept on the device and read back every few steps.

Reading a GPU tensor on the host (`.item()`, `float()`, `.tolist()`, `if torch.isfinite(...)`) waits for the device
to finish everything queued, so a loop that reads its loss every step keeps the GPU idle while Python prepares the
next step. Here each step's values stay on the device; `read()` brings all the steps since the last read back in one
transfer (and, with several processes, one gather, not one collective per step), checks that every loss is finite,
and measures images/s over the interval it covers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from punkdiff.training import TrainingError

if TYPE_CHECKING:
    from accelerate import Accelerator


class StepLog:
    """Per-step loss (mean over micro-batches and processes) and gradient norm, read every `every` steps.

    Examples:
        ```py
        >>> log = StepLog(accelerator, every=10)
        >>> log.add_loss(loss.detach())          # every micro-batch: device ops only
        >>> log.end_step(step, grad_norm, lr, images=64)
        >>> if log.due(step):
        ...     for row in log.read():           # one host synchronisation per interval
        ...         accelerator.log(row, step=row["step"])
        ```
    """

    def __init__(self, accelerator: Accelerator, every: int, advice: Callable[[], str] | None = None) -> None:
        """`advice()` ends the message of a non-finite loss (what is kept on disk, how to continue)."""
        if every <= 0:
            raise ValueError(f"every must be positive, got {every}")
        self.accelerator, self.every, self.advice = accelerator, every, advice
        self._loss = torch.zeros((), device=accelerator.device)
        self._micro_batches = 0
        self._losses: list[torch.Tensor] = []
        self._grad_norms: list[torch.Tensor] = []
        self._rows: list[dict[str, Any]] = []
        self._images = 0
        self._clock = time.perf_counter()

    def add_loss(self, loss: torch.Tensor) -> None:
        """One micro-batch's loss (detached), added on the device."""
        self._loss = self._loss + loss.float()
        self._micro_batches += 1

    def end_step(self, step: int, grad_norm: torch.Tensor | float, lr: float, images: int,
                 **host_values: float) -> None:
        """Close optimizer step `step`: its mean loss and `grad_norm` stay on the device; `lr` and any
        `host_values` (already on the host, e.g. the EMA decay) are kept beside them."""
        self._losses.append(self._loss / max(self._micro_batches, 1))
        self._grad_norms.append(torch.as_tensor(grad_norm, dtype=torch.float32, device=self._loss.device))
        self._rows.append({"step": step, "lr": lr, **host_values})
        self._images += images
        self._loss = torch.zeros((), device=self.accelerator.device)
        self._micro_batches = 0

    def due(self, step: int) -> bool:
        """Whether `step` is a regular read (every `every` steps)."""
        return step % self.every == 0

    def read(self) -> list[dict[str, Any]]:
        """Every step since the last read as `{"step", "loss", "grad_norm", "lr", ...}`; the last row also has
        `images_per_sec` over the interval. Raises `TrainingError` if any loss is not finite (the caller has
        not saved or exported anything since the last good read)."""
        if not self._rows:
            return []
        losses = self.accelerator.gather(torch.stack(self._losses)[None]).mean(dim=0)  # [processes, steps]
        values = torch.stack([losses, torch.stack(self._grad_norms).to(losses.device)]).tolist()  # the one sync
        now = time.perf_counter()
        rows = [{**row, "loss": loss, "grad_norm": norm} for row, loss, norm in zip(self._rows, *values, strict=True)]
        rows[-1]["images_per_sec"] = self._images / max(now - self._clock, 1e-9)
        self._losses, self._grad_norms, self._rows, self._images = [], [], [], 0
        self._clock = now
        bad = [row for row in rows if not math.isfinite(row["loss"])]
        if bad:
            raise TrainingError(
                f"non-finite loss {bad[0]['loss']} at step {bad[0]['step']}: stopping. Lower --learning-rate, keep "
                "gradient clipping or use --mixed-precision no" + (f"; {self.advice()}" if self.advice else "")
            )
        return rows

    def restart_clock(self) -> None:
        """Start the next images/s interval now (after a checkpoint or a sample grid, which are not training)."""
        self._clock = time.perf_counter()
