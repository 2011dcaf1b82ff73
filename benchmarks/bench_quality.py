"""Time to quality: punkdiff's MNIST preset against the Diffusers example recipe, side by side on the CPU.

Both train the same `UNet2DModel` (the `mnist-16` preset's) on the MNIST mirror at 16 px through
`training/train.py`, at the same time, one CPU core each (torch threads 1), for the same wall-clock budget; at the
budget each is stopped with SIGTERM (a checkpoint is written, nothing is lost). Wall time is measured from each
launch to each checkpoint's `training_state.json` (start-up and data loading included). Afterwards, for fixed
wall-time points, the last checkpoint written by then is sampled from its EMA weights with the preset's DDIM-50 (the
same sampler for both, so the curves compare training alone), and the recipe's last points also with its own sampler
(DDPM with 1000 steps: 20 times the cost, so `--recipe-sampler-points` of them, the last ones); each sample set is
scored with `punkdiff.metrics.evaluate`: the digit-classifier Fréchet distance and mode coverage, each beside its
real-vs-real floor at the same image count. A contender's time to 3x the floor counts its best sampler at each point.

The recipe is `examples/unconditional_image_generation/train_unconditional.py`'s defaults: lr 1e-4, cosine schedule
with 500 warmup steps over its 100 epochs, AdamW betas 0.95/0.999, weight decay 1e-6, batch 16, EMA
(`--use_ema`, inverse gamma 1, power 3/4, max decay 0.9999), epsilon target, linear betas 1e-4..0.02 over T = 1000,
DDPM-1000 sampling; run through punkdiff's loop, whose per-step cost equals the example's (benchmarks/bench_train.py).

    python benchmarks/bench_quality.py                      # 15 CPU-minutes each (about an hour in all)
    python benchmarks/bench_quality.py --budget-minutes 4 --num-samples 500 --recipe-sampler-points 0  # a look

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
from punkdiff.metrics.real_images import load_reference, model_transform
from punkdiff.presets import SchedulerSpec, get_preset
from punkdiff.sampling import generate
from punkdiff.training.checkpoints import EMA_FOLDER, STATE_FILE, list_checkpoints

PRESET = "mnist-16"
# the Diffusers example's defaults, as punkdiff flags (the UNet is the preset's)
RECIPE_FLAGS = [
    "--batch-size", "16", "--learning-rate", "1e-4", "--lr-warmup-steps", "500", "--epochs", "100",
    "--set", "train.max_steps=null", "--set", "train.lr_scheduler=cosine", "--set", "train.adam_beta1=0.95",
    "--set", "train.adam_beta2=0.999", "--set", "train.adam_weight_decay=1e-6", "--set", "train.adam_epsilon=1e-8",
    "--set", "train.snr_gamma=null", "--set", "train.ema_decay=0.9999", "--set", "train.ema_inv_gamma=1.0",
    "--set", "train.ema_power=0.75", "--set", "scheduler.prediction_type=epsilon",
    "--set", "scheduler.beta_schedule=linear", "--set", "scheduler.beta_start=1e-4", "--set", "scheduler.beta_end=0.02",
    "--set", "scheduler.rescale_betas_zero_snr=false",
]
GRID_SAMPLER = ("ddim", 50)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default=str(DEFAULT_DATASETS / "mnist"))
    p.add_argument("--budget-minutes", type=float, default=15.0, help="training wall time per contender")
    p.add_argument("--points", type=int, default=5, help="evaluation points, evenly spaced over the budget")
    p.add_argument("--num-samples", type=int, default=1000, help="samples per evaluation point")
    p.add_argument("--recipe-sampler", default="ddpm:1000", help="SAMPLER:STEPS, the recipe's own (ddpm:1000)")
    p.add_argument("--recipe-sampler-points", type=int, default=1,
                   help="how many of the recipe's last points are also scored with --recipe-sampler")
    p.add_argument("--images-per-checkpoint", type=int, default=12800, help="checkpoint spacing, in images seen")
    p.add_argument("--work-dir", default=str(REPO / "benchmarks" / "work" / "quality"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eta", type=float, default=0.0,
                   help="DDIM noise weight of the DDIM-50 points (0, as docs/results.md's table was measured)")
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
    """The checkpoint's EMA weights, sampled under the noise schedule it was trained with, against the floor."""
    config = json.loads((folder / STATE_FILE).read_text())["config"]
    unet = UNet2DModel.from_pretrained(folder / EMA_FOLDER, use_safetensors=True)
    pipe = PunkDiffPipeline(unet, DDPMScheduler(**SchedulerSpec(**config["scheduler"]).ddpm_config()))
    images = generate(pipe, args.num_samples, seed=args.seed, batch_size=250, sampler=sampler,
                      num_inference_steps=steps, eta=args.eta, output_type="np", progress=False)
    samples = (images * 255).round().astype(np.uint8).transpose(0, 3, 1, 2)
    metrics = evaluate(samples, reference, seed=args.seed, progress=False).metrics
    keys = ("fd_classifier", "class_entropy", "confident_share")
    return {f"{k}_{side}": float(metrics[k][side]) for k in keys for side in ("model", "floor")}


