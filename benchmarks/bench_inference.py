"""Sampling images/s per inference setting: a teacher's DDIM-50 beside its 4-step student.

Timed through `punkdiff sample`'s own library code (`punkdiff.sampling.generate` after `prepare_for_sampling`).

A model is an exported folder (`--models`: a teacher, or a distilled student, which is sampled as its `sampling.json`
says) or a preset's UNet, untrained (`--presets`, default `mnist-16` and `punks-24-cpu`): images/s does not depend on
the weights, so no trained model is needed. A preset's UNet is timed twice, as a teacher (DDIM-50, eta 1, the
default recommendation) and as its student (the same UNet at DDIM-trailing 4 steps, eta 0, which is what a
distilled student is). Settings, each alone over float32 eager:

- `fp32`: float32, eager (the reference row);
- `bf16`: bf16 autocast (`precision="bfloat16"`; skipped on a CPU without native bf16, where sampling keeps float32);
- `channels_last`: the UNet stored NHWC;
- `compile`: `torch.compile` (inductor), its compile time kept out of the timing by a warm-up batch;
- `auto`: what `punkdiff sample` does by default (`precision="auto"`).

Each point samples `--num-images` images at each `--batch-sizes` entry after one warm-up batch, settings interleaved
per repeat, medians of repeats. PNG writing is not timed here (it runs in a thread pool beside nothing else). As the
other benchmarks do, it waits for a quiet machine and refuses its figures (exit 3) when the load rose.

    .venv/bin/python benchmarks/bench_inference.py                     # table + results/inference-cpu.json
    .venv/bin/python benchmarks/bench_inference.py --models outputs/mnist16/pipeline outputs/mnist16-4step/pipeline
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from benchlib import RESULTS, LoadWatch, add_load_arguments, bench_preset, cpu_report, log, rotated, summary

from punkdiff.pipelines import PunkDiffPipeline
from punkdiff.precision import cpu_has_native_bf16
from punkdiff.sampling import generate, prepare_for_sampling, recommended_sampling, sampling_precision

SETTINGS = ("fp32", "bf16", "channels_last", "compile", "auto")


@dataclass(frozen=True)
class Case:
    """One model sampled one way: its name, role (teacher/student), sampler, steps and eta."""

    name: str
    role: str
    pipe: PunkDiffPipeline
    sampler: str
    steps: int
    eta: float


def preset_cases(name: str, teacher_steps: int) -> list[Case]:
    """A preset's UNet, untrained, as a teacher (DDIM-50 as recommended) and as its 4-step student."""
    from diffusers import DDPMScheduler, UNet2DModel

    preset = bench_preset(name)
    torch.manual_seed(0)
    pipe = PunkDiffPipeline(UNet2DModel(**preset.model.unet_config()).eval(),
                            DDPMScheduler(**preset.scheduler.ddpm_config()))
    teacher = recommended_sampling(pipe)
    return [Case(name, "teacher", pipe, teacher.sampler, teacher_steps or teacher.num_inference_steps, teacher.eta),
            Case(name, "student", pipe, "ddim-trailing", 4, 0.0)]


def folder_case(path: str) -> Case:
    """An exported model, sampled as it recommends: a student at its distilled steps."""
    from punkdiff.hub import load_pipeline

    pipe = load_pipeline(path)
    how = recommended_sampling(pipe)
    role = "student" if how.distilled_steps is not None else "teacher"
    return Case(path, role, pipe, how.sampler, how.num_inference_steps, how.eta)


def setting_pipe(case: Case, setting: str) -> tuple[PunkDiffPipeline, str]:
    """`(pipeline, precision=)` of one setting: a copy of the case's UNet, prepared as the setting says."""
    pipe = copy.deepcopy(case.pipe)
    pipe.set_progress_bar_config(disable=True)
    prepare_for_sampling(pipe, channels_last=setting == "channels_last", compile=setting == "compile")
    precision = {"bf16": "bfloat16", "auto": "auto"}.get(setting, "float32")
    return pipe, precision


def images_per_s(case: Case, pipe: PunkDiffPipeline, precision: str, batch: int, count: int) -> float:
    """Images/s of `count` images in batches of `batch`, after one warm-up batch (compilation, caches)."""
    kwargs = dict(batch_size=batch, sampler=case.sampler, num_inference_steps=case.steps, eta=case.eta,
                  output_type="np", progress=False, precision=precision)
    generate(pipe, batch, **kwargs)
    start = time.perf_counter()
    generate(pipe, count, seed=1, **kwargs)
    return count / (time.perf_counter() - start)


