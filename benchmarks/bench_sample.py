"""DDIM sampling speed: punkdiff's pipeline vs bare UNet forwards, stock `DDIMPipeline` and denoising-diffusion-pytorch.

Per configuration (a preset, or `mnist-32-bench`) and batch size, with the same `UNet2DModel` (same weights, random:
speed does not depend on them), DDIM with `--steps` steps (eta 0) and the same precision for all:

- punkdiff: `PunkDiffPipeline(unet, scheduler)(sampler="ddim", output_type="np")`;
- bare: the `--steps` UNet forwards alone, timesteps already on the device (the floor: no sampler math at all);
- stock: diffusers' `DDIMPipeline` as shipped (eager, whatever `--compile` says; in bf16 its UNet takes and returns
  float32, since the pipeline cannot turn a bf16 sample into numpy);
- ddpm-pytorch: `GaussianDiffusion(..., sampling_timesteps=steps).sample()` with its own `Unet(dim=c0, ...)`.

`--bf16` puts the UNets' weights in bf16 (ddpm-pytorch runs under bf16 autocast); `--compile` compiles the UNet that
punkdiff and bare share (`mode="reduce-overhead"`: CUDA graphs on a GPU); `--channels-last` likewise. Calls are
interleaved (order rotated per repeat), each timed whole (on CUDA after a synchronize) after one warm-up call, medians
reported as ms per step (call / steps) and images/s (on CPU also CPU ms per step: this process's CPU time, which
another job on a shared machine does not inflate); ratios are medians of per-repeat ratios. In fp32 eager the
benchmark also checks that punkdiff and stock give the same images from the same noise. `--count N` also times N
images with punkdiff in batches of the last `--batch-sizes` entry.

    .venv/bin/python benchmarks/bench_sample.py                # CPU, mnist-32-bench, batch 16, DDIM-50
    python benchmarks/bench_sample.py --gpu                    # = --device cuda --presets celeba-64 punks-32
                                                               #   --batch-sizes 16 256 --bf16 --channels-last --compile
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from benchlib import (
    RESULTS,
    bench_preset,
    ddpm_pytorch_unet,
    flops_per_image,
    log,
    machine,
    prepare_run,
    rotated,
    summary,
    timed,
    timed_cpu,
    wait_for_quiet,
)

CONTENDERS = ("punkdiff", "bare", "stock", "ddpm-pytorch")


@dataclass(frozen=True)
class Options:
    device: str
    bf16: bool
    channels_last: bool
    compile: bool
    steps: int
    repeats: int
    seed: int = 0


def contenders_for(name: str, batch: int, opts: Options, wanted: list[str]) -> tuple[dict[str, Callable[[], Any]],
                                                                                    dict[str, float]]:
    """One zero-argument callable per contender, sampling `batch` images, and the UNet forward FLOPs per image."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel

    from punkdiff.pipelines import PunkDiffPipeline

    preset = bench_preset(name)
    device = torch.device(opts.device)
    dtype = torch.bfloat16 if opts.bf16 else torch.float32
    torch.manual_seed(opts.seed)
    unet = UNet2DModel(**preset.model.unet_config()).to(device, dtype).eval()
    scheduler = DDPMScheduler(**preset.scheduler.ddpm_config())
    fast = unet
    if opts.channels_last or opts.compile:
        fast = copy.deepcopy(unet)
        if opts.channels_last:
            fast.to(memory_format=torch.channels_last)
        if opts.compile:
            fast.compile(mode="reduce-overhead" if device.type == "cuda" else "default")
    shape = (batch, preset.data.channels, preset.data.resolution, preset.data.resolution)
    x1 = torch.randn(1, *shape[1:], device=device, dtype=dtype)
    flops = {"unet": flops_per_image(lambda: unet(x1, torch.tensor([500], device=device)), 1)}

    punkdiff = PunkDiffPipeline(unet=fast, scheduler=scheduler)
    punkdiff.set_progress_bar_config(disable=True)
    stock = DDIMPipeline(unet=float_boundary(unet) if opts.bf16 else unet,
                         scheduler=DDIMScheduler.from_config(scheduler.config))
    stock.set_progress_bar_config(disable=True)
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(opts.steps)
    timesteps = ddim.timesteps.to(device)

    def generator() -> torch.Generator:
        return torch.Generator(device).manual_seed(opts.seed)

    @torch.inference_mode()
    def bare() -> torch.Tensor:
        x = torch.randn(shape, device=device, dtype=dtype, generator=generator())
        for t in timesteps:
            x = fast(x, t).sample
        return x

    runners: dict[str, Callable[[], Any]] = {
        "punkdiff": lambda: punkdiff(batch_size=batch, generator=generator(), num_inference_steps=opts.steps,
                                     sampler="ddim", output_type="np").images,
        "bare": bare,
        "stock": lambda: stock(batch_size=batch, generator=generator(), num_inference_steps=opts.steps, eta=0.0,
                               output_type="np").images,
    }
    if "ddpm-pytorch" in wanted:
        from denoising_diffusion_pytorch import GaussianDiffusion

        peer = GaussianDiffusion(ddpm_pytorch_unet(preset), image_size=preset.data.resolution,
                                 timesteps=preset.scheduler.num_train_timesteps, sampling_timesteps=opts.steps,
                                 objective="pred_noise", beta_schedule="linear").to(device).eval()
        flops["ddpm-pytorch"] = flops_per_image(lambda: peer.model(x1.float(), torch.tensor([500], device=device)), 1)

        def ddpm_pytorch() -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=opts.bf16):
                return peer.sample(batch_size=batch)

        runners["ddpm-pytorch"] = ddpm_pytorch
    return {k: v for k, v in runners.items() if k in wanted}, flops


