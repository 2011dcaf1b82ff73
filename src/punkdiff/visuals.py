"""What people look at: sample grids, noising/denoising GIFs, loss curves, saved as images."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from punkdiff.seeds import image_generators


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Model-space tensors `[B, C, H, W]` in [-1, 1] -> PIL images (L or RGB)."""
    arr = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a[..., 0], "L") if a.shape[-1] == 1 else Image.fromarray(a, "RGB") for a in arr]


def image_grid(
    images: Sequence[Image.Image], cols: int | None = None, scale: int = 1, gap: int = 0
) -> Image.Image:
    """A grid (diffusers' `make_image_grid`), each tile upscaled with nearest so pixel art stays crisp.

    `gap` puts a grey line of that many pixels between tiles, so images that fill their frame
    (digits, punks) stay apart.
    """
    from diffusers.utils import make_image_grid

    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    images = list(images) + [Image.new(images[0].mode, images[0].size)] * (rows * cols - len(images))
    tiles = []
    for image in images:
        if scale > 1:
            image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
        tiles.append(ImageOps.expand(image.convert("RGB"), border=gap, fill=(128, 128, 128)) if gap else image)
    return make_image_grid(tiles, rows=rows, cols=cols)


def display_scale(resolution: int, target: int = 96) -> int:
    """Integer upscale factor that makes a tile roughly `target` pixels wide."""
    return max(1, target // resolution)


def save_gif(frames: Sequence[Image.Image], path: str | Path, duration_ms: int = 60, hold_last_ms: int = 1500) -> Path:
    """Animated GIF that loops and lingers on the last frame."""
    path = Path(path)
    frames = [f.convert("RGB") if f.mode not in ("RGB", "L", "P") else f for f in frames]
    durations = [duration_ms] * (len(frames) - 1) + [hold_last_ms]
    frames[0].save(path, save_all=True, append_images=list(frames[1:]), duration=durations, loop=0)
    return path


def loss_curve_figure(steps: Sequence[int], losses: Sequence[float], title: str = ""):
    """Loss per optimizer step (faint) with a moving average, on a log scale, as a matplotlib `Figure`.

    Built with the object API (no pyplot state), so a web server can draw curves from several threads.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot(steps, losses, alpha=0.3, linewidth=0.8, label="loss")
    window = max(1, len(losses) // 50)
    if window > 1:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, linewidth=1.8, label=f"moving average ({window} steps)")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_loss_curve(steps: Sequence[int], losses: Sequence[float], path: str | Path, title: str = "") -> Path:
    """`loss_curve_figure` saved as an image."""
    path = Path(path)
    loss_curve_figure(steps, losses, title).savefig(path)
    return path


def denoising_gif(
    pipe,
    path: str | Path,
    num_images: int = 16,
    seed: int = 0,
    num_inference_steps: int | None = None,
    max_frames: int = 25,
    eta: float | None = None,
    sampler: str | None = None,
) -> Path:
    """Animate sampling: each frame is the grid of x_t beside the predicted x_0.

    The sampler, steps and eta left `None` are the model's recommendation (`punkdiff.sampling.recommended_sampling`).
    """
    from punkdiff.sampling import recommended_sampling

    sampler, num_inference_steps, eta = recommended_sampling(pipe).fill(sampler, num_inference_steps, eta)
    generators = image_generators(seed, num_images)
    out = pipe(
        batch_size=num_images,
        generator=generators,
        sampler=sampler,
        num_inference_steps=num_inference_steps,
        eta=eta,
        return_trajectory=True,
    )
    scale = display_scale(pipe.unet.config.sample_size, target=64)
    return save_gif(trajectory_frames(out.trajectory, out.pred_original_samples, scale, max_frames), path)


def trajectory_frames(
    trajectory: Sequence[Sequence[Image.Image]],
    pred_original_samples: Sequence[Sequence[Image.Image]],
    scale: int = 1,
    max_frames: int = 25,
) -> list[Image.Image]:
    """Frames of a denoising animation: at each kept step, the grid of x_t beside the grid of predicted x_0.

    `trajectory` and `pred_original_samples` are a pipeline's `return_trajectory=True` outputs (PIL).
    """
    keep = np.unique(np.linspace(0, len(trajectory) - 1, min(max_frames, len(trajectory))).round().astype(int))
    frames = []
    for i in keep:
        left = image_grid(trajectory[i], scale=scale, gap=1)
        right = image_grid(pred_original_samples[i], scale=scale, gap=1)
        frame = Image.new(left.mode, (left.width * 2 + 8, left.height), 255 if left.mode == "L" else (255,) * 3)
        frame.paste(left, (0, 0))
        frame.paste(right, (left.width + 8, 0))
        frames.append(frame)
    return frames


def noising_gif(images: torch.Tensor, scheduler, path: str | Path, num_frames: int = 40, seed: int = 0) -> Path:
    """Animate the forward process q(x_t | x_0) on real images `[B, C, H, W]` in [-1, 1]."""
    T = scheduler.config.num_train_timesteps
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    scale = display_scale(images.shape[-1])
    frames = []
    for t in np.linspace(0, T - 1, num_frames).round().astype(int):
        noisy = scheduler.add_noise(images, noise, torch.full((images.shape[0],), int(t)))
        frames.append(image_grid(to_pil(noisy), scale=scale, gap=1))
    return save_gif(frames, path)