def table(results: list[dict[str, Any]]) -> str:
    """One row per model, role, setting and batch: median images/s and the ratio to the same batch's fp32 row."""
    header = f"{'model':<28} {'role':<8} {'sampling':<22} {'setting':<14} {'batch':>6} {'img/s':>9} {'vs fp32':>8}"
    rows = [header, "-" * len(header)]
    for r in results:
        reference = next((x["images_per_s"]["median"] for x in results if x["setting"] == "fp32" and
                          (x["model"], x["role"], x["batch"]) == (r["model"], r["role"], r["batch"])), None)
        ratio = f"{r['images_per_s']['median'] / reference:.3f}" if reference else "-"
        rows.append(f"{r['model'][-28:]:<28} {r['role']:<8} {r['sampling']:<22} {r['setting']:<14} {r['batch']:>6} "
                    f"{r['images_per_s']['median']:>9.1f} {ratio:>8}")
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="*", default=["mnist-16", "punks-24-cpu"],
                   help="presets whose untrained UNets are timed, as teacher and as 4-step student")
    p.add_argument("--models", nargs="*", default=[], help="exported model folders (teachers or students)")
    p.add_argument("--teacher-steps", type=int, default=0, help="a preset teacher's steps (0: its recommendation, "
                   "50; fewer only for smoke runs)")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 256])
    p.add_argument("--num-images", type=int, default=256, help="timed images per point")
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats (medians reported)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    add_load_arguments(p, "figures")
    p.add_argument("--out", type=Path, default=RESULTS / "inference-cpu.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = list(args.settings)
    if "bf16" in settings and not cpu_has_native_bf16():
        log("bf16 skipped: this CPU has no native bf16 (AVX-512 BF16 or AMX); sampling keeps float32 there")
        settings.remove("bf16")
    cases = [c for name in args.presets for c in preset_cases(name, args.teacher_steps)]
    cases += [folder_case(m) for m in args.models]
    if not cases:
        raise SystemExit("nothing to time: give --presets or --models")
    pipes = {(i, s): setting_pipe(case, s) for i, case in enumerate(cases) for s in settings}
    watch = LoadWatch(args.max_load, args.wait_s, log, checked=not args.skip_load_wait).wait()
    wall = time.perf_counter()
    runs: dict[tuple[int, str, int], list[float]] = {}
    for repeat in range(args.repeats):
        for i, case in enumerate(cases):
            for setting in rotated(settings, repeat):
                for batch in args.batch_sizes:
                    pipe, precision = pipes[i, setting]
                    rate = images_per_s(case, pipe, precision, batch, args.num_images)
                    runs.setdefault((i, setting, batch), []).append(rate)
                    log(f"  repeat {repeat + 1}/{args.repeats} {case.name} {case.role} {setting} batch {batch}: "
                        f"{rate:.1f} img/s, load {watch.sample():.2f}")
    results = []
    for (i, setting, batch), rates in runs.items():
        case = cases[i]
        pipe, precision = pipes[i, setting]
        computed_in, _ = sampling_precision(pipe, precision)
        results.append({
            "model": case.name, "role": case.role, "sampling": f"{case.sampler}-{case.steps}, eta {case.eta:g}",
            "setting": setting, "computed_in": computed_in, "batch": batch, "num_images": args.num_images,
            "trained_weights": case.name in args.models,
            "images_per_s": summary(rates),
        })
    report, refused = cpu_report("sampling images/s per inference setting, teacher DDIM-50 vs 4-step student", args,
                                 watch, wall, results, own_threads=torch.get_num_threads())
    note = (f"\n{args.num_images} images per point after a warm-up batch, {args.repeats} repeat(s); preset UNets are "
            f"untrained (speed does not depend on the weights); load {watch.start:.2f} -> peak "
            f"{max(watch.samples, default=0):.2f}; wall {report['wall_s']:.0f} s; JSON: {args.out}")
    return watch.report(args.out, report, table(results), note, refused, "figures")


if __name__ == "__main__":
    sys.exit(main())