def float_boundary(unet: torch.nn.Module) -> torch.nn.Module:
    """A copy of a bf16 UNet that takes and returns float32, for stock `DDIMPipeline`: it keeps its sample in the
    UNet's dtype and turns it into numpy at the end, which has no bf16. The forward runs in bf16 as before; each step
    adds two casts, and the scheduler's arithmetic runs in float32."""
    from diffusers.models.unets.unet_2d import UNet2DOutput

    boundary = copy.deepcopy(unet)
    boundary.register_forward_pre_hook(lambda module, args: (args[0].to(module.dtype), *args[1:]))
    boundary.register_forward_hook(lambda module, args, output: UNet2DOutput(sample=output.sample.float()))
    return boundary


def same_images(runners: dict[str, Callable[[], Any]]) -> float | None:
    """Max |punkdiff - stock| over the images of one call each (None unless both run)."""
    if "punkdiff" not in runners or "stock" not in runners:
        return None
    return float(np.abs(runners["punkdiff"]() - runners["stock"]()).max())


def bench_case(name: str, batch: int, opts: Options, wanted: list[str], count: int | None,
               log: Callable[[str], None]) -> dict[str, Any]:
    runners, flops = contenders_for(name, batch, opts, wanted)
    for run in runners.values():  # warm-up (compiles, captures graphs)
        run()
    times: dict[str, list[float]] = {c: [] for c in runners}
    cpu_times: dict[str, list[float]] = {c: [] for c in runners}  # CPU: this process's CPU time, steady under load
    for repeat in range(opts.repeats):
        for contender in rotated(list(runners), repeat):
            seconds, cpu_seconds, _ = timed_cpu(runners[contender])
            times[contender].append(seconds)
            cpu_times[contender].append(cpu_seconds)
            log(f"  {name} batch {batch} repeat {repeat + 1}/{opts.repeats} {contender:<13} "
                f"{1e3 * seconds / opts.steps:8.1f} ms/step, {1e3 * cpu_seconds / opts.steps:8.1f} CPU ms/step")
    exact = not (opts.bf16 or opts.compile or opts.channels_last)
    cpu = opts.device == "cpu"
    result: dict[str, Any] = {
        "config": name,
        "batch_size": batch,
        "steps": opts.steps,
        "gflop_per_image_forward": {k: v / 1e9 for k, v in flops.items()},
        # fp32 eager only: otherwise the two run different kernels (compiled, bf16) and differ by rounding
        "max_abs_diff_punkdiff_vs_stock": same_images(runners) if exact else None,
        "contenders": {},
    }
    for contender, values in times.items():
        entry: dict[str, Any] = {
            "ms_per_step": summary([1e3 * s / opts.steps for s in values]),
            "images_per_s": summary([batch / s for s in values]),
            "cpu_ms_per_step": summary([1e3 * s / opts.steps for s in cpu_times[contender]]) if cpu else None,
        }
        for reference in ("bare", "stock"):
            if reference in times and reference != contender:
                entry[f"time_over_{reference}"] = summary([a / b for a, b in zip(values, times[reference],
                                                                                   strict=True)])
                if cpu:
                    entry[f"cpu_time_over_{reference}"] = summary(
                        [a / b for a, b in zip(cpu_times[contender], cpu_times[reference], strict=True)])
        result["contenders"][contender] = entry
    if count:
        seconds, made = timed(lambda: sample_many(runners["punkdiff"], batch, count))
        result["count"] = {"requested": count, "images": made, "seconds": seconds, "images_per_s": made / seconds}
        log(f"  {name}: {made} images in {seconds:.1f} s")
    return result


