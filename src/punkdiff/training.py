"""Helpers for the Accelerate training loop in `training/train.py`.

The loop itself stays in the script so it reads top to bottom; what lives here is what the loop
calls: the one argument parser (shared with `punkdiff train`), flag -> preset resolution, the
diffusion loss, crash-safe checkpoints, and the run summary.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import re
import resource
import shutil
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from punkdiff.presets import PRESETS, Preset, PresetError, TrainSpec, parse_set_flags, resolve_preset
from punkdiff.visuals import display_scale, image_grid

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. a non-finite loss); the message says why and what is kept."""


def build_train_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    """The single parser behind `accelerate launch training/train.py` and `punkdiff train`."""
    p = argparse.ArgumentParser(prog=prog, description="Train a punkdiff preset with Accelerate.")
    add_train_arguments(p)
    return p


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Add the training flags to `p` (the `punkdiff train` subparser or the script's own parser)."""
    p.add_argument("--preset", choices=sorted(PRESETS), help="named preset (see `punkdiff presets`)")
    p.add_argument("--config", help="YAML/JSON file of overrides: {preset: NAME, model: {...}, train: {...}}")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any preset field, e.g. --set model.block_out_channels=[32,64] (repeatable)")
    p.add_argument("--dataset", help="Hub dataset id or local folder (Hub layout or plain images)")
    p.add_argument("--split", help="dataset split (default: the preset's, usually 'train')")
    p.add_argument("--image-column", help="column holding the images (default: the first Image column)")
    p.add_argument("--max-train-samples", type=int, help="use only the first N images of the split")
    p.add_argument("--output-dir", default="outputs/run", help="where checkpoints, logs and the export go")
    p.add_argument("--overwrite-output-dir", action="store_true",
                   help="delete the checkpoints, samples and logs of an earlier run in --output-dir first")
    p.add_argument("--max-steps", type=int, help="optimizer steps to train for (overrides --epochs)")
    p.add_argument("--epochs", type=int, help="passes over the dataset")
    p.add_argument("--batch-size", type=int, help="images per process per micro-batch")
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--lr-warmup-steps", type=int)
    p.add_argument("--gradient-accumulation-steps", type=int)
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction", "sample"])
    p.add_argument("--snr-gamma", type=float, help="min-SNR-gamma loss weighting (5.0 is the paper's value)")
    p.add_argument("--no-ema", action="store_true", help="train without EMA weights (export the raw weights)")
    p.add_argument("--checkpoint-every", type=int, help="save an Accelerate checkpoint every N optimizer steps")
    p.add_argument("--checkpoints-total-limit", type=int, help="keep only the last K checkpoints")
    p.add_argument("--resume-from-checkpoint", metavar="latest|PATH", help="continue a run exactly where it stopped")
    p.add_argument("--sample-every", type=int, help="save a DDIM sample grid from the EMA weights every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-to", default="tensorboard", choices=["tensorboard", "wandb", "none"])
    p.add_argument("--cache-dir", help="where decoded image tensors are cached (default ~/.cache/punkdiff)")
    p.add_argument("--data-on-device", choices=["auto", "yes", "no"], default="auto",
                   help="keep the whole decoded dataset on the training device (auto: if it is a GPU and < 2 GB)")


_FLAG_TO_FIELD = {
    "split": ("data", "split"),
    "image_column": ("data", "image_column"),
    "max_train_samples": ("data", "max_samples"),
    "max_steps": ("train", "max_steps"),
    "epochs": ("train", "epochs"),
    "batch_size": ("train", "batch_size"),
    "learning_rate": ("train", "learning_rate"),
    "lr_warmup_steps": ("train", "lr_warmup_steps"),
    "gradient_accumulation_steps": ("train", "gradient_accumulation_steps"),
    "mixed_precision": ("train", "mixed_precision"),
    "prediction_type": ("scheduler", "prediction_type"),
    "snr_gamma": ("train", "snr_gamma"),
    "checkpoint_every": ("train", "checkpoint_every"),
    "checkpoints_total_limit": ("train", "checkpoints_total_limit"),
    "sample_every": ("train", "sample_every"),
}


def resolve_training_config(args: argparse.Namespace) -> Preset:
    """Preset <- --config file <- --set flags <- dedicated flags; validated before any data loads."""
    overrides = parse_set_flags(args.set)
    for flag, (section, key) in _FLAG_TO_FIELD.items():
        value = getattr(args, flag)
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    if args.no_ema:
        overrides.setdefault("train", {})["use_ema"] = False
    if args.dataset:
        overrides.setdefault("data", {})["dataset"] = args.dataset
    preset = resolve_preset(args.preset, args.config, overrides)
    if preset.data.dataset is None:
        raise PresetError(f"preset {preset.name!r} has no default dataset: pass --dataset (Hub id or local folder)")
    default = PRESETS.get(preset.name)
    if default and preset.data.dataset != default.data.dataset and preset.data.license == default.data.license:
        # the preset's license describes its own dataset's terms, not whatever data replaced it
        preset.data.license = "other"
    if args.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise PresetError("--report-to wandb needs wandb: pip install 'punkdiff[wandb]' (or use tensorboard)")
    if args.resume_from_checkpoint not in (None, "latest") and not Path(args.resume_from_checkpoint).is_dir():
        raise PresetError(f"--resume-from-checkpoint {args.resume_from_checkpoint}: no such checkpoint folder")
    return preset


# what must not change between a checkpoint and the run resuming it: the model, the noise
# process, the data and how it is batched (the saved data position counts batches)
_RESUME_INVARIANTS = ("model", "scheduler", "data", "train.batch_size", "train.gradient_accumulation_steps")


def check_resume(
    output_dir: str | Path, which: str | None, preset: Preset, num_processes: int, overwrite: bool = False
) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from and its saved loop state, after checking it fits this run.

    Without `--resume-from-checkpoint`, an output folder that already holds checkpoints is refused
    (unless `overwrite`): a second run there would mix its checkpoints with the first one's.
    """
    if which is None:
        if list_checkpoints(output_dir) and not overwrite:
            raise TrainingError(
                f"{Path(output_dir) / 'checkpoints'} already holds checkpoints of another run: pass "
                "--resume-from-checkpoint latest to continue it, --overwrite-output-dir to start over, "
                "or choose a new --output-dir"
            )
        return None
    checkpoint = find_checkpoint(output_dir, which)
    if checkpoint is None:
        return None
    state = json.loads((checkpoint / STATE_FILE).read_text())
    saved, current = state["config"], preset.to_dict()
    changed = []
    for key in _RESUME_INVARIANTS:
        section, _, field = key.partition(".")
        before = saved[section] if not field else saved[section][field]
        after = current[section] if not field else current[section][field]
        if json.dumps(before, sort_keys=True) != json.dumps(after, sort_keys=True):
            changed.append(f"{key}: {before} -> {after}")
    if state["num_processes"] != num_processes:
        changed.append(f"processes: {state['num_processes']} -> {num_processes}")
    if changed:
        raise TrainingError(
            f"{checkpoint} was saved by a run with other settings ({'; '.join(changed)}); resume with the same "
            "settings or start a new --output-dir"
        )
    if preset.train.max_steps is not None and state["global_step"] >= preset.train.max_steps:
        raise TrainingError(
            f"{checkpoint} is at step {state['global_step']}, already >= --max-steps {preset.train.max_steps}: "
            "pass a larger --max-steps to train further"
        )
    return checkpoint, state


def diffusion_loss(
    model: torch.nn.Module,
    noise_scheduler: DDPMScheduler,
    clean: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """MSE between the UNet output and its target (epsilon, v or x_0), optionally min-SNR weighted.

    Min-SNR-gamma (Hang et al. 2023) clamps the per-timestep weight at gamma so easy, low-noise
    steps stop dominating; the weight is expressed relative to each prediction type's target.
    """
    prediction_type = noise_scheduler.config.prediction_type
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(clean, noise, timesteps)
    else:
        target = clean
    pred = model(noisy, timesteps).sample
    if snr_gamma is None:
        return F.mse_loss(pred.float(), target.float())
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weight = torch.clamp(snr, max=snr_gamma)
    if prediction_type == "epsilon":
        weight = weight / snr
    elif prediction_type == "v_prediction":
        weight = weight / (snr + 1)
    per_image = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_image * weight).mean()


def distributed_cpu_fallback() -> bool:
    """True when launched as several processes on a machine with no GPU.

    `accelerate launch --multi_gpu --num_processes N` without a GPU would otherwise give N
    independent single-process runs writing over each other; `Accelerator(cpu=True)` makes them
    one run over gloo instead.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


# --- checkpoints -------------------------------------------------------------------------------

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with a state file), oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir() if (m := _CHECKPOINT_RE.match(d.name))]
    return [d for _, d in sorted(found) if (d / STATE_FILE).is_file()]


