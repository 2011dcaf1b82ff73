"""Where a training step's time goes: punkdiff's loop (`training/train.py`) against the bare loop, cost by cost.

Both loops run exactly as `bench_train.py` runs them (`run_punkdiff`, `run_bare`), under Python's deterministic
profiler (`cProfile`), switched on after the last warm-up optimizer step and off after the last step by the same
global optimizer hook that `bench_train.py` times with. Each cost is the cumulative time of the functions that do it
(kernels included: a torch op's time counts to the Python function that called it), per optimizer step:

- forward, loss, backward, clip (grad norm), optimizer step, zero_grad: the same math in both loops;
- the wrappers around them that only punkdiff has: Accelerate's `accumulate`, `backward`, `clip_grad_norm_`,
  optimizer and LR-scheduler wrappers, the autocast wrapper around the prepared model's forward;
- EMA (`EMAModel.step` against one `_foreach_lerp_`), the LR schedule, data (loader, uint8 -> float, flips, noise
  and timesteps), the step log (loss kept on the device, read back every `--log-every` steps), the progress bar,
  the SIGTERM poll;
- "other": the step's wall time not covered above (the loop's own Python, and the profiler's own overhead).

The profiler adds a few microseconds per Python call, the same to both loops: read the shares and the differences,
and check the totals against `bench_train.py` (without the profiler) on the same machine. A wrapper's own time is
its time minus what it wraps. As `bench_train.py` does, it waits for a quiet machine first and refuses its figures
(exit 3, `figures_refused` in the JSON) when the load rose during the run.

    .venv/bin/python benchmarks/profile_step.py                       # mnist-32-bench, 1 and 2 threads, fp32
    .venv/bin/python benchmarks/profile_step.py --threads 2 --bf16    # one setting
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
import torch
from bench_train import Case, Options, run_bare, run_punkdiff

from punkdiff.data import load_training_images


class Profiled:
    """Cumulative ms of profiled functions, looked up by the end of their file's path and their name."""

    def __init__(self, stats: pstats.Stats) -> None:
        self.stats = stats.stats  # type: ignore[attr-defined]

    def __call__(self, path_end: str, name: str) -> float:
        """Python function `name` defined in a file whose path ends with `path_end` ("~": a built-in)."""
        total = 0.0
        for (filename, _, function), (_, _, _, cumulative, _) in self.stats.items():
            if path_end == "~":
                found = filename == "~" and re.search(rf"method (?:\S+\.)?{re.escape(name)}\b", function) is not None
            else:
                found = filename.replace("\\", "/").endswith(path_end) and function == name
            total += cumulative if found else 0.0
        return 1000 * total


def costs(ms: Profiled, steps: int) -> dict[str, float]:
    """ms per step of each cost; a function a loop never calls counts 0 there. A wrapper's own cost is the wrapper
    minus what it wraps."""
    unet = ms("unets/unet_2d.py", "forward")
    wrapped = ms("accelerate/utils/operations.py", "__call__")  # Accelerate's autocast + outputs-to-fp32 forward
    backward = ms("torch/_tensor.py", "backward")
    clip = ms("torch/nn/utils/clip_grad.py", "clip_grad_norm_")
    optimizer_step = ms("torch/optim/optimizer.py", "wrapper")  # torch's hook wrapper around AdamW.step: both loops
    accelerated_step = ms("accelerate/optimizer.py", "step")
    found = {
        "forward (UNet)": unet,
        "autocast wrapper (Accelerate)": wrapped - unet if wrapped else 0.0,
        "loss (q_sample, target, MSE)": ms("punkdiff/training/loss.py", "diffusion_loss")
        + ms("bench_train.py", "bare_loss") - max(unet, wrapped),
        "backward": backward,
        "backward wrapper (Accelerate)": max(ms("accelerate/accelerator.py", "backward") - backward, 0.0),
        "grad norm + clip": clip,
        "clip wrapper (Accelerate)": max(ms("accelerate/accelerator.py", "clip_grad_norm_") - clip, 0.0),
        "optimizer step (AdamW)": optimizer_step,
        "optimizer wrapper (Accelerate)": max(accelerated_step - optimizer_step, 0.0) if accelerated_step else 0.0,
        "zero_grad": max(ms("accelerate/optimizer.py", "zero_grad"), ms("torch/optim/optimizer.py", "zero_grad")),
        "accumulate context (Accelerate)": ms("accelerate/accelerator.py", "accumulate"),
        "unwrap_model (Accelerate)": ms("accelerate/accelerator.py", "unwrap_model"),
        "LR schedule": ms("accelerate/scheduler.py", "step") + ms("torch/optim/lr_scheduler.py", "get_last_lr"),
        "EMA": ms("diffusers/training_utils.py", "step") + ms("bench_train.py", "bare_ema"),
        "data (batch, x_0, flips)": max(ms("accelerate/data_loader.py", "__iter__"),
                                        ms("torch/utils/data/dataloader.py", "__next__"))
        + ms("punkdiff/data.py", "to_model_input") + ms("bench_train.py", "bare_batch"),
        "noise + timesteps": ms("~", "randn") + ms("~", "randint"),
        "step log (on device; read every N steps)": sum(ms("punkdiff/training/step_log.py", name)
                                                        for name in ("add_loss", "end_step", "read")),
        "progress bar": ms("tqdm/std.py", "update") + ms("tqdm/std.py", "set_postfix"),
        "SIGTERM poll": ms("punkdiff/training/preemption.py", "requested"),
    }
    return {cost: max(value, 0.0) / steps for cost, value in found.items()}


