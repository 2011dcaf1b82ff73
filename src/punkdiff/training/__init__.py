"""What the Accelerate loop in `training/train.py` calls, one module per concern.

- `arguments`: the one argument parser (`train.py` and `punkdiff train`) and flags -> a validated preset
- `launch`: the Accelerator (one process group on CPUs too) and the precision the device really trains in
- `batches`: the loader, from the decoded cache or a stream (when the cache would not fit its budget)
- `optimization`: the UNet, noise schedule, AdamW, LR schedule and EMA, prepared by Accelerate
- `resume`: which checkpoint a run continues from, whether its settings allow it, and restoring it
- `checkpoints`: crash-safe Accelerate checkpoints, with the EMA weights and the noise generator
- `loss`: the diffusion loss (epsilon, v or x_0 targets, min-SNR-gamma weighting)
- `progress`: where the loop is (step, epoch, batch, images seen, loss history), saved with each checkpoint
- `previews`: sample grids from the EMA weights during training
- `reporting`: tracker logging, memory, the run summary and package versions
- `export`: the end of a run: the EMA weights exported as a pipeline, the last grid, the loss curve, the push
- `resources`: writable output folders and disk space checked before training, out-of-memory advice
- `preemption`: SIGTERM turned into a checkpoint after the current step, then a clean exit
- `step_log`: per-step loss and gradient norm kept on the device, read back (and checked finite) every few steps
- `speed`: the device-dependent speed settings (fused AdamW on CUDA; what the speed flags do)

The loop itself stays in `training/train.py`, so it reads top to bottom. This package imports no torch at
import time (`punkdiff --help` stays fast); its modules do.
"""


class TrainingError(RuntimeError):
    """The run cannot start or continue; the message says why, what is kept, and what to do."""