def find_checkpoint(output_dir: str | Path, which: str) -> Path | None:
    """`latest` -> the newest complete checkpoint under output_dir (None if there is none); else the path."""
    if which != "latest":
        path = Path(which)
        if not (path / STATE_FILE).is_file():
            raise TrainingError(f"{path} is not a complete punkdiff checkpoint (no {STATE_FILE})")
        return path
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    state: dict[str, Any],
    generator: torch.Generator,
    total_limit: int | None,
) -> Path:
    """`accelerator.save_state` into a temporary folder, then an atomic rename.

    A crash mid-save leaves only a `.tmp` folder that resume ignores, so a half-written
    checkpoint never replaces a good one. Older checkpoints beyond `total_limit` are removed only
    after the new one is complete.
    """
    root = Path(output_dir) / "checkpoints"
    final = root / f"checkpoint-{state['global_step']}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    save_generator_state(generator, tmp / f"noise_rng_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path, generator: torch.Generator) -> None:
    """Restore model, optimizer, LR schedule, EMA (via hooks), RNG states and our noise generator."""
    accelerator.load_state(str(path))
    generator.set_state(torch.load(path / f"noise_rng_{accelerator.process_index}.pt", weights_only=True))


def save_generator_state(generator: torch.Generator, path: Path) -> None:
    """The per-process noise generator, saved as a plain uint8 tensor (loaded with weights_only)."""
    torch.save(generator.get_state(), path)


