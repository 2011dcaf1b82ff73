"""The one argument parser behind `accelerate launch training/train.py` and `punkdiff train`, and flags -> preset.

Imports no torch, so `punkdiff --help` starts fast; every flag problem is found here, before any data loads.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from punkdiff.presets import PRESETS, Preset, PresetError, parse_set_flags, resolve_preset


def build_train_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    """The parser of `training/train.py`; `punkdiff train` adds the same flags to its subparser.

    Examples:
        ```py
        >>> args = build_train_parser().parse_args(["--preset", "mnist-baseline-16", "--max-steps", "100"])
        >>> resolve_training_config(args).train.max_steps
        100
        ```
    """
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
    p.add_argument("--condition-on", metavar="COLUMN[,COLUMN]",
                   help="train a conditional model (classifier-free guidance) told these columns: a ClassLabel "
                   "(MNIST label, punk type) or a sequence of ClassLabels or strings (punk accessories)")
    p.add_argument("--balance-conditions", choices=["none", "sampler", "loss"],
                   help="rare classes of a conditional run: draw them more often (sampler) or weigh their loss "
                   "(default: the preset's)")
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
    p.add_argument("--init-from", metavar="MODEL",
                   help="fine-tune: start from the UNet of an exported pipeline folder or Hub model id "
                   "(its architecture and noise schedule must match the preset's)")
    p.add_argument("--checkpoint-every", type=int, help="save an Accelerate checkpoint every N optimizer steps")
    p.add_argument("--checkpoints-total-limit", type=int, help="keep only the last K checkpoints")
    p.add_argument("--resume-from-checkpoint", metavar="latest|PATH", help="continue a run exactly where it stopped")
    p.add_argument("--extend-schedule", action="store_true",
                   help="with --resume-from-checkpoint and a larger --max-steps/--epochs: continue a run past its "
                   "planned end, the LR schedule re-planned over the new length (the LR jumps; the jump is printed)")
    p.add_argument("--sample-every", type=int, help="save a DDIM sample grid from the EMA weights every N steps")
    p.add_argument("--eval-every", type=int, metavar="N",
                   help="every N steps, score --eval-images EMA samples (sliced Wasserstein distance to training "
                   "images, beside its real-vs-real floor); logged and in training_summary.json")
    p.add_argument("--eval-images", type=int, default=100, help="samples per --eval-every evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-to", default="tensorboard", choices=["tensorboard", "wandb", "none"])
    p.add_argument("--cache-dir", help="where decoded image tensors are cached (default ~/.cache/punkdiff)")
    p.add_argument("--streaming", action="store_true",
                   help="stream the dataset with `datasets` and decode it on the fly, each process its own shard, "
                   "instead of caching it decoded (also chosen by itself when the cache exceeds --cache-budget)")
    p.add_argument("--cache-budget", type=float, metavar="GB",
                   help="stream any dataset whose decoded cache would exceed this many GB (default: 90%% of the "
                   "free space on the cache folder's disk)")
    p.add_argument("--data-on-device", choices=["auto", "yes", "no"], default="auto",
                   help="keep the whole decoded dataset on the training device (auto: if it is a GPU and < 2 GB)")
    p.add_argument("--log-every", type=int, default=10, metavar="N",
                   help="read the loss back from the device every N steps (and before checkpoints and grids); "
                   "reading waits for the device, so on a GPU reading every step costs speed")
    p.add_argument("--channels-last", action="store_true", help="NHWC weights and activations (faster on GPUs)")
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="torch.compile the UNet (default backend inductor; the first steps are slower)")
    p.add_argument("--push-to-hub", action="store_true",
                   help="upload the exported pipeline at the end of the run (needs `hf auth login` or HF_TOKEN)")
    p.add_argument("--hub-model-id", help="repo to push to (default: the --output-dir folder's name)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo as private")


# The teacher's sampling steps a first student copies without `--teacher-steps`: the punk teacher's 2M path still
# improves past 16 steps (docs/few-step.md), and copying its 32-step path made better students on both presets.
DEFAULT_TEACHER_STEPS = 32


def add_distill_arguments(p: argparse.ArgumentParser) -> None:
    """The distillation flags: the teacher, the step counts, and every training flag (`--max-steps` per stage)."""
    p.add_argument("teacher", metavar="MODEL", help="the teacher: an exported pipeline folder or Hub model id")
    p.add_argument("--steps", type=int, default=4, help="sampling steps of the final student (default 4)")
    p.add_argument("--teacher-steps", type=int, default=DEFAULT_TEACHER_STEPS,
                   help=f"sampling steps of the teacher the first student learns from (default "
                        f"{DEFAULT_TEACHER_STEPS}: a better path to copy than 16 where the teacher's still improves)")
    p.add_argument("--stage-factor", type=int, default=0,
                   help="teacher steps per student step in each stage: 0 distils in one stage (teacher steps / "
                        "--steps; the default), 2 halves the steps stage by stage (progressive distillation, e.g. "
                        "--teacher-steps 64: 64 -> 32 -> 16 -> 8 -> 4)")
    p.add_argument("--teacher-solver", choices=("ddim", "dpm-solver-2", "dpm-solver-2m"), default="dpm-solver-2m",
                   help="how the teacher walks its steps within one student step: second-order DPM-Solver++ 2M "
                        "(default), 2S, or DDIM (progressive distillation's); the same network evaluations")
    p.add_argument("--dmd-steps", type=int, metavar="N",
                   help="optimizer steps of a last stage that pulls the student's images toward its teacher's "
                        "distribution (distribution matching, DMD; default: 1/13 of the teacher's training steps, "
                        "about half its training time, or --max-steps; 0 leaves it out)")
    p.add_argument("--gan-weight", type=float, metavar="W",
                   help="weight of that stage's GAN term, a discriminator on the teacher's features that also sees "
                        "the training images and alone judges the noisiest levels, so the student draws its modes "
                        "in the data's proportions (default: 3, `distribution_matching.GAN_WEIGHT`; 0 leaves it out "
                        "and the teacher's score judges every level)")
    add_train_arguments(p)
    # a student starts from its teacher's weights: a third of the presets' 1e-3 (3e-4 and 1e-4 measured alike)
    p.set_defaults(output_dir="outputs/distill", learning_rate=3e-4)


MAX_SEED = 2**32 - 1

_FLAG_TO_FIELD = {
    "split": ("data", "split"),
    "image_column": ("data", "image_column"),
    "condition_on": ("data", "condition_on"),
    "balance_conditions": ("train", "balance_conditions"),
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
    if not 0 <= args.seed <= MAX_SEED:
        raise PresetError(f"--seed must be in [0, {MAX_SEED}] (NumPy's seed range), got {args.seed}")
    if args.extend_schedule and not args.resume_from_checkpoint:
        raise PresetError("--extend-schedule only applies with --resume-from-checkpoint")
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
    if args.cache_budget is not None and not 0 <= args.cache_budget < float("inf"):
        raise PresetError(f"--cache-budget must be a size in GB, 0 or more (got {args.cache_budget})")
    if args.log_every <= 0:
        raise PresetError(f"--log-every must be positive (got {args.log_every})")
    if (args.eval_every is not None and args.eval_every < 1) or args.eval_images < 10:
        raise PresetError(f"--eval-every must be at least 1 and --eval-images at least 10 (got {args.eval_every}, "
                          f"{args.eval_images})")
    if preset.data.condition_on and args.init_from:
        raise PresetError("--init-from starts from an unconditional UNet, which has no class embedding to condition: "
                          "train a conditional model from scratch (drop --init-from)")
    if (args.hub_model_id or args.private) and not args.push_to_hub:
        raise PresetError("--hub-model-id and --private only apply with --push-to-hub")
    if args.push_to_hub:
        from huggingface_hub import get_token

        if get_token() is None:  # known now, not after hours of training
            raise PresetError("--push-to-hub needs a Hugging Face login: run `hf auth login` or set HF_TOKEN")
    return preset


def hub_model_id(args: argparse.Namespace) -> str:
    """Where `--push-to-hub` uploads: `--hub-model-id`, else the output folder's name (as the diffusers examples)."""
    return args.hub_model_id or Path(args.output_dir).resolve().name
