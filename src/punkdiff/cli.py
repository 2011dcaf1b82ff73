"""punkdiff: train, sample, inpaint, check and ship unconditional diffusion models (Diffusers + Accelerate)."""

# A thin face over the library: parse, check the input, call, print. No training or sampling logic lives here,
# and nothing heavy is imported before a subcommand runs, so `punkdiff --help` and `punkdiff presets` start fast.

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from punkdiff.interrupts import exit_on_interrupt, process_start_time, written_since
from punkdiff.precision import SAMPLING_PRECISIONS  # light, like presets
from punkdiff.presets import DDIM_ETA, MAX_SAMPLING_SEED  # light: no torch, so the parser builds fast


class UsageError(ValueError):
    """Input a subcommand cannot use; printed as one line, exit code 2."""


def _int_at_least(minimum: int, expected: str) -> Callable[[str], int]:
    """An argparse type: a whole number of at least `minimum`, else an error saying what was expected."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_count = _int_at_least(0, "a whole number (0 or more)")


def _seed(text: str) -> int:
    """A seed torch's generators take with room for seed + i (the web app's range)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to 2**63 - 1, got {text!r}") from None
    if not 0 <= value <= MAX_SAMPLING_SEED:
        raise argparse.ArgumentTypeError(f"must be from 0 to 2**63 - 1 ({MAX_SAMPLING_SEED}), got {value}")
    return value


def _unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


# ---- presets ---------------------------------------------------------------------------------------------------


