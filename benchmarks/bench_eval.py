"""Evaluation on the mirrors: every metric's real-vs-real floor at each preset's resolution, and evaluation speed.

    .venv/bin/python benchmarks/bench_eval.py                       # floors: mnist 16/28, punks 24, celeba 64
    .venv/bin/python benchmarks/bench_eval.py --model outputs/mnist16/pipeline --num-samples 5000   # + timing

For each mirror, `evaluate` scores uniform noise as the "model": its row is real vs noise, and the floor row is
held-out real vs training images at the same size and preprocessing. With `--model`, the script also samples
`--num-samples` images (DDIM, `--steps`) and times sampling and metrics separately. Writes
`benchmarks/results/eval.json` (with the machine and its load).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from benchlib import machine

from punkdiff.metrics.evaluation import evaluate
from punkdiff.metrics.real_images import load_reference, model_transform
from punkdiff.presets import get_preset

MIRRORS = [("mnist", "mnist-baseline-16"), ("mnist", "mnist-28"), ("cryptopunks", "punks-24"),
           ("celeba-faces", "celeba-64")]


def floors(root: Path, seed: int) -> dict[str, dict]:
    out = {}
    for mirror, preset in MIRRORS:
        data = get_preset(preset).data
        transform, _ = model_transform(data.resolution, data.channels, preset=preset)
        start = time.perf_counter()
        reference = load_reference(root / mirror, transform, seed=seed, progress=False)
        noise = np.random.default_rng(seed).integers(0, 256, reference.heldout.shape, dtype=np.uint8)
        result = evaluate(noise, reference, seed=seed, progress=False)
        out[preset] = {"reference": reference.description, "num_images": result.num_images,
                       "feature_space": result.feature_space, "classifier": result.classifier_scores,
                       "metrics": result.metrics, "seconds": round(time.perf_counter() - start, 1)}
        print(f"\n{preset} ({result.num_images} images per set, {result.feature_space}; "
              f"classifier {result.classifier_scores}; {out[preset]['seconds']} s)")
        print(f"{'metric':<28}{'real vs real':>14}{'real vs noise':>15}")
        for name, m in result.metrics.items():
            fmt = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
            print(f"{name:<28}{fmt(m['floor']):>14}{fmt(m['model']):>15}")
    return out


def timing(model: str, reference_root: Path, num_samples: int, steps: int, seed: int) -> dict:
    from punkdiff.hub import load_pipeline
    from punkdiff.sampling import generate

    pipe = load_pipeline(model)
    config = pipe.unet.config
    transform, origin = model_transform(config.sample_size, config.in_channels, model_dir=model)
    reference = load_reference(reference_root / "mnist", transform, seed=seed, progress=False)
    start = time.perf_counter()
    images = generate(pipe, num_samples, seed=seed, batch_size=250, sampler="ddim", num_inference_steps=steps,
                      output_type="np")
    sampling_s = time.perf_counter() - start
    samples = (images * 255).round().astype(np.uint8).transpose(0, 3, 1, 2)
    result = evaluate(samples, reference, seed=seed)
    row = {"model": model, "num_samples": num_samples, "steps": steps, "sampling_s": round(sampling_s, 1),
           "metrics_s": round(result.seconds, 1), "metrics": result.metrics, "preprocessing": origin}
    print(f"\n{num_samples} samples, DDIM-{steps}: sampling {sampling_s:.0f} s, metrics {result.seconds:.0f} s")
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets-root", default=os.environ.get("PUNKDIFF_SHARED_DATASETS", "../shared/datasets"))
    p.add_argument("--model", default=None, help="also time sampling + evaluation of this MNIST model")
    p.add_argument("--num-samples", type=int, default=5000)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--skip-floors", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    root = Path(args.datasets_root)
    report = {"machine": machine(torch.device("cpu")), "loadavg_start": list(os.getloadavg())}
    print(f"bench_eval: {report['machine']['platform']}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, load {report['loadavg_start'][0]:.2f}")
    if not args.skip_floors:
        report["floors"] = floors(root, args.seed)
    if args.model:
        report["timing"] = timing(args.model, root, args.num_samples, args.steps, args.seed)
    report["loadavg_end"] = list(os.getloadavg())
    out = Path(__file__).parent / "results" / ("eval-timing.json" if args.skip_floors else "eval.json")
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nload {report['loadavg_start'][0]:.2f} -> {report['loadavg_end'][0]:.2f}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