class Window:
    """cProfile on between the end of optimizer step `warmup` and the end of the last step (a global post-hook)."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.last = warmup, warmup + steps
        self.profile = cProfile.Profile()
        self.count, self.start, self.seconds = 0, 0.0, 0.0

    def __enter__(self) -> Window:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self._handle = register_optimizer_step_post_hook(self._mark)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self.profile.disable()

    def _mark(self, optimizer, args, kwargs) -> None:
        self.count += 1
        if self.count == self.warmup:
            self.start = time.perf_counter()
            self.profile.enable()
        elif self.count == self.last:
            self.profile.disable()
            self.seconds = time.perf_counter() - self.start


def profile(contender: str, case: Case, opts: Options) -> dict[str, Any]:
    """One profiled run of `contender`: ms per step in all and per cost."""
    runner = {"punkdiff": run_punkdiff, "bare": run_bare}[contender]
    with Window(opts.warmup_steps, opts.steps) as window:
        runner(case, opts, opts.warmup_steps + opts.steps)
    benchlib.require(window.seconds > 0, f"{contender}: the profiled window did not close ({window.count} steps seen)")
    step_ms = 1000 * window.seconds / opts.steps
    by_cost = costs(Profiled(pstats.Stats(window.profile)), opts.steps)
    by_cost["other"] = max(step_ms - sum(by_cost.values()), 0.0)
    return {"step_ms": step_ms, "costs_ms": by_cost}


def table(rows: list[dict[str, Any]]) -> str:
    """One block per setting: each cost's ms per step in punkdiff and bare, the difference, and the share of it."""
    lines = []
    for row in rows:
        p, b = row["punkdiff"], row["bare"]
        gap = p["step_ms"] - b["step_ms"]
        lines += [f"{row['setting']}: punkdiff {p['step_ms']:.1f} ms/step, bare {b['step_ms']:.1f} ms/step, "
                  f"punkdiff/bare {b['step_ms'] / p['step_ms']:.3f} (images/s ratio)",
                  f"  {'cost':<40} {'punkdiff':>9} {'bare':>9} {'extra':>9}", "  " + "-" * 70]
        for cost in p["costs_ms"]:
            extra = p["costs_ms"][cost] - b["costs_ms"][cost]
            lines.append(f"  {cost:<40} {p['costs_ms'][cost]:>9.2f} {b['costs_ms'][cost]:>9.2f} {extra:>+9.2f}")
        lines += [f"  {'step (wall)':<40} {p['step_ms']:>9.2f} {b['step_ms']:>9.2f} {gap:>+9.2f}", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mnist-32-bench", help="a preset or a benchlib.CONFIGS name")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads, one profile per value")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (both loops)")
    p.add_argument("--batch-size", type=int, help="default: the preset's own")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="profiled optimizer steps per run")
    benchlib.add_load_arguments(p, "figures")
    p.add_argument("--datasets-root", type=Path, default=benchlib.DEFAULT_DATASETS)
    p.add_argument("--out", type=Path, default=benchlib.RESULTS / "profile-step-cpu.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    watch = benchlib.LoadWatch(args.max_load, args.wait_s, benchlib.log, checked=not args.skip_load_wait).wait()
    preset = benchlib.bench_preset(args.preset)
    data_dir = benchlib.mirror(preset, args.datasets_root)
    rows = []
    with tempfile.TemporaryDirectory(prefix="profile-step-") as tmp:
        workdir = Path(tmp)
        images = load_training_images(str(data_dir), preset.data, cache_dir=workdir / "cache", progress=False)
        case = Case(args.preset, preset, data_dir, args.batch_size or preset.train.batch_size, workdir,
                    images.images.clone())
        for threads in args.threads:
            torch.set_num_threads(threads)
            opts = Options("cpu", args.bf16, False, False, args.warmup_steps, args.steps, 1)
            setting = f"{args.preset}, batch {case.batch_size}, {'bf16' if args.bf16 else 'fp32'}, {threads} thread(s)"
            benchlib.log(f"profiling {setting}")
            row: dict[str, Any] = {"setting": setting, "threads": threads}
            for contender in ("punkdiff", "bare"):
                row[contender] = profile(contender, case, opts)
                row[contender]["loadavg_after"] = watch.sample()
            rows.append(row)
    info = {**benchlib.machine(torch.device("cpu")), **watch.record()}
    refused = watch.refusal(own_threads=max(args.threads))
    report = {"benchmark": "one training step, punkdiff vs bare, cost by cost (cProfile, ms per step)",
              "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "machine": info, "figures_refused": refused, "results": rows}
    note = f"load {watch.start:.2f} -> peak {max(watch.samples, default=0):.2f}; JSON: {args.out}"
    return watch.report(args.out, report, table(rows), note, refused, "figures")

if __name__ == "__main__":
    sys.exit(main())
