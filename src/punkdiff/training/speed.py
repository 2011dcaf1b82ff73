"""Speed settings of the loop, each decided here by the device and the flags, not inside the loop.

- AdamW is fused (one kernel for all parameters) on CUDA, and left to PyTorch's default elsewhere.
- `--channels-last` stores the UNet's weights (and so its activations) as NHWC, what tensor cores convolve fastest.
- `--compile [BACKEND]` compiles the training forward only (`torch.compile`, inductor by default); EMA, previews,
  checkpoints and the export use the eager module, so they neither recompile nor change their keys.
- bf16 autocast is Accelerate's `--mixed-precision bf16`; the whole decoded dataset sits on the GPU when it fits
  (`--data-on-device`), and otherwise comes through pinned memory with non-blocking copies.
- `--log-every N` reads the loss back from the device every N steps (`step_log.StepLog`), not every step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from punkdiff.presets import TrainSpec


def build_optimizer(
    parameters: Iterable[torch.nn.Parameter], train_spec: TrainSpec, device: torch.device
) -> torch.optim.AdamW:
    """The preset's AdamW, fused on CUDA.

    Examples:
        ```py
        >>> net = torch.nn.Linear(2, 2)
        >>> build_optimizer(net.parameters(), TrainSpec(), torch.device("cpu")).defaults["fused"] is None
        True
        ```
    """
    return torch.optim.AdamW(
        parameters,
        lr=train_spec.learning_rate,
        betas=(train_spec.adam_beta1, train_spec.adam_beta2),
        weight_decay=train_spec.adam_weight_decay,
        eps=train_spec.adam_epsilon,
        fused=True if device.type == "cuda" else None,
    )