def _add_presets(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list the named presets (resolution, channels, parameters)")
    p.set_defaults(func=_run_presets)


def _run_presets(args: argparse.Namespace) -> int:
    from punkdiff.presets import format_presets_table

    print(format_presets_table())
    return 0


# ---- train and demo --------------------------------------------------------------------------------------------


def _add_train(sub: argparse._SubParsersAction) -> None:
    from punkdiff.training.arguments import add_train_arguments

    p = sub.add_parser("train", help="train a preset (same flags as `accelerate launch training/train.py`)")
    add_train_arguments(p)
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from punkdiff.scripts.train import run

    return run(args)


def _add_distill(sub: argparse._SubParsersAction) -> None:
    from punkdiff.training.arguments import add_distill_arguments

    p = sub.add_parser("distill", help="distil a model into a few-step student (same flags as "
                       "`accelerate launch training/distill.py`)")
    add_distill_arguments(p)
    p.set_defaults(func=_run_distill)


def _run_distill(args: argparse.Namespace) -> int:
    from punkdiff.scripts.distill import run

    return run(args)


# Sized for a 5-minute budget on 2 CPU cores, and without EMA: the cosine learning rate anneals to zero over so short
# a run that the raw weights are already settled while the EMA still carries older ones (docs/results.md, "The demo").
DEMO_STEPS = 2000


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job: train mnist-16 on real digits for 5 minutes on 2 CPU cores, then export the "
        "pipeline, a sample grid, a denoising and a noising GIF (replaces an earlier demo in --output-dir)",
    )
    p.add_argument("--dataset", default="sklearn-digits",
                   help="default: the 1,797 real 8x8 digits scikit-learn ships (no download); "
                   "or the MNIST mirror / a Hub id")
    p.add_argument("--output-dir", default="punkdiff-demo")
    p.add_argument("--max-steps", type=_positive_int, default=DEMO_STEPS)
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from punkdiff.data import load_training_images, to_model_input
    from punkdiff.pipelines import PunkDiffPipeline
    from punkdiff.presets import get_preset
    from punkdiff.scripts.train import run
    from punkdiff.training.arguments import build_train_parser
    from punkdiff.visuals import denoising_gif, noising_gif

    out = Path(args.output_dir)
    train_args = build_train_parser().parse_args([
        "--preset", "mnist-16", "--dataset", args.dataset, "--output-dir", str(out),
        "--max-steps", str(args.max_steps), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
        "--checkpoint-every", str(max(args.max_steps // 3, 1)),
        "--checkpoints-total-limit", "1", "--sample-every", str(max(args.max_steps // 3, 1)), "--overwrite-output-dir",
        "--no-ema",
    ])
    code = run(train_args)
    if code:
        return code
    pipe = PunkDiffPipeline.from_pretrained(out / "pipeline")
    gif = denoising_gif(pipe, out / "denoising.gif", num_images=16, seed=args.seed)
    real = load_training_images(args.dataset, get_preset("mnist-16").data, progress=False).images[:16]
    noise_gif = noising_gif(to_model_input(real), pipe.scheduler, out / "noising.gif", seed=args.seed)
    print("\npunkdiff demo finished:")
    for name, path in [
        ("exported pipeline (load with DDPMPipeline.from_pretrained)", out / "pipeline"),
        ("sample grid", out / "samples.png"),
        ("denoising GIF (x_t | predicted x_0)", gif),
        ("noising GIF (forward process on real digits)", noise_gif),
        ("loss curve", out / "loss_curve.png"),
        ("training summary", out / "training_summary.json"),
    ]:
        print(f"  {name}: {path.resolve()}")
    return 0


# ---- sample, reconstruct, inpaint: a model, then images ----------------------------------------------------------


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="exported model folder (or `save_pretrained` folder), or a Hub model id")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="weights and compute precision (float16/bfloat16 halve memory on a GPU)")
    p.add_argument("--seed", type=_seed, default=0, help="image i uses seed+i, so it does not depend on the count")


class _SamplerNames(Sequence[str]):
    """The pipeline's sampler names (`SAMPLERS`), read only when argparse checks or shows `--scheduler`, so that
    building the parser (`punkdiff --help`) imports no torch."""

    @staticmethod
    def _names() -> list[str]:
        from punkdiff.pipelines.punkdiff_pipeline import SAMPLERS

        return list(SAMPLERS)

    def __getitem__(self, index):
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())


def _add_sampler_arguments(
    p: argparse.ArgumentParser, default_steps: str, scheduler: str | None = None, eta: float | None = None
) -> None:
    """--scheduler, --steps, --eta; left out (None), the model's recommendation (its sampling.json) fills them."""
    recommended = "the model's recommendation (its sampling.json), else ddim"
    p.add_argument("--scheduler", choices=_SamplerNames(), default=scheduler, metavar="SAMPLER",
                   help=f"the sampler: %(choices)s (default: {scheduler or recommended})")
    p.add_argument("--steps", type=_positive_int, default=None, help=default_steps)
    p.add_argument("--eta", type=_unit_float, default=eta,
                   help="DDIM noise weight: 0 deterministic, 1 DDPM-like (default: "
                   f"{f'the recommendation, else {DDIM_ETA:g}' if eta is None else f'{eta:g}'})")


def _guidance(text: str) -> float:
    from punkdiff.pipelines.punkdiff_pipeline import check_guidance_scale

    try:
        return check_guidance_scale(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_condition_arguments(p: argparse.ArgumentParser) -> None:
    """What a conditional model is asked for; each flag is checked against the model's vocabulary before work."""
    group = p.add_argument_group("condition (conditional models)")
    group.add_argument("--label", action="append", default=[], metavar="NAME",
                       help="a digit or class, by name or index; repeat it to split the images evenly between the "
                            "labels, in order (one grid row each)")
    group.add_argument("--type", default=None, metavar="NAME", help="the punk type, e.g. Ape (the `type` column)")
    group.add_argument("--accessory", action="append", default=[], metavar="NAME",
                       help="an accessory, e.g. Cap; repeat for several (the `accessories` column)")
    group.add_argument("--attribute", action="append", default=[], metavar="COLUMN=NAME",
                       help="any condition column of the model; repeat a multi-label column for several names")
    group.add_argument("--guidance", type=_guidance, default=1.0, metavar="W",
                       help="classifier-free guidance: 1 the conditional model alone (default), 0 the unconditional "
                            "one, 2-5 follows the request more closely at two forwards per step")


def _condition(args: argparse.Namespace, pipe, num_images: int) -> dict:
    """The condition flags as `PunkDiffPipeline` arguments for `num_images` images, refused before any work when
    the model cannot take them: unknown names come back with the known ones."""
    from punkdiff.pipelines.punkdiff_pipeline import MULTI, ConditionError

    attributes: dict[str, object] = {}
    if args.type is not None:
        attributes["type"] = args.type
    if args.accessory:
        attributes["accessories"] = list(args.accessory)
    for item in args.attribute:
        column, sep, name = item.partition("=")
        if not sep or not column or not name:
            raise UsageError(f"--attribute {item!r}: give COLUMN=NAME, e.g. --attribute type=Ape")
        attributes.setdefault(column, []).append(name)
    flags = "--label, --type, --accessory or --attribute"
    if args.label and attributes:
        raise UsageError("give --label, or --type/--accessory/--attribute, not both")
    if pipe.condition is None:
        if args.label or attributes:
            raise UsageError(f"{args.model} is an unconditional model: it takes no {flags}")
        if args.guidance != 1.0:
            raise UsageError(f"--guidance needs a conditional model; {args.model} is unconditional")
        return {}
    if not (args.label or attributes):
        if args.guidance != 1.0:
            raise UsageError(f"--guidance {args.guidance:g} needs a condition to guide towards: give {flags}")
        return {}
    if args.label and num_images % len(args.label):
        raise UsageError(f"{num_images} images cannot be split evenly between {len(args.label)} --label values; "
                         f"ask for a multiple of {len(args.label)}")
    groups = {g.column: g for g in pipe.condition.groups}
    for column, names in attributes.items():  # a single-label column takes one name, not a list
        if column in groups and groups[column].kind != MULTI and isinstance(names, list):
            if len(names) > 1:
                raise UsageError(f"{column} takes one name; got {', '.join(names)}")
            attributes[column] = names[0]
    labels = [_label(label, pipe.condition) for label in args.label]
    try:
        if labels:
            pipe.condition.encode_request(labels=labels)
            return {"labels": [labels[i * len(labels) // num_images] for i in range(num_images)],
                    "guidance_scale": args.guidance}
        pipe.condition.encode_request(attributes=attributes)
    except ConditionError as err:
        raise UsageError(str(err)) from None
    return {"attributes": attributes, "guidance_scale": args.guidance}


def _label(text: str, condition) -> int | str:
    """A --label value: a name of the model's label column, or else an index."""
    from punkdiff.pipelines.punkdiff_pipeline import SINGLE

    names = next((g.names for g in condition.groups if g.kind == SINGLE), ())
    return int(text) if text not in names and text.isdigit() else text


def _image_path(text: str, what: str) -> Path:
    """An output image path whose format PIL knows from its extension, checked before any work is done."""
    import PIL.Image

    path = Path(text)
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder; give a file name such as {path / 'grid.png'}")
    if path.suffix.lower() not in PIL.Image.registered_extensions():
        raise UsageError(f"{what} {path} has no image extension PIL can write; use .png, .jpg, .webp ...")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UsageError(f"{what} {path} cannot be written: {blocking} is a file, not a folder")
    return path


def _load_model(args: argparse.Namespace):
    """The validated pipeline on the requested device and dtype, and the steps checked against its schedule."""
    import torch

    from punkdiff.hub import load_pipeline

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UsageError(f"--device {args.device!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} asked for, but this machine has no usable CUDA GPU; use cpu")
    try:
        torch.empty(0, device=device)  # e.g. mps on a machine or a torch build without it
    except (RuntimeError, AssertionError):
        raise UsageError(f"--device {args.device} is not available on this machine or torch build; use cpu") from None
    pipe = load_pipeline(args.model, dtype=getattr(torch, args.dtype)).to(device)
    num_train_timesteps = pipe.scheduler.config.num_train_timesteps
    if getattr(args, "steps", None) is not None and args.steps > num_train_timesteps:
        raise UsageError(f"--steps {args.steps} is more than the model's {num_train_timesteps} training timesteps")
    return pipe


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="sample images from a model into a grid (and single PNGs, a GIF)")
    _add_model_arguments(p)
    _add_sampler_arguments(p, "default: the recommendation's with its sampler; else every training step for ddpm, "
                           "50 otherwise")
    p.add_argument("--num-images", type=_positive_int, default=16)
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="images per forward pass (bounds memory; default: punkdiff.sampling.SAMPLE_BATCH_SIZE, 64)")
    p.add_argument("--out", default="grid.png", help="grid image path")
    p.add_argument("--out-dir", default=None, help="also write each image here as NNNN.png")
    p.add_argument("--out-array", default=None, metavar="PATH.npy",
                   help="also write all images as one uint8 [N, C, H, W] .npy (what `punkdiff eval --samples` scores)")
    p.add_argument("--gif", default=None, help="also write the denoising animation (x_t | predicted x_0) here")
    speed = p.add_argument_group("speed")
    speed.add_argument("--precision", choices=SAMPLING_PRECISIONS, default="auto",
                       help="auto: bf16 autocast on a CPU with native bf16 (AVX-512 BF16 or AMX), float32 elsewhere; "
                            "the command prints which it used")
    speed.add_argument("--channels-last", action="store_true", help="store the UNet channels-last (NHWC)")
    speed.add_argument("--compile", action="store_true",
                       help="torch.compile the UNet: a slow first batch, then faster ones (for thousands of images)")
    _add_condition_arguments(p)
    p.set_defaults(func=_run_sample)


def _run_sample(args: argparse.Namespace) -> int:
    from punkdiff.sampling import (
        SAMPLE_BATCH_SIZE,
        generate,
        prepare_for_sampling,
        sampling_precision,
        to_uint8,
        write_array,
        write_pngs,
    )
    from punkdiff.visuals import denoising_gif

    out = _image_path(args.out, "--out")
    gif = _image_path(args.gif, "--gif") if args.gif else None
    if args.out_dir and Path(args.out_dir).is_file():
        raise UsageError(f"--out-dir {args.out_dir} is a file; give a folder (created if missing)")
    if args.out_array and (Path(args.out_array).suffix != ".npy" or Path(args.out_array).is_dir()):
        raise UsageError(f"--out-array {args.out_array}: give a file name ending in .npy, e.g. samples.npy")
    pipe = _load_model(args)
    condition = _condition(args, pipe, args.num_images)
    if gif and condition:
        raise UsageError("--gif animates the model without a condition; leave it out, or the condition flags")
    prepare_for_sampling(pipe, channels_last=args.channels_last, compile=args.compile)
    computed_in, why = sampling_precision(pipe, args.precision)
    print(f"precision: {computed_in} ({why})")
    arrays = generate(pipe, args.num_images, seed=args.seed, batch_size=args.batch_size or SAMPLE_BATCH_SIZE,
                      sampler=args.scheduler, num_inference_steps=args.steps, eta=args.eta, output_type="np",
                      precision=args.precision, **condition)
    images = pipe.numpy_to_pil(arrays)
    rows = max(r for r in range(1, math.isqrt(args.num_images) + 1) if args.num_images % r == 0)
    if args.label:  # one row per label
        rows = len(args.label)
    _save_grid(images, out, cols=args.num_images // rows)
    print(f"grid: {out.resolve()}")
    if args.out_dir:
        print(f"{len(images)} images: {write_pngs(images, args.out_dir).resolve()}")
    if args.out_array:
        print(f"{len(images)} images as uint8 [N, C, H, W]: {write_array(to_uint8(arrays), args.out_array).resolve()}")
    if gif:
        count = min(args.num_images, 16)
        denoising_gif(pipe, gif, num_images=count, seed=args.seed, num_inference_steps=args.steps, eta=args.eta,
                      sampler=args.scheduler)
        print(f"denoising GIF of the first {count}: {gif.resolve()}")
    return 0


def _add_image_input(p: argparse.ArgumentParser, out: str, out_help: str) -> None:
    """Options of the commands that read image files and write a grid."""
    p.add_argument("--out", default=out, help=out_help)
    p.add_argument("--background", default="#ffffff",
                   help="colour transparent pixels are composited onto (CryptoPunks: '#638596')")
    p.add_argument("--resize-filter", choices=["nearest", "bilinear", "bicubic", "lanczos", "box"], default="bicubic",
                   help="how an image of another size is resized to the model's (nearest for pixel art)")


def _save_grid(images: list, out: Path, cols: int | None = None) -> None:
    from punkdiff.visuals import image_grid

    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, cols=cols).save(out)


def _read_images(paths: Sequence[str], pipe, args: argparse.Namespace):
    """Image files -> a float batch in [0, 1] at the model's size and channels, prepared as for training."""
    import numpy as np
    import PIL.Image
    import torch

    from punkdiff.data import ImageTransform

    config = pipe.unet.config
    transform = ImageTransform(config.sample_size, config.in_channels, args.background, args.resize_filter)
    arrays = []
    for path in paths:
        try:
            with PIL.Image.open(path) as image:
                arrays.append(transform(image))
        except (OSError, ValueError) as err:
            raise UsageError(f"{path} is not a readable image ({err})") from None
    return torch.from_numpy(np.stack(arrays)).float().div(255)


def _add_reconstruct(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reconstruct", help="noise images to step t with the forward process, then denoise them back")
    _add_model_arguments(p)
    p.add_argument("images", nargs="+", help="image files (resized to the model's size)")
    p.add_argument("--t-start", type=int, required=True, help="training timestep to noise to, in [0, T)")
    _add_sampler_arguments(p, "default: every training step from t_start for ddpm, 50 otherwise", "ddim", 0.0)
    _add_image_input(p, "reconstruction.png", "rows of original | reconstruction")
    _add_condition_arguments(p)
    p.set_defaults(func=_run_reconstruct)


def _run_reconstruct(args: argparse.Namespace) -> int:
    from punkdiff.seeds import image_generators

    out = _image_path(args.out, "--out")
    pipe = _load_model(args)
    num_train_timesteps = pipe.scheduler.config.num_train_timesteps
    if not 0 <= args.t_start < num_train_timesteps:
        raise UsageError(f"--t-start must be in [0, {num_train_timesteps}), got {args.t_start}")
    condition = _condition(args, pipe, len(args.images))
    originals = _read_images(args.images, pipe, args)
    generators = image_generators(args.seed, len(originals))
    result = pipe.reconstruct(originals, args.t_start, generator=generators, num_inference_steps=args.steps,
                              eta=args.eta, sampler=args.scheduler, **condition).images
    originals = pipe.image_processor.postprocess(originals * 2 - 1, "pil")
    _save_grid([im for pair in zip(originals, result, strict=True) for im in pair], out, cols=2)
    print(f"original | reconstructed from t={args.t_start}: {out.resolve()}")
    return 0


def _add_inpaint(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inpaint", help="fill the white part of a mask with the model (RePaint)")
    _add_model_arguments(p)
    p.add_argument("image", help="image file (resized to the model's size)")
    p.add_argument("--mask", required=True, help="mask image: white = generate, black = keep")
    p.add_argument("--steps", type=_positive_int, default=250, help="denoising steps before the resampling jumps")
    p.add_argument("--jump-length", type=_positive_int, default=10, help="RePaint's j")
    p.add_argument("--jump-n-sample", type=_positive_int, default=10, help="RePaint's r")
    p.add_argument("--num-images", type=_positive_int, default=4, help="how many fillings, one seed each")
    _add_image_input(p, "inpainted.png", "grid: the masked input, then each filling")
    _add_condition_arguments(p)
    p.set_defaults(func=_run_inpaint)


def _run_inpaint(args: argparse.Namespace) -> int:
    import numpy as np
    import PIL.Image
    import torch

    from punkdiff.seeds import image_generators

    out = _image_path(args.out, "--out")
    pipe = _load_model(args)
    condition = _condition(args, pipe, args.num_images)
    image = _read_images([args.image], pipe, args)
    size = pipe.unet.config.sample_size
    try:
        with PIL.Image.open(args.mask) as mask_file:
            mask = mask_file.convert("L").resize((size, size), PIL.Image.Resampling.NEAREST)
    except (OSError, ValueError) as err:
        raise UsageError(f"--mask {args.mask} is not a readable image ({err})") from None
    batch = image.repeat(args.num_images, 1, 1, 1)
    generators = image_generators(args.seed, args.num_images)
    filled = pipe.inpaint(batch, mask, num_inference_steps=args.steps, jump_length=args.jump_length,
                          jump_n_sample=args.jump_n_sample, generator=generators, **condition).images
    keep = torch.from_numpy(np.asarray(mask) < 128)[None, None].float()
    masked = pipe.image_processor.postprocess((image * keep + 0.5 * (1 - keep)) * 2 - 1, "pil")
    _save_grid(masked + filled, out)
    print(f"masked input, then {args.num_images} fillings: {out.resolve()}")
    return 0


# ---- eval, gif: what a model is worth, and what it looks like --------------------------------------------------


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score a model's samples (or existing images) with offline metrics, each beside "
                       "its real-vs-real floor; writes metrics.json, report.md and figures")
    p.add_argument("model", nargs="?", help="exported model folder or Hub id (omit with --samples and --preset)")
    p.add_argument("--reference", required=True, help="dataset the model learned: Hub id or local folder")
    p.add_argument("--split", default="train", help="the split the model was trained on")
    p.add_argument("--heldout-split", default=None,
                   help="real images the model never saw (default: test/validation if present, else half of --split)")
    p.add_argument("--samples", default=None, help="score these images instead of sampling: a folder or a uint8 .npy")
    p.add_argument("--preset", default=None, help="preprocessing of the training data (default: the run's "
                   "training_summary.json beside the model, else white background and bicubic resize)")
    p.add_argument("--num-samples", type=_positive_int, default=1000)
    p.add_argument("--batch-size", type=_positive_int, default=250, help="images per forward pass")
    p.add_argument("--reconstruction-images", type=int, default=64,
                   help="test images for the reconstruction study (0 skips it)")
    p.add_argument("--cache-dir", default=None, help="decoded images and classifiers (default ~/.cache/punkdiff)")
    p.add_argument("--out", default="eval", help="output folder")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--seed", type=_seed, default=0, help="sample i uses seed+i; the metrics' draws use the seed too")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="the FID Inception as .safetensors, for FID, KID and IS (default: $PUNKDIFF_INCEPTION_WEIGHTS; "
                   "without it they are reported as not computed; see docs/evaluation.md to convert the official .pth)")
    p.add_argument("--dinov2", default=None, metavar="PATH", help="a local transformers DINOv2 folder, for "
                   "FD-DINOv2 (default: $PUNKDIFF_DINOV2; without it, not computed)")
    p.add_argument("--update-card", action="store_true", help="also write the metrics into the model's card "
                   "(README.md YAML model-index and Metrics table; a local model folder only)")
    _add_sampler_arguments(p, "default: the recommendation's with its sampler, else 50")
    group = p.add_argument_group("conditional models (requests drawn as the data, scored by its classifier)")
    group.add_argument("--guidance", type=_guidance, default=None, metavar="W",
                       help="classifier-free guidance (default 1: the conditional model alone)")
    group.add_argument("--per-class", type=_count, default=None, metavar="N",
                       help="also N images of each class, asked for equally, for per-class accuracy of rare classes "
                            "(default 100; 0 skips them)")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from punkdiff.data import DataError
    from punkdiff.metrics.feature_networks import WeightsError
    from punkdiff.metrics.model_evaluation import EvalOptions, EvaluationError, evaluate_model
    from punkdiff.metrics.report import format_conditional, format_metrics
    from punkdiff.presets import PresetError

    options = EvalOptions(
        reference=args.reference, out=args.out, model=args.model, samples=args.samples, preset=args.preset,
        split=args.split, heldout_split=args.heldout_split, num_samples=args.num_samples, batch_size=args.batch_size,
        scheduler=args.scheduler, steps=args.steps, eta=args.eta, seed=args.seed, guidance_scale=args.guidance,
        per_class=args.per_class, reconstruction_images=args.reconstruction_images,
        inception_weights=args.inception_weights, dinov2=args.dinov2, update_card=args.update_card,
        cache_dir=args.cache_dir,
    )
    try:
        result = evaluate_model(options, _load_model(args) if args.model else None)
    except (DataError, PresetError, EvaluationError, WeightsError) as err:
        raise UsageError(str(err)) from None
    print(format_metrics(result.evaluation))
    if result.conditional is not None:
        print(format_conditional(result.conditional))
    print(f"report: {result.report.resolve()}")
    if result.card is not None:
        print(f"model card updated: {result.card.resolve()}")
    return 0


def _add_gif(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gif", help="noise.gif (forward process on real images), sampling.gif (x_t beside the "
                       "predicted x_0 at each step) and the final grid.png, for any exported model")
    _add_model_arguments(p)
    p.add_argument("--dataset", default=None, help="real images for noise.gif (default: the training run's dataset, "
                   "read from training_summary.json beside the model)")
    p.add_argument("--split", default="train")
    p.add_argument("--preset", default=None, help="preprocessing of the real images (default: the run's, as eval)")
    p.add_argument("--num-images", type=_positive_int, default=16)
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="sampling steps of sampling.gif and grid.png (default: the model's recommendation)")
    p.add_argument("--out", default="gifs", help="output folder")
    p.set_defaults(func=_run_gif)


def _run_gif(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from punkdiff.data import DataError, load_training_images, to_model_input
    from punkdiff.metrics.real_images import model_transform, training_dataset
    from punkdiff.presets import DataSpec
    from punkdiff.sampling import generate, recommended_sampling
    from punkdiff.visuals import denoising_gif, display_scale, image_grid, noising_gif

    out = Path(args.out)
    if out.is_file():
        raise UsageError(f"--out {out} is a file; give a folder (created if missing)")
    pipe = _load_model(args)
    out.mkdir(parents=True, exist_ok=True)
    steps = args.steps or recommended_sampling(pipe).num_inference_steps
    sampling = denoising_gif(pipe, out / "sampling.gif", num_images=args.num_images, seed=args.seed,
                             num_inference_steps=steps, max_frames=steps)
    print(f"sampling GIF (x_t | predicted x_0): {sampling.resolve()}")
    images = generate(pipe, args.num_images, seed=args.seed, num_inference_steps=steps,
                      progress=False)  # the GIF's last frame: the same seeds
    grid = out / "grid.png"
    image_grid(images, scale=display_scale(pipe.unet.config.sample_size, 64), gap=1).save(grid)
    print(f"final grid: {grid.resolve()}")
    dataset = args.dataset or training_dataset(args.model)
    if dataset is None:
        print("noise.gif skipped: no --dataset, and no training_summary.json beside the model names one")
        return 0
    config = pipe.unet.config
    transform, _ = model_transform(config.sample_size, config.in_channels, preset=args.preset, model_dir=args.model)
    spec = DataSpec(dataset=dataset, split=args.split, max_samples=args.num_images, **asdict(transform))
    try:
        real = load_training_images(dataset, spec, progress=False).images
    except DataError as err:
        raise UsageError(str(err)) from None
    noise = noising_gif(to_model_input(real), pipe.scheduler, out / "noise.gif", seed=args.seed)
    print(f"noise GIF (forward process on {len(real)} real images): {noise.resolve()}")
    return 0


# ---- push, parity ------------------------------------------------------------------------------------------------


def _add_push(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "push",
        help="upload an exported model folder to the Hugging Face Hub "
        "(token from `hf auth login` or HF_TOKEN; punkdiff never stores it)",
    )
    p.add_argument("model_dir", help="folder written by the export")
    p.add_argument("--repo-id", required=True, help="e.g. your-name/punkdiff-mnist")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.set_defaults(func=_run_push)


def _run_push(args: argparse.Namespace) -> int:
    from punkdiff.hub import push_to_hub

    url = push_to_hub(args.model_dir, args.repo_id, private=args.private)
    print(f"pushed {args.model_dir} to {url}")
    return 0


def _add_parity(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "parity",
        help="check this install's diffusers sampling against punkdiff's from-scratch reference "
        "(a small random UNet, well under a minute on CPU); exits 1 on a mismatch",
    )
    p.set_defaults(func=_run_parity)


def _run_parity(args: argparse.Namespace) -> int:
    from punkdiff.parity import format_table, run_parity

    rows = run_parity()
    print(format_table(rows))
    failed = [r for r in rows if not r.passed]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} within tolerance")
    return 1 if failed else 0


# ---- web app ---------------------------------------------------------------------------------------------------


def _add_ui(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ui",
        help="the web app (Gradio): generate, inpaint, train and evaluate in the browser "
        "(needs `pip install 'punkdiff[app]'`)",
    )
    p.add_argument("--model-root", action="append", default=[], metavar="FOLDER",
                   help="folder searched for exported models (repeatable; the run root is always searched)")
    p.add_argument("--data-root", action="append", default=[], metavar="FOLDER",
                   help="folder holding datasets (repeatable); nothing outside the roots is read")
    p.add_argument("--run-root", default="punkdiff-runs", metavar="FOLDER",
                   help="where runs, generated images and evaluations are written (default: ./punkdiff-runs)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=None, help="default: the first free port from 7860")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    p.add_argument("--max-runs", type=_positive_int, default=1, help="trainings allowed at once (default 1)")
    p.set_defaults(func=_run_ui)


def _run_ui(args: argparse.Namespace) -> int:
    from punkdiff.roots import Roots

    try:
        roots = Roots(args.model_root, args.data_root, args.run_root)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    try:
        from punkdiff.app import build_app, launch
    except ImportError as err:
        raise UsageError(f"the web app needs Gradio ({err}): pip install 'punkdiff[app]'") from None
    launch(build_app(roots, max_runs=args.max_runs), host=args.host, port=args.port, share=args.share)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="punkdiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_presets, _add_train, _add_distill, _add_demo, _add_sample, _add_reconstruct, _add_inpaint,
                _add_eval, _add_gif, _add_push, _add_parity, _add_ui):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parsed: list[argparse.Namespace] = []

    def run() -> int:
        parsed.append(build_parser().parse_args(argv))
        return _dispatch(parsed[0])

    return exit_on_interrupt(run, lambda: f"punkdiff {parsed[0].command}" if parsed else "punkdiff",
                             lambda: _kept(parsed[0]) if parsed else "nothing was written")


def _dispatch(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except Exception as err:
        if not _is_user_error(err):
            raise
        print(f"punkdiff {args.command}: {err}", file=sys.stderr)
        return 2


def _kept(args: argparse.Namespace) -> str:
    """What an interrupted command leaves: a run's last checkpoint, or the files this command wrote."""
    if args.command in ("train", "distill"):
        from punkdiff.training.checkpoints import resume_hint

        return resume_hint(args.output_dir)
    outputs = [getattr(args, name, None) for name in ("out", "out_dir", "gif", "output_dir")]
    return written_since(outputs, process_start_time())


def _is_user_error(err: Exception) -> bool:
    """Input the user can fix: said in one line, without a traceback."""
    hub = sys.modules.get("punkdiff.hub")  # imported by every subcommand that can raise its ModelFolderError
    return isinstance(err, UsageError) or (hub is not None and isinstance(err, (hub.ModelFolderError, hub.PushError)))


if __name__ == "__main__":
    sys.exit(main())
