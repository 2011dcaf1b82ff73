"""Quality against network evaluations: every sampler of `PunkDiffPipeline` at 1 to 50 NFE, teacher and student.

For a teacher folder (and, optionally, the student distilled from it), each sampler in `SAMPLERS` draws
`--num-samples` images at each NFE (`--nfe`, default 1 2 4 8 16 32 50; one UNet evaluation per step for all of
them) through `punkdiff.sampling.generate`, image i from seed + i, and the images are scored by the code
`punkdiff eval` uses (`punkdiff.metrics.evaluation.evaluate` against `load_reference` of `--reference`): the
classifier FD and the SWD, each beside its real-vs-real floor at the same sample count. DDIM's eta is the model's
recommendation with its recommended sampler, else 0. The student is sampled with its own sampler at every NFE,
its distilled count marked (other counts warn: its quality is only meant to hold there).

Writes the JSON (machine, versions, options, every point) and a PNG: log-x NFE against FD / floor, one line per
sampler, the student as its own marker. Wall time scales with samplers x NFE x samples: the headline run (5,000
samples a point, 7 samplers, 7 NFE) takes hours on 2 CPU cores; quality does not depend on the load, so it need not
wait for a quiet machine.

    .venv/bin/python benchmarks/bench_steps.py outputs/mnist16/pipeline --student outputs/mnist16-4step/pipeline \\
        --reference ../shared/datasets/mnist --num-samples 5000 --out benchmarks/results/steps-mnist16.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from benchlib import RESULTS, log, machine

from punkdiff.files import write_json
from punkdiff.hub import load_pipeline
from punkdiff.metrics.evaluation import evaluate
from punkdiff.metrics.real_images import load_reference, model_transform
from punkdiff.pipelines import PunkDiffPipeline
from punkdiff.pipelines.punkdiff_pipeline import SAMPLERS
from punkdiff.sampling import generate, recommended_sampling, to_uint8

NFE = (1, 2, 4, 8, 16, 32, 50)
METRICS = ("fd_classifier", "swd")


def score_point(pipe: PunkDiffPipeline, sampler: str, nfe: int, reference, args: argparse.Namespace) -> dict[str, Any]:
    """One sampler at one NFE: `--num-samples` images, scored beside their floors as `punkdiff eval` scores them."""
    start = time.perf_counter()
    with warnings.catch_warnings():  # a student at another count than its distilled one: measured on purpose
        warnings.simplefilter("ignore", UserWarning)
        images = generate(pipe, args.num_samples, seed=args.seed, batch_size=args.batch_size, sampler=sampler,
                          num_inference_steps=nfe, output_type="np", progress=False, precision=args.precision)
    sampling_s = time.perf_counter() - start
    result = evaluate(to_uint8(images), reference, seed=args.seed, cache_dir=args.cache_dir, progress=False)
    scores = {name: {k: result.metrics[name][k] for k in ("model", "floor")} for name in METRICS
              if name in result.metrics}
    for m in scores.values():
        m["ratio"] = m["model"] / m["floor"] if m["model"] is not None and m["floor"] else None
    return {"sampler": sampler, "nfe": nfe, "num_images": result.num_images, "sampling_s": sampling_s,
            "metrics": scores}


def plot(points: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Log-x NFE against classifier FD / floor: one line per teacher sampler, the student's points as stars."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=120)
    ax = figure.add_subplot()
    for role, marker, style in (("teacher", "o", "-"), ("student", "*", "--")):
        for sampler in dict.fromkeys(p["sampler"] for p in points if p["role"] == role):
            line = [p for p in points if p["role"] == role and p["sampler"] == sampler
                    and p["metrics"].get("fd_classifier", {}).get("ratio") is not None]
            if not line:
                continue
            label = sampler if role == "teacher" else f"student ({sampler})"
            ax.plot([p["nfe"] for p in line], [p["metrics"]["fd_classifier"]["ratio"] for p in line], style,
                    marker=marker, markersize=12 if role == "student" else 5, label=label)
            distilled = [p for p in line if p.get("distilled")]
            if distilled:
                ax.scatter([p["nfe"] for p in distilled], [p["metrics"]["fd_classifier"]["ratio"] for p in distilled],
                           s=260, facecolors="none", edgecolors="black", zorder=3, label="distilled step count")
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    nfes = sorted({p["nfe"] for p in points})
    ax.set_xticks(nfes, [str(n) for n in nfes])
    ax.tick_params(axis="x", which="minor", labelbottom=False)  # only the NFE measured are labelled
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel("classifier FD / real-vs-real floor")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("teacher", help="the teacher's exported model folder")
    p.add_argument("--student", default=None, help="a student distilled from it (exported folder)")
    p.add_argument("--reference", required=True, help="the dataset the teacher learned (Hub id or local folder)")
    p.add_argument("--preset", default=None, help="its preprocessing (default: the run's training_summary.json)")
    p.add_argument("--split", default="train")
    p.add_argument("--max-reference", type=int, default=None, help="first images of each split only (smoke runs)")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    p.add_argument("--nfe", nargs="+", type=int, default=list(NFE))
    p.add_argument("--num-samples", type=int, default=1000, help="samples per point (5,000 for headline points)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--precision", default="float32", choices=["float32", "auto", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="decoded images and classifiers (default ~/.cache/punkdiff)")
    p.add_argument("--out", type=Path, default=RESULTS / "steps.json", help="JSON; the plot goes beside it (.png)")
    p.add_argument("--resume", action="store_true", help="keep the points --out already holds from a run with the "
                   "same models, reference, samples, seed and precision; measure only the others")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if min(args.nfe) < 1 or args.num_samples < 10:
        raise SystemExit("--nfe values must be at least 1 and --num-samples at least 10")
    teacher = load_pipeline(args.teacher)
    student = load_pipeline(args.student) if args.student else None
    config = teacher.unet.config
    transform, origin = model_transform(config.sample_size, config.in_channels, preset=args.preset,
                                        model_dir=args.teacher)
    reference = load_reference(args.reference, transform, split=args.split, seed=args.seed,
                               max_images=args.max_reference, cache_dir=args.cache_dir, progress=False)
    wall = time.perf_counter()
    kept = measured_points(args) if args.resume else {}
    points = []
    for sampler in args.samplers:
        for nfe in args.nfe:
            points.append(kept.get(("teacher", sampler, nfe))
                          or {"role": "teacher", **score_point(teacher, sampler, nfe, reference, args)})
            log(f"  teacher {sampler:<14} NFE {nfe:>3}: FD/floor {_ratio(points[-1])}")
    if student is not None:
        how = recommended_sampling(student)
        for nfe in args.nfe:
            points.append(kept.get(("student", how.sampler, nfe)) or {
                "role": "student", **score_point(student, how.sampler, nfe, reference, args),
                "distilled": nfe == how.distilled_steps})
            log(f"  student {how.sampler:<14} NFE {nfe:>3}: FD/floor {_ratio(points[-1])}")
    png = plot(points, args.out.with_suffix(".png"),
               f"{args.teacher}{f' + student {args.student}' if student else ''}: {args.num_samples} samples/point")
    report = {"benchmark": "quality against NFE per sampler (classifier FD and SWD beside their real-vs-real floors)",
              "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "machine": machine(torch.device("cpu")), "preprocessing": origin,
              "reference": reference.description, "wall_s": time.perf_counter() - wall, "plot": str(png),
              "results": points}
    write_json(args.out, report)
    print(table(points))
    print(f"\nJSON: {args.out}\nplot: {png}")
    return 0


def measured_points(args: argparse.Namespace) -> dict[tuple[str, str, int], dict[str, Any]]:
    """The points of an earlier run at `--out` whose models and sampling options are this run's, by (role,
    sampler, NFE); a student's points only if it is the same student."""
    if not args.out.is_file():
        return {}
    earlier = json.loads(args.out.read_text())
    same = ("teacher", "reference", "preset", "split", "max_reference", "num_samples", "seed", "precision")
    if any(earlier["options"].get(k) != (str(v) if isinstance(v := getattr(args, k), Path) else v) for k in same):
        return {}
    return {(p["role"], p["sampler"], p["nfe"]): p for p in earlier["results"]
            if p["role"] == "teacher" or earlier["options"].get("student") == args.student}


def _ratio(point: dict[str, Any]) -> str:
    ratio = point["metrics"].get("fd_classifier", {}).get("ratio")
    return "-" if ratio is None else f"{ratio:.2f}"


def table(points: list[dict[str, Any]]) -> str:
    """One row per point: classifier FD and SWD, each with its floor and the ratio."""
    header = f"{'role':<8} {'sampler':<14} {'NFE':>4} {'FD':>9} {'floor':>8} {'FD/floor':>9} {'SWD':>9} {'floor':>8}"
    rows = [header, "-" * len(header)]
    for p in points:
        fd, swd = p["metrics"].get("fd_classifier", {}), p["metrics"].get("swd", {})

        def num(value: float | None) -> str:
            return "-" if value is None else f"{value:.3g}"

        rows.append(f"{p['role']:<8} {p['sampler']:<14} {p['nfe']:>4} {num(fd.get('model')):>9} "
                    f"{num(fd.get('floor')):>8} {_ratio(p):>9} {num(swd.get('model')):>9} {num(swd.get('floor')):>8}")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
