"""What to set on a CPU: training images/s of the presets under the settings a user chooses.

For each preset (default `mnist-16` and `punks-24-cpu`), `training/train.py` itself is launched as a user would
(`accelerate launch --cpu --num_cpu_threads_per_process T` for one process; `--multi_gpu --num_processes P`, which
is one gloo job on a machine without a GPU, for several: `--cpu --num_processes 2` would run one process), once per
setting:

- `1x2`: 1 process x 2 threads, the preset's batch, float32 (the reference row);
- `2x1`: 2 processes x 1 thread (gloo all-reduce), half the batch each, so the global batch is the same;
- `batch/2`, `batch*2`: 1 process x 2 threads at half and twice the preset's batch;
- `bf16`: bf16 autocast (only on a CPU with native bf16: elsewhere the loop trains float32 and says so);
- `channels_last`: `--channels-last`.

Each run's steps are timed inside the training process by the global optimizer post-step hook that
`bench_train.py` uses (`benchlib.StepClock`, on the first process): images/s over the steps after `--warmup-steps`,
times the global batch, so start-up, data loading, the final grid and the export are outside it. Settings are
interleaved per repeat; medians over repeats. The benchmark waits for a quiet machine and refuses its figures
(exit 3) when the load rose during the run, as `bench_train.py` does. About 10 minutes on 2 cores with the defaults.

    .venv/bin/python benchmarks/bench_settings.py                              # table + results/settings-cpu.json
    .venv/bin/python benchmarks/bench_settings.py --presets mnist-16 --settings 1x2 2x1 --repeats 3
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
from typing import Any

import torch
from benchlib import (
    DEFAULT_DATASETS,
    RESULTS,
    LoadWatch,
    add_load_arguments,
    bench_preset,
    cpu_report,
    log,
    mirror,
    rotated,
    summary,
)

from punkdiff.precision import cpu_has_native_bf16

SETTINGS = ("1x2", "2x1", "batch/2", "batch*2", "bf16", "channels_last")
HERE = Path(__file__).resolve()


def launch_plan(setting: str, batch: int) -> tuple[int, int, int, list[str]]:
    """`(processes, threads per process, per-process batch, extra train.py flags)` of one setting."""
    plans = {
        "1x2": (1, 2, batch, []),
        "2x1": (2, 1, max(batch // 2, 1), []),
        "batch/2": (1, 2, max(batch // 2, 1), []),
        "batch*2": (1, 2, batch * 2, []),
        "bf16": (1, 2, batch, ["--mixed-precision", "bf16"]),
        "channels_last": (1, 2, batch, ["--channels-last"]),
    }
    return plans[setting]


def run_setting(preset: str, setting: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Launch one training run of `setting` and time its steps: images/s over the steps after the warm-up."""
    spec = bench_preset(preset)
    processes, threads, batch, extra = launch_plan(setting, spec.train.batch_size)
    out = Path(tempfile.mkdtemp(prefix=f"{preset}-", dir=workdir))
    marks = out / "marks.json"
    flags = ["--preset", preset, "--dataset", str(mirror(spec, args.datasets_root)),
             "--cache-dir", str(workdir / "cache"), "--output-dir", str(out / "run"),
             "--max-steps", str(args.warmup_steps + args.steps), "--batch-size", str(batch), "--seed", "0",
             "--report-to", "none", "--mixed-precision", "no", "--checkpoint-every", str(10**9),
             "--sample-every", str(10**9), "--set", "train.num_sample_images=1",
             "--set", "train.sample_inference_steps=1", *extra]
    launch = ["--cpu"] if processes == 1 else ["--multi_gpu", "--main_process_port", "0"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--num_cpu_threads_per_process", str(threads), str(HERE), "--worker", str(marks), "--", *flags]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0 or not marks.is_file():
        raise SystemExit(f"{preset} {setting}: training failed ({done.returncode}):\n{done.stderr[-3000:]}")
    worker_said = json.loads(marks.read_text())
    if worker_said["world_size"] != processes:
        raise SystemExit(f"{preset} {setting}: asked for {processes} processes, the launch ran "
                         f"{worker_said['world_size']}")
    times = worker_said["marks"]
    first, last = times[args.warmup_steps - 1], times[-1]
    timed_steps = len(times) - args.warmup_steps
    global_batch = batch * processes
    return {"processes": processes, "threads_per_process": threads, "batch_per_process": batch,
            "global_batch": global_batch, "flags": extra, "timed_steps": timed_steps,
            "images_per_s": timed_steps * global_batch / (last - first)}


def worker(marks: Path, flags: list[str]) -> int:
    """Inside `accelerate launch`: train with `flags`, the first process writing each optimizer step's end time."""
    from benchlib import StepClock

    from punkdiff.scripts.train import main as train_main

    clock = StepClock(torch.device("cpu"))
    with clock:
        code = train_main(flags)
    if int(os.environ.get("RANK", "0")) == 0:
        marks.write_text(json.dumps({"marks": [wall for wall, _ in clock.marks], "code": code,
                                     "torch_threads": torch.get_num_threads(),
                                     "world_size": int(os.environ.get("WORLD_SIZE", "1"))}))
    return code


def table(results: list[dict[str, Any]]) -> str:
    """One row per preset and setting: median images/s, its spread, and the ratio to the preset's `1x2` row."""
    header = f"{'preset':<14} {'setting':<14} {'procs x threads':>15} {'batch':>9} {'img/s':>8} {'min-max':>13} " \
             f"{'vs 1x2':>7}"
    rows = [header, "-" * len(header)]
    for r in results:
        reference = next((x["images_per_s"]["median"] for x in results
                          if x["preset"] == r["preset"] and x["setting"] == "1x2"), None)
        s = r["images_per_s"]
        ratio = f"{s['median'] / reference:.3f}" if reference else "-"
        rows.append(f"{r['preset']:<14} {r['setting']:<14} {r['processes']:>9} x {r['threads_per_process']:<3} "
                    f"{r['global_batch']:>9} {s['median']:>8.1f} {s['min']:>6.1f}-{s['max']:<6.1f} {ratio:>7}")
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["mnist-16", "punks-24-cpu"])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--steps", type=int, default=100, help="timed optimizer steps per run")
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats (medians reported)")
    add_load_arguments(p, "figures")
    p.add_argument("--datasets-root", type=Path, default=DEFAULT_DATASETS)
    p.add_argument("--out", type=Path, default=RESULTS / "settings-cpu.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--worker":
        return worker(Path(sys.argv[2]), sys.argv[sys.argv.index("--") + 1:])
    args = parse_args(argv)
    if args.warmup_steps < 1 or args.steps < 2:
        raise SystemExit("--warmup-steps must be at least 1 and --steps at least 2")
    settings = list(args.settings)
    if "bf16" in settings and not cpu_has_native_bf16():
        log("bf16 skipped: this CPU has no native bf16 (AVX-512 BF16 or AMX); the loop would train float32")
        settings.remove("bf16")
    watch = LoadWatch(args.max_load, args.wait_s, log, checked=not args.skip_load_wait).wait()
    wall = time.perf_counter()
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-settings-") as tmp:
        for repeat in range(args.repeats):
            for preset in args.presets:
                for setting in rotated(settings, repeat):
                    result = run_setting(preset, setting, args, Path(tmp))
                    runs.setdefault((preset, setting), []).append(result)
                    log(f"  repeat {repeat + 1}/{args.repeats} {preset:<14} {setting:<14} "
                        f"{result['images_per_s']:8.1f} img/s, load {watch.sample():.2f}")
    results = []
    for (preset, setting), rs in runs.items():
        rates = [r["images_per_s"] for r in rs]
        results.append({"preset": preset, "setting": setting, **{k: v for k, v in rs[0].items() if k != "images_per_s"},
                        "images_per_s": summary(rates)})
    report, refused = cpu_report("training images/s per setting (processes x threads, batch, precision, memory format)",
                                 args, watch, wall, results, own_threads=2)
    note = (f"\n{args.warmup_steps} warm-up + {args.steps} timed steps per run, {args.repeats} repeat(s); load "
            f"{watch.start:.2f} -> peak {max(watch.samples, default=0):.2f}; wall {report['wall_s']:.0f} s; JSON: "
            f"{args.out}")
    return watch.report(args.out, report, table(results), note, refused, "figures")

if __name__ == "__main__":
    sys.exit(main())
