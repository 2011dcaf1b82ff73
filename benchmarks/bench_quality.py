"""Time to quality: punkdiff's MNIST preset against the Diffusers example recipe, side by side on the CPU.

Both train the same `UNet2DModel` (the `mnist-16` preset's) on the MNIST mirror at 16 px through
`training/train.py`, at the same time, one CPU core each (torch threads 1), for the same wall-clock budget; at the
budget each is stopped with SIGTERM (a checkpoint is written, nothing is lost). Wall time is measured from each
launch to each checkpoint's `training_state.json` (start-up and data loading included). Afterwards, for fixed
wall-time points, the last checkpoint written by then is sampled from its EMA weights, each contender with its own
sampler (punkdiff: the preset's DDIM; the recipe: its DDPM with 1000 steps), and scored with
`punkdiff.metrics.evaluate`: the digit-classifier Fréchet distance and mode coverage, each beside its real-vs-real
floor at the same image count.

The recipe is `examples/unconditional_image_generation/train_unconditional.py`'s defaults: lr 1e-4, cosine schedule
with 500 warmup steps over its 100 epochs, AdamW betas 0.95/0.999, weight decay 1e-6, batch 16, EMA
(`--use_ema`, inverse gamma 1, power 3/4, max decay 0.9999), epsilon target, linear betas over T = 1000, DDPM-1000
sampling; run through punkdiff's loop, whose per-step cost equals the example's (benchmarks/bench_train.py).

    python benchmarks/bench_quality.py                                   # the issue's budget: 15 min each
    python benchmarks/bench_quality.py --budget-minutes 4 --num-samples 500 --recipe-sampler ddim:50  # a look

Prints a table; writes `benchmarks/results/quality_mnist16.json` and `quality_mnist16.png` (metric against wall
time, both contenders, the floor and 3x the floor).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from benchlib import DEFAULT_DATASETS, REPO, RESULTS, machine
from diffusers import DDPMScheduler, UNet2DModel

from punkdiff import PunkDiffPipeline
from punkdiff.metrics.evaluation import evaluate
from punkdiff.metrics.reference import load_reference, model_transform
from punkdiff.presets import get_preset
from punkdiff.sampling import generate
from punkdiff.training.checkpoints import EMA_FOLDER, STATE_FILE, list_checkpoints

PRESET = "mnist-16"
# the Diffusers example's defaults, as punkdiff flags (the UNet and noise schedule are the preset's)
RECIPE_FLAGS = [
    "--batch-size", "16", "--learning-rate", "1e-4", "--lr-warmup-steps", "500", "--epochs", "100",
    "--set", "train.max_steps=null", "--set", "train.lr_scheduler=cosine", "--set", "train.adam_beta1=0.95",
    "--set", "train.adam_beta2=0.999", "--set", "train.adam_weight_decay=1e-6", "--set", "train.adam_epsilon=1e-8",
    "--set", "train.snr_gamma=null", "--set", "train.ema_decay=0.9999", "--set", "train.ema_inv_gamma=1.0",
    "--set", "train.ema_power=0.75", "--set", "scheduler.prediction_type=epsilon",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default=str(DEFAULT_DATASETS / "mnist"))
    p.add_argument("--budget-minutes", type=float, default=15.0, help="training wall time per contender")
    p.add_argument("--points", type=int, default=5, help="evaluation points, evenly spaced over the budget")
    p.add_argument("--num-samples", type=int, default=2000, help="samples per evaluation point")
    p.add_argument("--recipe-sampler", default="ddpm:1000", help="SAMPLER:STEPS for the recipe (its own: ddpm:1000)")
    p.add_argument("--images-per-checkpoint", type=int, default=12800, help="checkpoint spacing, in images seen")
    p.add_argument("--work-dir", default=str(REPO / "benchmarks" / "work" / "quality"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--evaluate-only", action="store_true",
                   help="score the runs already in --work-dir (their launch times are in launched.json)")
    return p.parse_args()


def launch(name: str, flags: list[str], batch_size: int, args: argparse.Namespace) -> tuple[subprocess.Popen, float]:
    """Start one training process on one core; its launch time."""
    out = Path(args.work_dir) / name
    every = max(args.images_per_checkpoint // batch_size, 1)
    command = [
        sys.executable, str(REPO / "training" / "train.py"), "--preset", PRESET, "--dataset", args.dataset,
        "--output-dir", str(out), "--overwrite-output-dir", "--report-to", "none", "--seed", str(args.seed),
        "--checkpoint-every", str(every), "--set", "train.checkpoints_total_limit=null",
        "--sample-every", "100000000", *flags,  # no preview grids: the evaluation samples
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1"}
    log = open(Path(args.work_dir) / f"{name}.log", "w")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), time.time()


def checkpoint_times(name: str, started: float, args: argparse.Namespace) -> list[tuple[float, Path]]:
    """(seconds from launch, checkpoint folder) for every checkpoint the run wrote."""
    folders = list_checkpoints(Path(args.work_dir) / name)
    return sorted(((folder / STATE_FILE).stat().st_mtime - started, folder) for folder in folders)


def score(folder: Path, sampler: str, steps: int, reference, args: argparse.Namespace) -> dict[str, float]:
    """The checkpoint's EMA weights, sampled and evaluated against the floor."""
    unet = UNet2DModel.from_pretrained(folder / EMA_FOLDER, use_safetensors=True)
    pipe = PunkDiffPipeline(unet, DDPMScheduler(**get_preset(PRESET).scheduler.ddpm_config()))
    images = generate(pipe, args.num_samples, seed=args.seed, batch_size=250, sampler=sampler,
                      num_inference_steps=steps, output_type="np", progress=False)
    samples = (images * 255).round().astype(np.uint8).transpose(0, 3, 1, 2)
    metrics = evaluate(samples, reference, seed=args.seed, progress=False).metrics
    keys = ("fd_classifier", "class_entropy", "confident_share")
    return {f"{k}_{side}": float(metrics[k][side]) for k in keys for side in ("model", "floor")}


