"""The `punkdiff` command line: a thin face over the library (no training or sampling logic here)."""

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
        help="the main job: train mnist-baseline-16 on real digits for a few minutes on CPU, "
        "export the pipeline, a sample grid and GIFs",
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

    from punkdiff.pipelines import PunkDiffPipeline
    from punkdiff.scripts.train import run
    from punkdiff.training import build_train_parser
    from punkdiff.visuals import denoising_gif

    out = Path(args.output_dir)
    train_args = build_train_parser().parse_args([
        "--preset", "mnist-baseline-16", "--dataset", args.dataset, "--output-dir", str(out),
        "--max-steps", str(args.max_steps), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
        "--lr-warmup-steps", "100", "--checkpoint-every", str(max(args.max_steps // 3, 1)),
        "--checkpoints-total-limit", "1", "--sample-every", str(max(args.max_steps // 3, 1)),
        "--set", "train.ema_decay=0.999",
    ])
    code = run(train_args)
    if code:
        return code
    pipe = PunkDiffPipeline.from_pretrained(out / "pipeline")
    gif = denoising_gif(pipe, out / "denoising.gif", num_images=16, seed=args.seed)
    print("\npunkdiff demo finished:")
    for name, path in [
        ("exported pipeline (load with DDPMPipeline.from_pretrained)", out / "pipeline"),
        ("sample grid", out / "samples.png"),
        ("denoising GIF", gif),
        ("loss curve", out / "loss_curve.png"),
        ("training summary", out / "training_summary.json"),
    ]:
        print(f"  {name}: {path.resolve()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="punkdiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_presets(sub)
    _add_train(sub)
    _add_demo(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
