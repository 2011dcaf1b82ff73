"""Guidance sweep: a conditional model's quality and obedience against the classifier-free guidance scale.

    .venv/bin/python benchmarks/bench_guidance.py outputs/punks-cond/pipeline \
        --reference ../shared/datasets/cryptopunks --scales 0 1 2 3 5 --num-samples 5000

For each scale w, `punkdiff eval`'s own code (`evaluate_model`) samples `--num-samples` images for requests drawn as
the data (the same requests and seeds at every w) and scores them: the classifier Fréchet distance beside its
real-vs-real floor, and how often what was asked was drawn (class accuracy; for attribute models, label recall and
spurious labels per image) beside the classifier's own floor on held-out real images. Writes
`benchmarks/results/guidance_<model>.json` (with the machine and its load) and a PNG plot beside it; each scale's full
evaluation (report.md, samples) goes under `--work-dir`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
from benchlib import RESULTS, machine

from punkdiff.files import write_json
from punkdiff.metrics.model_evaluation import EvalOptions, evaluate_model


def sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One evaluation per guidance scale; the points of the plot."""
    from punkdiff.hub import load_pipeline

    pipe = load_pipeline(args.model)
    points = []
    for scale in args.scales:
        result = evaluate_model(EvalOptions(
            args.reference, out=Path(args.work_dir) / f"guidance-{scale:g}", model=args.model, preset=args.preset,
            num_samples=args.num_samples, batch_size=args.batch_size, scheduler=args.scheduler, steps=args.steps,
            eta=args.eta, seed=args.seed, guidance_scale=scale, per_class=args.per_class, reconstruction_images=0,
            cache_dir=args.cache_dir,
        ), pipe, progress=not args.quiet)
        fd = result.evaluation.metrics["fd_classifier"]
        generated, floor = result.conditional["generated"], result.conditional["floor"]
        point = {"guidance_scale": scale, "fd_classifier": fd["model"], "fd_classifier_floor": fd["floor"],
                 "report": str(result.report)}
        for key in ("accuracy", "label_recall", "spurious_per_image"):
            point[key], point[f"{key}_floor"] = generated[key], floor[key]
        balanced = result.conditional["balanced"]
        point["balanced_per_class_accuracy"] = {k: v["accuracy"] for k, v in balanced["per_class"].items()} \
            if balanced else None
        points.append(point)
        print(f"w={scale:g}: FD {fd['model']:.4g} (floor {fd['floor']:.4g}), accuracy {_text(point['accuracy'])}, "
              f"label recall {_text(point['label_recall'])}, spurious/image {_text(point['spurious_per_image'])}")
    return points


def _text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def plot(points: list[dict[str, Any]], title: str, path: Path) -> None:
    """FD / floor (left) and asked-vs-drawn scores (right) against the guidance scale, floors dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [p["guidance_scale"] for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    left.plot(scales, [p["fd_classifier"] / p["fd_classifier_floor"] for p in points], "o-", label="samples")
    left.axhline(1, color="gray", lw=1, ls="--", label="real-vs-real floor")
    left.set(xlabel="guidance scale w", ylabel="classifier FD / its floor", yscale="log", title="quality")
    for axis in (left.yaxis.set_major_formatter, left.yaxis.set_minor_formatter):
        axis(matplotlib.ticker.FormatStrFormatter("%g"))
    for key, label, colour in (("accuracy", "requested class drawn", "tab:blue"),
                               ("label_recall", "requested labels found", "tab:green"),
                               ("spurious_per_image", "unrequested labels per image", "tab:red")):
        if points[0][key] is not None:
            right.plot(scales, [p[key] for p in points], "o-", color=colour, label=label)
            right.axhline(points[0][f"{key}_floor"], color=colour, lw=1, ls="--")
    right.set_ylim(bottom=0)
    right.set(xlabel="guidance scale w", ylabel="share (per image for unrequested labels)",
              title="asked vs drawn (dashed: held-out real floor)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a conditional model folder")
    p.add_argument("--reference", required=True, help="the dataset the model learned (local folder or Hub id)")
    p.add_argument("--preset", default=None, help="preprocessing (default: the run's training_summary.json)")
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0, 5.0])
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--per-class", type=int, default=0, help="balanced requests per class at each scale (0: none)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--scheduler", default=None, help="default: the model's recommendation")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--eta", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--work-dir", default="guidance-sweep", help="each scale's evaluation (report, samples)")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/guidance_<model>.json); "
                   "the PNG goes beside it")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    name = Path(args.model).resolve().name
    name = Path(args.model).resolve().parent.name if name == "pipeline" else name
    out = Path(args.out) if args.out else RESULTS / f"guidance_{name}.json"
    report = {"machine": machine(torch.device("cpu")), "loadavg_start": list(os.getloadavg()), "model": args.model,
              "reference": args.reference, "num_samples": args.num_samples, "seed": args.seed}
    report["points"] = sweep(args)
    report["loadavg_end"] = list(os.getloadavg())
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    plot(report["points"], f"{name}: {args.num_samples} samples per scale, requests drawn as the data",
         out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
