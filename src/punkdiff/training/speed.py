"""Speed settings of the loop, each decided here by the device and the flags, not inside the loop.

- AdamW is fused (one kernel for all parameters) on CUDA, and left to PyTorch's default elsewhere.
- `--channels-last` stores the UNet's weights (and so its activations) as NHWC, what tensor cores convolve fastest.
- `--compile [BACKEND]` compiles the training forward only (`torch.compile`, inductor by default); EMA, previews,
  checkpoints and the export use the eager module, so they neither recompile nor change their keys.
- bf16 autocast is Accelerate's `--mixed-precision bf16`. On a CPU it is asked for only where the CPU computes bf16
  natively (AVX-512 BF16 or AMX), where it is faster than float32; elsewhere oneDNN emulates it, far slower, so such a
  CPU trains in float32 and says so (`precision_for`; figures in docs/results.md, "CryptoPunks on CPU").
- The whole decoded dataset sits on the GPU when it fits (`--data-on-device`), and otherwise comes through pinned
  memory with non-blocking copies.
- `--log-every N` reads the loss back from the device every N steps (`step_log.StepLog`), not every step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from punkdiff.precision import cpu_has_native_bf16
from punkdiff.presets import TrainSpec


def precision_for(requested: str, device: torch.device) -> tuple[str, str | None]:
    """The mixed precision to ask Accelerate for on `device`, and why it differs from `requested` (None if not).

    bf16 on a CPU without native bf16 becomes float32, because oneDNN's emulated bf16 is far slower than float32
    there (measured with `ONEDNN_MAX_CPU_ISA=AVX2`: docs/results.md, "CryptoPunks on CPU").

    Examples:
        ```py
        >>> precision_for("bf16", torch.device("cuda"))
        ('bf16', None)
        >>> precision_for("no", torch.device("cpu"))
        ('no', None)
        ```
    """
    if requested == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        return "no", ("--mixed-precision bf16: this CPU has no native bf16 (AVX-512 BF16 or AMX), where bf16 "
                      "autocast runs about 10x slower than float32: training in float32 instead, about 1.6x "
                      "slower than on a CPU with bf16")
    return requested, None


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
