"""Is the demo's output recognisable digits? `punkdiff demo`'s model judged by a classifier of its own data.

    .venv/bin/python benchmarks/bench_demo.py                                 # runs `punkdiff demo`, then scores it
    .venv/bin/python benchmarks/bench_demo.py --model punkdiff-demo/pipeline  # scores an existing demo export

A digit classifier is trained (once, cached) on one seeded half of the same embedded scikit-learn digits the demo
learns from, at the demo's 16 px preprocessing (34 epochs: every evaluation classifier sees at least 30,000 images);
its accuracy on the other half is printed. Then `--num-samples` demo samples (DDIM-50, seeds 0..N-1) are classified:
the share classified with confidence at least 0.9 (target: 90 %), the class histogram (every digit present?) and,
as the floor, the same share for the held-out real digits.
Training time comes from the run's training_summary.json. Writes `benchmarks/results/demo.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from benchlib import machine

from punkdiff.hub import load_pipeline
from punkdiff.metrics.classifiers import load_or_train_classifier
from punkdiff.metrics.evaluation import CONFIDENT
from punkdiff.metrics.real_images import load_reference, model_transform
from punkdiff.presets import DDIM_ETA
from punkdiff.sampling import generate

DATASET = "sklearn-digits"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="an exported demo pipeline (default: run `punkdiff demo` into --output-dir)")
    p.add_argument("--output-dir", default="benchmarks/work/demo")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--out", default="benchmarks/results/demo.json")
    p.add_argument("--sampler", choices=["ddim", "ddpm", "dpm++"], default="ddim", help="how the samples are drawn")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--eta", type=float, default=DDIM_ETA, help="DDIM noise weight (0 deterministic, 1 DDPM-like)")
    args = p.parse_args()

    if args.model is None:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "punkdiff.cli", "demo", "--output-dir", args.output_dir], check=True)
        print(f"demo: {time.perf_counter() - start:.0f} s end to end")
        args.model = str(Path(args.output_dir) / "pipeline")
    summary = json.loads((Path(args.model).parent / "training_summary.json").read_text())

    # 1. a classifier of the demo's own data, at the demo's preprocessing
    transform, _ = model_transform(16, 1, model_dir=args.model)
    reference = load_reference(DATASET, transform, progress=False)
    classifier = load_or_train_classifier(reference, progress=False)

    # 2. the demo's samples, classified
    start = time.perf_counter()
    samples = generate(load_pipeline(args.model), args.num_samples, seed=0, batch_size=250, sampler=args.sampler,
                       num_inference_steps=args.steps, eta=args.eta, output_type="np")
    sampling_s = time.perf_counter() - start
    images = np.round(samples.transpose(0, 3, 1, 2) * 255).astype(np.uint8)

    def judged(batch: np.ndarray) -> tuple[float, list[int]]:
        probs = classifier.predict(batch)["class_probs"]
        counts = np.bincount(probs.argmax(axis=1), minlength=probs.shape[1])
        return float(np.mean(probs.max(axis=1) >= CONFIDENT)), counts.tolist()

    confident, histogram = judged(images)
    floor, real_histogram = judged(reference.heldout)
    result = {
        "model": args.model, "training_steps": summary["steps"], "batch_size": summary["config"]["train"]["batch_size"],
        "training_wall_s": summary["wall_time_s"], "num_samples": args.num_samples,
        "classifier_held_out_accuracy": classifier.scores["accuracy"],
        "confident_share": confident, "confident_share_held_out_real": floor, "class_histogram": histogram,
        "real_class_histogram": real_histogram, "every_class_present": min(histogram) > 0,
        "sampler": f"{args.sampler}-{args.steps}, eta {args.eta:g}", "sampling_s": round(sampling_s, 1),
        "machine": machine(torch.device("cpu")), "load": os.getloadavg(),
    }
    print(f"\ndemo model: {summary['steps']} steps of {result['batch_size']}, trained in "
          f"{summary['wall_time_s'] / 60:.1f} min (wall); classifier held-out accuracy "
          f"{classifier.scores['accuracy']:.4f}")
    print(f"{'':<34}{'demo samples':>14}{'held-out real':>15}")
    print(f"{f'confident (p >= {CONFIDENT}) share':<34}{confident:>14.3f}{floor:>15.3f}   (target >= 0.9)")
    print(f"{'class histogram':<34}{str(histogram):>14}")
    print(f"{'every class present':<34}{str(result['every_class_present']):>14}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
