"""The end of a run: the EMA weights exported as a pipeline with its card, the last grid, the loss curve, the push.

Exported are the EMA weights (the model's own without EMA), in a copy, so the trained module is left as it was.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from punkdiff.hub import ModelCardInfo, export_pipeline, push_to_hub
from punkdiff.presets import Preset
from punkdiff.visuals import plot_loss_curve

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    from punkdiff.training.conditioning import TrainingCondition


def export_run(output_dir: Path, preset: Preset, unet: UNet2DModel, ema: EMAModel | None,
               noise_scheduler: DDPMScheduler, history: list[list[float]], steps: int, grid: Image.Image,
               palette: np.ndarray | None = None, metrics: dict[str, float] | None = None,
               condition: TrainingCondition | None = None) -> None:
    """Write `samples.png`, `loss_curve.png` and `pipeline/` (the EMA weights, the card, the palette; a conditional
    model's vocabulary and the EMA weights of its attribute encoder)."""
    exported = copy.deepcopy(unet).eval()
    if ema is not None:
        ema.copy_to(exported.parameters())
    grid.save(output_dir / "samples.png")
    plot_loss_curve([h[0] for h in history], [h[1] for h in history], output_dir / "loss_curve.png",
                    title=f"{preset.name} on {preset.data.dataset}")
    export_pipeline(
        exported,
        noise_scheduler,
        output_dir / "pipeline",
        card=ModelCardInfo(
            preset=preset.name,
            dataset=str(preset.data.dataset),
            training_steps=steps,
            resolution=preset.data.resolution,
            license=preset.data.license,
            metrics=metrics,
        ),
        sample_grid=grid,
        palette=palette,
        condition=condition.vocabulary if condition is not None else None,
        attribute_encoder=condition.exported_encoder() if condition is not None else None,
    )


def push_export(accelerator: Accelerator, output_dir: Path, repo_id: str, private: bool | None) -> int:
    """Push `output_dir/pipeline` to the Hub; 0 when pushed, 1 when the push failed (the export stays on disk and
    the message says how to retry)."""
    try:
        url = push_to_hub(output_dir / "pipeline", repo_id, private=private)
    except Exception as err:  # the Hub's errors are many; the trained model is safe on disk either way
        accelerator.print(f"error: the push failed ({type(err).__name__}: {err}); the export is kept in "
                          f"{output_dir / 'pipeline'}: retry with `punkdiff push {output_dir / 'pipeline'} "
                          f"--repo-id {repo_id}`")
        return 1
    accelerator.print(f"pushed to {url}")
    return 0