def register_ema_hooks(accelerator: Accelerator, ema: EMAModel) -> None:
    """Save/restore EMA weights with every Accelerate checkpoint, as `unet_ema/` (safetensors).

    `EMAModel.save_pretrained` stores the EMA counters in the UNet config; loading reads them back
    with the weights, from safetensors only.
    """
    from diffusers import UNet2DModel

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            ema.save_pretrained(os.path.join(output_dir, "unet_ema"))

    def load_hook(models, input_dir):
        path = os.path.join(input_dir, "unet_ema")
        saved = UNet2DModel.from_pretrained(path, use_safetensors=True)
        state = {k: v for k, v in UNet2DModel.load_config(path).items() if k in ema.state_dict()}
        ema.load_state_dict({**state, "shadow_params": [p.detach() for p in saved.parameters()]})
        ema.to(accelerator.device)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# --- samples and reporting ---


def ema_sample_grid(
    unet: UNet2DModel, ema: EMAModel | None, noise_scheduler: DDPMScheduler, cfg: TrainSpec, seed: int
) -> Image.Image:
    """A DDIM grid from the EMA weights (swapped in, then back) in eval mode, one fixed generator per image."""
    from punkdiff.pipelines import PunkDiffPipeline  # diffusers: imported when used, so the CLI starts fast

    was_training = unet.training
    unet.eval()  # no dropout: the grid shows what the exported model generates
    if ema is not None:
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
    pipe = PunkDiffPipeline(unet=unet, scheduler=noise_scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        batch_size=cfg.num_sample_images,
        generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(cfg.num_sample_images)],
        sampler="ddim",
        num_inference_steps=cfg.sample_inference_steps,
    ).images
    if ema is not None:
        ema.restore(unet.parameters())
    unet.train(was_training)
    return image_grid(images, scale=display_scale(unet.config.sample_size), gap=1)


def log_image(accelerator: Accelerator, name: str, image: Image.Image, step: int) -> None:
    """Send an image to every active tracker (TensorBoard, or wandb when installed and asked for)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(name, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: wandb.Image(image)}, step=step)


def ema_weights_in_sync(accelerator: Accelerator, ema: EMAModel) -> bool:
    """Whether every process holds the same EMA weights (each updates its own copy after the all-reduce)."""
    checksum = torch.stack([p.double().sum() for p in ema.shadow_params]).sum()[None]
    return bool((accelerator.gather(checksum) == checksum).all())


# --- reporting ---------------------------------------------------------------------------------


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory if on a GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def flat_config(preset: Preset) -> dict[str, Any]:
    """The preset as flat scalars, the form TensorBoard's hparams and wandb's config accept."""
    out: dict[str, Any] = {"preset": preset.name}
    for section, values in preset.to_dict().items():
        if isinstance(values, dict):
            for k, v in values.items():
                out[f"{section}.{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def remove_previous_run(output_dir: str | Path) -> None:
    """For --overwrite-output-dir: delete an earlier run's checkpoints, sample grids and logs."""
    for name in ("checkpoints", "samples", "logs"):
        shutil.rmtree(Path(output_dir) / name, ignore_errors=True)


def package_versions() -> dict[str, str]:
    """Versions recorded in training_summary.json, so a result can be reproduced."""
    names = ["punkdiff", "torch", "diffusers", "accelerate", "datasets", "safetensors", "huggingface_hub"]
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def steps_per_epoch(batches_per_epoch: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps per epoch per process: the last partial accumulation still steps."""
    if batches_per_epoch == 0:
        raise TrainingError(
            "the dataset has fewer images than one global batch (batch size x processes): lower --batch-size"
        )
    return math.ceil(batches_per_epoch / gradient_accumulation_steps)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write via a temporary file so a reader never sees half a JSON document."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)