def plot(results: dict, budget_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, style in (("punkdiff", "o-"), ("recipe", "s--")):
        points = results[name]["points"]
        ax.plot([p["seconds"] / 60 for p in points], [p["fd_classifier_model"] for p in points], style,
                label=f"{name} ({results[name]['sampler']})")
    floor = np.mean([p["fd_classifier_floor"] for n in ("punkdiff", "recipe") for p in results[n]["points"]])
    ax.axhline(floor, color="gray", lw=1, label=f"real vs real floor ({floor:.2f})")
    ax.axhline(3 * floor, color="gray", lw=1, ls=":", label="3x floor")
    ax.set(xlabel="training wall time, minutes (1 CPU core each, side by side)", yscale="log", xlim=(0, budget_s / 60),
           ylabel="digit-classifier Fréchet distance", title="MNIST 16 px: time to quality")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    args = parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    budget_s = args.budget_minutes * 60
    recipe_sampler, recipe_steps = args.recipe_sampler.split(":")
    preset = get_preset(PRESET)
    contenders = {
        "punkdiff": ([], preset.train.batch_size, "ddim", preset.train.sample_inference_steps),
        "recipe": (RECIPE_FLAGS, 16, recipe_sampler, int(recipe_steps)),
    }

    # 1. train both at once, one core each, for the same wall time
    launched = Path(args.work_dir) / "launched.json"
    if not args.evaluate_only:
        runs = {name: launch(name, flags, batch, args) for name, (flags, batch, _, _) in contenders.items()}
        launched.write_text(json.dumps({name: started for name, (_, started) in runs.items()}))
        print(f"training {', '.join(runs)} side by side for {args.budget_minutes:g} min each (logs: {args.work_dir})")
        while any(proc.poll() is None for proc, _ in runs.values()):
            for proc, started in runs.values():
                if proc.poll() is None and time.time() - started > budget_s:
                    proc.send_signal(signal.SIGTERM)  # checkpoint after the current step, then exit
            time.sleep(2)
    started_at = json.loads(launched.read_text())

    # 2. evaluate the last checkpoint written by each wall-time point
    reference = load_reference(args.dataset, model_transform(16, 1, preset=PRESET)[0], seed=args.seed,
                               progress=False)
    results = {"machine": machine(torch.device("cpu")), "budget_minutes": args.budget_minutes,
               "num_samples": args.num_samples, "preset": preset.to_dict(), "recipe_flags": RECIPE_FLAGS}
    for name, (_, _, sampler, steps) in contenders.items():
        times = [(t, f) for t, f in checkpoint_times(name, started_at[name], args) if t <= budget_s + 60]
        points, scored = [], {}
        for k in range(1, args.points + 1):
            written = [(t, f) for t, f in times if t <= budget_s * k / args.points]
            if not written:
                continue
            seconds, folder = written[-1]
            if folder not in scored:
                scored[folder] = score(folder, sampler, steps, reference, args)
                step = json.loads((folder / STATE_FILE).read_text())["global_step"]
                points.append({"seconds": round(seconds, 1), "step": step, **scored[folder]})
                print(f"{name:9s} {seconds / 60:6.1f} min  step {step:6d}  FD {points[-1]['fd_classifier_model']:8.3f}"
                      f" (floor {points[-1]['fd_classifier_floor']:.3f})  entropy "
                      f"{points[-1]['class_entropy_model']:.3f}")
        reached = [p["seconds"] for p in points if p["fd_classifier_model"] <= 3 * p["fd_classifier_floor"]]
        results[name] = {"sampler": f"{sampler}-{steps}", "points": points,
                         "seconds_to_3x_floor": reached[0] if reached else None}

    # 3. the verdict, the table, the files
    ours, theirs = results["punkdiff"]["seconds_to_3x_floor"], results["recipe"]["seconds_to_3x_floor"]
    results["verdict"] = (
        "neither reached 3x the floor in the budget" if ours is None and theirs is None
        else f"only punkdiff reached 3x the floor ({ours / 60:.1f} min); the recipe never did in the budget"
        if theirs is None else "only the recipe reached 3x the floor" if ours is None
        else f"punkdiff reached 3x the floor in {ours / theirs:.2f} of the recipe's wall time"
    )
    print(results["verdict"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quality_mnist16.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, budget_s, RESULTS / "quality_mnist16.png")
    print(f"wrote {RESULTS / 'quality_mnist16.json'} and {RESULTS / 'quality_mnist16.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