def sample_many(run: Callable[[], Any], batch: int, count: int) -> int:
    """Call a batch sampler until `count` images exist (the last batch whole: shapes stay fixed for CUDA graphs)."""
    made = 0
    while made < count:
        made += len(run())
    return made


def table(results: list[dict[str, Any]]) -> str:
    header = (f"{'config':<16} {'batch':>5} {'contender':<13} {'ms/step':>9} {'min-max':>13} {'img/s':>9} "
              f"{'/bare':>6} {'/stock':>6} {'CPU ms/step':>11} {'/bare':>6} {'/stock':>6}")
    rows = [header, "-" * len(header)]
    keys = ("time_over_bare", "time_over_stock", "cpu_time_over_bare", "cpu_time_over_stock")
    for r in results:
        for name, c in r["contenders"].items():
            s = c["ms_per_step"]
            ratios = [f"{c[k]['median']:.3f}" if k in c else "-" for k in keys]
            spread = f"{s['min']:.1f}-{s['max']:.1f}"
            cpu = "-" if c["cpu_ms_per_step"] is None else f"{c['cpu_ms_per_step']['median']:.2f}"
            rows.append(f"{r['config']:<16} {r['batch_size']:>5} {name:<13} {s['median']:>9.2f} {spread:>13} "
                        f"{c['images_per_s']['median']:>9.1f} {ratios[0]:>6} {ratios[1]:>6} {cpu:>11} "
                        f"{ratios[2]:>6} {ratios[3]:>6}")
        if r["max_abs_diff_punkdiff_vs_stock"] is not None:
            rows.append(f"{'':<16} {'':>5} punkdiff vs stock, same noise: max |diff| "
                        f"{r['max_abs_diff_punkdiff_vs_stock']:.1e}")
        if "count" in r:
            rows.append(f"{'':<16} {'':>5} {r['count']['images']} images with punkdiff in "
                        f"{r['count']['seconds']:.1f} s")
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="shorthand: --device cuda --presets celeba-64 punks-32 "
                   "--batch-sizes 16 256 --bf16 --channels-last --compile")
    p.add_argument("--device", default="cpu")
    p.add_argument("--presets", nargs="+", default=["mnist-32-bench"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[16])
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--count", type=int, help="also time this many images with punkdiff (e.g. 10000)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch threads (0: torch's default; default: 1 on CPU, the steadiest "
                   "on a shared machine, torch's default on CUDA)")
    p.add_argument("--max-load", type=float, default=1.5)
    p.add_argument("--wait-s", type=float, default=0.0, help="wait up to this long for the load to drop first")
    p.add_argument("--out", type=Path, help="JSON (default benchmarks/results/sample-<device>.json)")
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = 0 if args.gpu or args.device.startswith("cuda") else 1
    if args.gpu:
        args.device, args.bf16, args.channels_last, args.compile = "cuda", True, True, True
        if args.presets == ["mnist-32-bench"]:
            args.presets = ["celeba-64", "punks-32"]
        if args.batch_sizes == [16]:
            args.batch_sizes = [16, 256]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wanted = prepare_run(args.device, args.threads, args.contenders)
    opts = Options(args.device, args.bf16, args.channels_last, args.compile, args.steps, args.repeats)

    load_start = wait_for_quiet(args.max_load, args.wait_s, log)
    info = machine(torch.device(args.device))
    wall = time.perf_counter()
    results = [bench_case(name, batch, opts, wanted, args.count, log)
               for name in args.presets for batch in args.batch_sizes]
    info["loadavg_start"], info["loadavg_end"] = load_start, os.getloadavg()[0]
    report = {"benchmark": f"DDIM-{opts.steps} sampling: punkdiff vs bare UNet forwards vs stock DDIMPipeline "
                           "vs ddpm-pytorch", "options": asdict(opts), "machine": info,
              "wall_s": time.perf_counter() - wall, "results": results}
    out = args.out or RESULTS / f"sample-{torch.device(args.device).type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(results))
    mode = ("bf16" if opts.bf16 else "fp32") + (", channels_last" if opts.channels_last else "") + (
        ", compiled" if opts.compile else "")
    print(f"\nDDIM-{opts.steps}, eta 0; {mode}; 1 warm-up call, {opts.repeats} interleaved repeats, medians; "
          f"torch threads {info['torch_threads']}; load {info['loadavg_start']:.2f} -> {info['loadavg_end']:.2f}; "
          f"wall {report['wall_s']:.0f} s; JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