def plot(results: dict, budget_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    styles = {("punkdiff", "ddim-50"): "o-", ("recipe", "ddim-50"): "s--"}
    for name in ("punkdiff", "recipe"):
        points = results[name]["points"]
        for sampler in dict.fromkeys(p["sampler"] for p in points):
            mine = [p for p in points if p["sampler"] == sampler]
            ax.plot([p["seconds"] / 60 for p in mine], [p["fd_classifier_model"] for p in mine],
                    styles.get((name, sampler), "D"), ms=7, label=f"{name} ({sampler})")
    floor = np.mean([p["fd_classifier_floor"] for n in ("punkdiff", "recipe") for p in results[n]["points"]])
    ax.axhline(floor, color="gray", lw=1, label=f"real vs real floor ({floor:.2f})")
    ax.axhline(3 * floor, color="gray", lw=1, ls=":", label="3x floor")
    ax.set(xlabel="training wall time, minutes (1 CPU core each, side by side)", yscale="log",
           xlim=(0, budget_s / 60 * 1.04), ylabel="digit-classifier Fréchet distance",
           title="MNIST 16 px: time to quality")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    args = parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    budget_s = args.budget_minutes * 60
    own_sampler, own_steps = args.recipe_sampler.split(":")
    preset = get_preset(PRESET)
    # name: (extra training flags, batch size, extra samplers for the last points)
    contenders = {
        "punkdiff": ([], preset.train.batch_size, []),
        "recipe": (RECIPE_FLAGS, 16, [(own_sampler, int(own_steps))] if args.recipe_sampler_points else []),
    }

    # 1. train both at once, one core each, for the same wall time
    launched = Path(args.work_dir) / "launched.json"
    if not args.evaluate_only:
        runs = {name: launch(name, flags, batch, args) for name, (flags, batch, _) in contenders.items()}
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
    for name, (_, _, own) in contenders.items():
        times = checkpoint_times(name, started_at[name], args)
        chosen = {}  # folder -> seconds: the last checkpoint written by each point
        for k in range(1, args.points + 1):
            # the last point takes the checkpoint written on SIGTERM, a step after the budget ran out
            written = [(t, f) for t, f in times if t <= budget_s * k / args.points + (60 if k == args.points else 0)]
            if written:
                chosen.setdefault(written[-1][1], written[-1][0])
        folders = list(chosen)
        points = []
        for i, folder in enumerate(folders):
            samplers = [GRID_SAMPLER] + (own if i >= len(folders) - args.recipe_sampler_points else [])
            for sampler, steps in samplers:
                step = json.loads((folder / STATE_FILE).read_text())["global_step"]
                points.append({"seconds": round(chosen[folder], 1), "step": step, "sampler": f"{sampler}-{steps}",
                               **score(folder, sampler, steps, reference, args)})
                p = points[-1]
                print(f"{name:9s} {p['sampler']:10s} {p['seconds'] / 60:6.1f} min  step {step:6d}  FD "
                      f"{p['fd_classifier_model']:8.3f} (floor {p['fd_classifier_floor']:.3f})  entropy "
                      f"{p['class_entropy_model']:.3f}", flush=True)
        reached = [p for p in points if p["fd_classifier_model"] <= 3 * p["fd_classifier_floor"]]
        first = min(reached, key=lambda p: p["seconds"]) if reached else None
        results[name] = {"points": points, "seconds_to_3x_floor": first["seconds"] if first else None,
                         "sampler_at_3x_floor": first["sampler"] if first else None}

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
