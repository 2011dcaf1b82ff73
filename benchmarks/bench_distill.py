"""Distillation time against its teacher's training time: seconds per optimizer step of each, measured side by side.

For a teacher folder, runs (each a fresh `punkdiff` process, the same thread count, interleaved per repeat):

- the teacher's training: its own configuration (model, data, precision: the run's `training_summary.json`),
  `--measure-steps` optimizer steps;
- one distillation stage as `punkdiff distill` plans it (`--steps`, `--teacher-steps`, `--stage-factor`,
  `--teacher-solver`), `--measure-steps` optimizer steps of its first stage (every stage costs the same per step);
- the distribution-matching stage, `--measure-steps` optimizer steps (its fake denoiser's warm-up included, a
  quarter of them as in a full stage).

Seconds per step are each run's own `wall_time_s / steps` (its loop, from the first step to the last; data loading
and export are outside it). The full times are projected from them: the teacher's recorded step count, the
distillation's stages times `--stage-steps` (default: 2/5 of the teacher's steps shared out over the stages, as
`punkdiff distill` does without `--max-steps`) and the distribution-matching stage's `--dmd-steps` (default as
`punkdiff distill`'s: 1/13 of the teacher's steps). As the other benchmarks do, it waits for a quiet
machine and refuses the ratio (exit 3) when the load rose.

    .venv/bin/python benchmarks/bench_distill.py outputs/mnist16/pipeline --steps 4   # punkdiff distill's defaults
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import RESULTS, LoadWatch, add_load_arguments, cpu_report, log, summary

from punkdiff.training.arguments import DEFAULT_TEACHER_STEPS
from punkdiff.training.distillation import default_stage_steps, distillation_stages
from punkdiff.training.distribution_matching import default_dmd_steps


def seconds_per_step(command: list[str], summary_file: str, threads: int, cache_dir: str | None) -> float:
    """Run one `punkdiff` training or distillation in a fresh process; the seconds per optimizer step of the loop
    whose summary is `summary_file` (relative to its output folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        cache = ["--cache-dir", cache_dir] if cache_dir else []
        subprocess.run([*command, *cache, "--output-dir", tmp, "--report-to", "none"], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run = json.loads((Path(tmp) / summary_file).read_text())
        return run["wall_time_s"] / run["steps"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    teacher_run = json.loads((args.teacher.parent / "training_summary.json").read_text())
    config = teacher_run["config"]
    stages = distillation_stages(args.teacher_steps, args.steps, args.stage_factor)
    stage_steps = args.stage_steps or default_stage_steps(teacher_run["steps"], len(stages))
    dmd_steps = default_dmd_steps(teacher_run["steps"]) if args.dmd_steps is None else args.dmd_steps
    punkdiff = [sys.executable, "-m", "punkdiff.cli"]
    # the teacher's own configuration (model, data, precision), as `punkdiff distill` reads it for its stages
    teacher_config = args.out.with_name(args.out.stem + "-teacher-config.json")
    teacher_config.parent.mkdir(parents=True, exist_ok=True)
    teacher_config.write_text(json.dumps(
        {"preset": config["name"], **{k: v for k, v in config.items() if k not in ("name", "description")}}))
    distill = [*punkdiff, "distill", str(args.teacher), "--teacher-steps", str(args.teacher_steps), "--stage-factor",
               str(args.stage_factor), "--teacher-solver", args.teacher_solver]
    measure = str(args.measure_steps)
    commands = {  # the command, and the summary of the loop it times
        "teacher training": ([*punkdiff, "train", "--config", str(teacher_config), "--max-steps", measure],
                             "training_summary.json"),
        "distillation stage": ([*distill, "--steps", str(stages[0]), "--max-steps", measure, "--dmd-steps", "0"],
                               f"stage-{stages[0]}/training_summary.json"),
        "distribution matching": ([*distill, "--steps", str(args.steps), "--max-steps", "1", "--dmd-steps", measure],
                                  f"stage-{args.steps}-dmd/training_summary.json"),
    }
    if not dmd_steps:
        del commands["distribution matching"]
    watch = LoadWatch(args.max_load, args.wait_s, log, checked=not args.skip_load_wait).wait()
    wall = time.perf_counter()
    runs: dict[str, list[float]] = {name: [] for name in commands}
    for repeat in range(args.repeats):
        for name, (command, summary_file) in (commands.items() if repeat % 2 == 0 else reversed(commands.items())):
            runs[name].append(seconds_per_step(command, summary_file, args.threads, args.cache_dir))
            log(f"  repeat {repeat + 1}/{args.repeats} {name}: {runs[name][-1] * 1000:.1f} ms/step, "
                f"load {watch.sample():.2f}")
    teacher_s = summary(runs["teacher training"])["median"] * teacher_run["steps"]
    distill_s = summary(runs["distillation stage"])["median"] * stage_steps * len(stages)
    results = [
        {"run": "teacher training", "preset": config["name"], "precision": config["train"]["mixed_precision"],
         "steps": teacher_run["steps"], "seconds_per_step": summary(runs["teacher training"]),
         "projected_s": teacher_s},
        {"run": "distillation", "stages": [args.teacher_steps, *stages], "teacher_solver": args.teacher_solver,
         "steps": stage_steps * len(stages), "seconds_per_step": summary(runs["distillation stage"]),
         "projected_s": distill_s, "vs_teacher": distill_s / teacher_s},
    ]
    if dmd_steps:
        dmd_s = summary(runs["distribution matching"])["median"] * dmd_steps
        results.append({"run": "distribution matching", "steps": dmd_steps, "projected_s": dmd_s,
                        "seconds_per_step": summary(runs["distribution matching"]), "vs_teacher": dmd_s / teacher_s})
    total_s = distill_s + (dmd_s if dmd_steps else 0.0)
    results.append({"run": "all stages", "steps": stage_steps * len(stages) + dmd_steps, "projected_s": total_s,
                    "vs_teacher": total_s / teacher_s})
    report, refused = cpu_report("distillation time against its teacher's training time", args, watch, wall, results,
                                 own_threads=args.threads)
    header = f"{'run':<21} {'plan':<34} {'steps':>6} {'ms/step':>8} {'projected s':>12} {'vs teacher':>10}"
    rows = [header, "-" * len(header)]
    for r in results:
        plan = (f"{r['preset']}, {r['precision']}" if r["run"] == "teacher training" else
                f"{' -> '.join(map(str, r['stages']))}, {r['teacher_solver']}" if r["run"] == "distillation" else
                f"{args.steps} steps, DMD" if r["run"] == "distribution matching" else "")
        ratio = f"{r['vs_teacher']:.2f}" if "vs_teacher" in r else "1.00"
        per_step = f"{r['seconds_per_step']['median'] * 1000:.1f}" if "seconds_per_step" in r else ""
        rows.append(f"{r['run']:<21} {plan:<34} {r['steps']:>6} {per_step:>8} {r['projected_s']:>12.0f} {ratio:>10}")
    note = (f"\n{args.measure_steps} steps per run, {args.repeats} repeat(s), {args.threads} thread(s); load "
            f"{watch.start:.2f} -> peak {max(watch.samples, default=0):.2f}; JSON: {args.out}")
    return watch.report(args.out, report, "\n".join(rows), note, refused, "the ratio")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("teacher", type=Path, help="the teacher's exported pipeline folder (its run's "
                   "training_summary.json beside it)")
    p.add_argument("--steps", type=int, default=4, help="the student's steps")
    p.add_argument("--teacher-steps", type=int, default=DEFAULT_TEACHER_STEPS, help="as punkdiff distill's")
    p.add_argument("--stage-factor", type=int, default=0, help="0: one stage (punkdiff distill's default)")
    p.add_argument("--teacher-solver", default="dpm-solver-2m")
    p.add_argument("--stage-steps", type=int, default=0, help="optimizer steps per stage of the full distillation "
                   "(0: 2/5 of the teacher's steps shared out over the stages, punkdiff distill's default)")
    p.add_argument("--dmd-steps", type=int, default=None, help="optimizer steps of the distribution-matching stage "
                   "(default: punkdiff distill's; 0: none)")
    p.add_argument("--measure-steps", type=int, default=300, help="timed optimizer steps per run")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats (medians reported)")
    p.add_argument("--threads", type=int, default=2, help="threads per run (OMP_NUM_THREADS)")
    add_load_arguments(p, "the ratio")
    p.add_argument("--cache-dir", default=None, help="decoded-image cache (default ~/.cache/punkdiff)")
    p.add_argument("--out", type=Path, default=RESULTS / "distill-cpu.json")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
