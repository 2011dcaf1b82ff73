"""punkdiff: train, sample, check and ship unconditional diffusion models (Diffusers + Accelerate)."""

# A thin face over the library: parse, call, print. No training or sampling logic lives here.

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _add_presets(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list the named presets (resolution, channels, parameters)")
    p.set_defaults(func=_run_presets)


def _run_presets(args: argparse.Namespace) -> int:
    from punkdiff.presets import format_presets_table

    print(format_presets_table())
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    from punkdiff.training import add_train_arguments

    p = sub.add_parser("train", help="train a preset (same flags as `accelerate launch training/train.py`)")
    add_train_arguments(p)
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from punkdiff.scripts.train import run

    return run(args)


DEMO_STEPS = 1500


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job: train mnist-baseline-16 on real digits for a few minutes on CPU, then export the "
        "pipeline, a sample grid, a denoising and a noising GIF (replaces an earlier demo in --output-dir)",
    )
    p.add_argument("--dataset", default="sklearn-digits",
                   help="default: the 1,797 real 8x8 digits scikit-learn ships (no download); "
                   "or the MNIST mirror / a Hub id")
    p.add_argument("--output-dir", default="punkdiff-demo")
    p.add_argument("--max-steps", type=int, default=DEMO_STEPS)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from punkdiff.data import load_training_images, to_model_input
    from punkdiff.pipelines import PunkDiffPipeline
    from punkdiff.presets import get_preset
    from punkdiff.scripts.train import run
    from punkdiff.training import build_train_parser
    from punkdiff.visuals import denoising_gif, noising_gif

    out = Path(args.output_dir)
    train_args = build_train_parser().parse_args([
        "--preset", "mnist-baseline-16", "--dataset", args.dataset, "--output-dir", str(out),
        "--max-steps", str(args.max_steps), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
        "--lr-warmup-steps", "100", "--checkpoint-every", str(max(args.max_steps // 3, 1)),
        "--checkpoints-total-limit", "1", "--sample-every", str(max(args.max_steps // 3, 1)),
        "--set", "train.ema_decay=0.999", "--overwrite-output-dir",
    ])
    code = run(train_args)
    if code:
        return code
    pipe = PunkDiffPipeline.from_pretrained(out / "pipeline")
    gif = denoising_gif(pipe, out / "denoising.gif", num_images=16, seed=args.seed)
    real = load_training_images(args.dataset, get_preset("mnist-baseline-16").data, progress=False).images[:16]
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="sample images from an exported model folder into a grid (and single PNGs)")
    p.add_argument("model_dir", help="folder written by the export (or by save_pretrained with safetensors)")
    p.add_argument("--scheduler", choices=["ddpm", "ddim", "dpm++"], default="ddim")
    p.add_argument(
        "--steps", type=_positive_int, default=None, help="default: every training step for ddpm, 50 otherwise"
    )
    p.add_argument("--num-images", type=_positive_int, default=16)
    p.add_argument("--seed", type=int, default=0, help="image i uses seed+i, so it does not depend on --num-images")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise weight: 0 deterministic, 1 DDPM-like")
    p.add_argument("--out", default="grid.png", help="grid image path")
    p.add_argument("--out-dir", default=None, help="also write each image here as NNNN.png")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.set_defaults(func=_run_sample)


def _run_sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch
    from diffusers.utils import make_image_grid

    from punkdiff.hub import ModelFolderError, load_pipeline

    try:
        pipe = load_pipeline(args.model_dir)
    except ModelFolderError as e:
        print(f"punkdiff sample: {e}", file=sys.stderr)
        return 2
    pipe.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # CPU generators: the same seed gives the same image on any device.
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(args.num_images)]
    images = pipe(
        batch_size=args.num_images,
        generator=generators,
        num_inference_steps=args.steps,
        eta=args.eta,
        sampler=args.scheduler,
    ).images
    rows = max(r for r in range(1, int(args.num_images**0.5) + 1) if args.num_images % r == 0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    make_image_grid(images, rows=rows, cols=args.num_images // rows).save(out)
    print(f"grid: {out.resolve()}")
    if args.out_dir:
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            image.save(out_dir / f"{i:04d}.png")
        print(f"{len(images)} images: {out_dir.resolve()}")
    return 0


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
    from punkdiff.hub import ModelFolderError, push_to_hub

    try:
        url = push_to_hub(args.model_dir, args.repo_id, private=args.private)
    except ModelFolderError as e:
        print(f"punkdiff push: {e}", file=sys.stderr)
        return 2
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="punkdiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_presets(sub)
    _add_train(sub)
    _add_demo(sub)
    _add_sample(sub)
    _add_push(sub)
    _add_parity(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
