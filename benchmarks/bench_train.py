"""Training images/s: punkdiff's loop vs the diffusers recipe, a bare loop (the ceiling) and ddpm-pytorch.

Per configuration (a preset, or `mnist-32-bench`: a 1.62 M-parameter UNet on MNIST at 32 px, batch 64), on one
machine, with the same `UNet2DModel` config, data, batch size and precision for all:

- punkdiff: `training/train.py`'s `run()` itself (the real loop: Accelerate, EMA, clipping, LR schedule), on the
  preset's offline mirror through punkdiff's cached uint8 tensors;
- recipe: a minimal reproduction, labelled as such, of diffusers' documented `train_unconditional.py` recipe: a
  `DataLoader` over a `datasets` dataset with torchvision transforms per item, a plain AdamW loop with Accelerate,
  `EMAModel`, clipping, a cosine schedule and `loss.item()` logged every step, as the example does;
- bare: the same math with nothing else (the ceiling): images resident as one uint8 tensor on the device, batches
  sliced from a device-side permutation, AdamW (fused on CUDA), clipping, an EMA lerp; no logging, no host sync;
- ddpm-pytorch: `denoising-diffusion-pytorch`'s own `Trainer` (from PyPI, `pip install -e '.[bench]'`) with its
  `Unet(dim=c0, dim_mults=channels / c0)`, the closest size to ours (FLOPs per image are reported beside).

A quiet machine first: the benchmark waits (up to `--wait-s`) for the 1-minute load average to drop to `--max-load`
(0.5), samples it after every run, and refuses to report ratios (exit status 3, `ratios_refused` in the JSON) when
the load was above that at the start or rose above `--max-load` + its own threads + 0.5 during the run (another job
shared the cores). A run of fewer than 20 timed steps or 3 repeats is a smoke run, which neither waits nor
reports a checked ratio; nor do `--skip-load-wait` and a GPU (CUDA events do not depend on the host's load).
`--threads 1 2` and `--precision fp32 bf16` measure each combination in turn (on a CPU without native bf16
punkdiff trains float32, as the loop decides, and the bf16 ratios are not reported).

Every contender runs `--warmup-steps + --steps` optimizer steps; images/s is measured between the end of the last
warm-up step and the end of the last step by one global optimizer post-step hook (`benchlib.StepClock`: host clock
on CPU, CUDA events on a GPU), so set-up, compilation and what a loop does after its last step are outside it.
Contenders are interleaved (order rotated each repeat) and medians of repeats reported; ratios are the medians of
per-repeat ratios. On CPU also images per second of the process's CPU time (`img/cpu-s`), which another job on
a shared machine does not inflate (ddpm-pytorch's DataLoader workers are other processes: their decoding is not
counted, which flatters it). On CUDA also: model FLOPs utilisation against the GPU's bf16 dense peak, peak memory
per contender, and (`--memory`) the largest batch that fits.

    .venv/bin/python benchmarks/bench_train.py                 # CPU, mnist-32-bench, 1 thread, fp32
    .venv/bin/python benchmarks/bench_train.py --contenders punkdiff bare --threads 1 2 --precision fp32 bf16
    python benchmarks/bench_train.py --gpu                     # = --device cuda --presets celeba-64 punks-32
                                                               #   --bf16 --channels-last --compile --memory
"""

from __future__ import annotations

import argparse
import gc
import io
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from benchlib import (
    DEFAULT_DATASETS,
    RESULTS,
    LoadWatch,
    StepClock,
    add_load_arguments,
    bench_preset,
    bf16_peak_tflops,
    ddpm_pytorch_unet,
    diffusers_example_loader,
    flops_per_image,
    log,
    machine,
    mirror,
    prepare_run,
    preset_flags,
    require,
    reset_accelerate,
    rotated,
    summary,
)

from punkdiff.data import load_training_images
from punkdiff.precision import cpu_has_native_bf16
from punkdiff.presets import Preset

CONTENDERS = ("punkdiff", "recipe", "bare", "ddpm-pytorch")


@dataclass(frozen=True)
class Options:
    """What every contender of one run shares."""

    device: str
    bf16: bool
    channels_last: bool
    compile: bool
    warmup_steps: int
    steps: int
    repeats: int
    seed: int = 0


@dataclass
class Case:
    """One configuration: the preset, its mirror, the batch, a scratch folder, and the decoded images."""

    name: str
    preset: Preset
    data_dir: Path
    batch_size: int
    workdir: Path
    images: torch.Tensor  # uint8 [N, C, H, W], decoded once by punkdiff (not timed)
    image_folder: Path | None = None  # the raw files, for ddpm-pytorch's folder dataset


# ---- the contenders: each runs `steps` optimizer steps ---------------------------------------------------


def run_punkdiff(case: Case, opts: Options, steps: int) -> None:
    """punkdiff's own loop, through the same parser as `accelerate launch training/train.py`."""
    from punkdiff.scripts.train import main as train_main

    out = Path(tempfile.mkdtemp(prefix="punkdiff-", dir=case.workdir))
    flags = [
        *preset_flags(case.name), "--dataset", str(case.data_dir), "--cache-dir", str(case.workdir / "cache"),
        "--output-dir", str(out), "--max-steps", str(steps), "--batch-size", str(case.batch_size),
        "--seed", str(opts.seed), "--report-to", "none", "--mixed-precision", "bf16" if opts.bf16 else "no",
        "--checkpoint-every", str(10**9), "--sample-every", str(10**9),
        # the final grid comes after the last timed step; keep it cheap anyway
        "--set", "train.num_sample_images=1", "--set", "train.sample_inference_steps=1",
    ]
    if opts.channels_last:
        flags.append("--channels-last")
    if opts.compile:
        flags.append("--compile")
    reset_accelerate()
    require(train_main(flags) == 0, f"punkdiff's loop failed ({' '.join(flags)})")
    shutil.rmtree(out, ignore_errors=True)


def run_recipe(case: Case, opts: Options, steps: int) -> None:
    """REPRODUCTION (minimal) of diffusers' examples/unconditional_image_generation/train_unconditional.py."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    preset, cfg = case.preset, case.preset.train
    reset_accelerate()
    accelerator = Accelerator(mixed_precision="bf16" if opts.bf16 else "no", cpu=opts.device == "cpu")
    loader, _ = diffusers_example_loader(case.data_dir, preset.data, case.batch_size, opts.seed)
    model = UNet2DModel(**preset.model.unet_config())
    noise_scheduler = DDPMScheduler(**preset.scheduler.ddpm_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=steps)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, inv_gamma=cfg.ema_inv_gamma,
                   power=cfg.ema_power, model_cls=UNet2DModel, model_config=model.config)
    ema.to(accelerator.device)
    step = 0
    while step < steps:
        for batch in loader:
            clean = batch["input"]
            noise = torch.randn(clean.shape, device=clean.device)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],),
                                      device=clean.device).long()
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            with accelerator.accumulate(model):
                pred = model(noisy, timesteps).sample
                loss = F.mse_loss(pred.float(), noise.float())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                ema.step(model.parameters())
                step += 1
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0], "step": step}
            accelerator.log(logs, step=step)
            if step >= steps:
                break
    accelerator.end_training()


def run_bare(case: Case, opts: Options, steps: int, batch_size: int | None = None, compile: bool | None = None) -> None:
    """The ceiling: the same math, data resident on the device, no logging, no host synchronisation."""
    from diffusers import DDPMScheduler, UNet2DModel

    preset, cfg = case.preset, case.preset.train
    device = torch.device(opts.device)
    batch = batch_size or case.batch_size
    unet = UNet2DModel(**preset.model.unet_config()).to(device).train()
    if opts.channels_last:
        unet.to(memory_format=torch.channels_last)
    forward = torch.compile(unet) if (opts.compile if compile is None else compile) else unet
    scheduler = DDPMScheduler(**preset.scheduler.ddpm_config())
    params = list(unet.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon,
                                  fused=device.type == "cuda")
    ema = [p.detach().clone() for p in params]
    images = case.images.to(device)
    generator = torch.Generator(device).manual_seed(opts.seed)
    per_epoch = len(images) // batch
    require(per_epoch > 0, f"{len(images)} images are fewer than one batch of {batch}")
    for step in range(steps):
        i = step % per_epoch
        if i == 0:
            order = torch.randperm(len(images), device=device, generator=generator)
        x = bare_batch(images, order[i * batch:(i + 1) * batch], preset.data.random_flip, opts.channels_last,
                       generator)
        noise = torch.randn(x.shape, device=device, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device,
                                  generator=generator)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=opts.bf16):
            loss = bare_loss(forward, scheduler, x, noise, timesteps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bare_ema(ema, params, cfg.ema_decay)


def bare_batch(images: torch.Tensor, rows: torch.Tensor, random_flip: bool, channels_last: bool,
               generator: torch.Generator) -> torch.Tensor:
    """The bare loop's x_0: one gather of uint8 rows, scaled to [-1, 1], flipped per image."""
    x = images[rows].float().div_(127.5).sub_(1.0)
    if random_flip:
        flip = torch.rand(len(rows), 1, 1, 1, device=x.device, generator=generator) < 0.5
        x = torch.where(flip, x.flip(-1), x)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def bare_loss(forward: Callable[..., Any], scheduler: Any, x: torch.Tensor, noise: torch.Tensor,
              timesteps: torch.Tensor) -> torch.Tensor:
    """The bare loop's epsilon-prediction MSE (named, so that `profile_step.py` can attribute its time)."""
    pred = forward(scheduler.add_noise(x, noise, timesteps), timesteps).sample
    return F.mse_loss(pred.float(), noise)


def bare_ema(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """The bare loop's EMA: one in-place lerp of every parameter."""
    torch._foreach_lerp_(ema, params, 1.0 - decay)


def run_ddpm_pytorch(case: Case, opts: Options, steps: int) -> None:
    """denoising-diffusion-pytorch 2.x's `Trainer`, as its README runs it (FID off: it would download Inception)."""
    from denoising_diffusion_pytorch import GaussianDiffusion, Trainer

    preset = case.preset
    diffusion = GaussianDiffusion(ddpm_pytorch_unet(preset), image_size=preset.data.resolution,
                                  timesteps=preset.scheduler.num_train_timesteps, objective="pred_noise",
                                  beta_schedule="linear")
    results = Path(tempfile.mkdtemp(prefix="ddpm-pytorch-", dir=case.workdir))
    reset_accelerate()
    trainer = Trainer(diffusion, str(case.image_folder), train_batch_size=case.batch_size,
                      train_lr=preset.train.learning_rate, train_num_steps=steps,
                      augment_horizontal_flip=preset.data.random_flip, save_and_sample_every=10**9,
                      results_folder=str(results), amp=opts.bf16, mixed_precision_type="bf16", calculate_fid=False)
    trainer.train()
    del trainer  # its DataLoader workers end with it
    gc.collect()
    shutil.rmtree(results, ignore_errors=True)


RUNNERS: dict[str, Callable[[Case, Options, int], None]] = {
    "punkdiff": run_punkdiff, "recipe": run_recipe, "bare": run_bare, "ddpm-pytorch": run_ddpm_pytorch,
}


# ---- measuring -------------------------------------------------------------------------------------------


def export_image_files(case: Case) -> Path:
    """The mirror's images as files (bytes unchanged), for ddpm-pytorch's folder dataset."""
    import datasets
    from PIL import Image

    from punkdiff.data import find_image_column

    folder = case.workdir / "images"
    folder.mkdir(exist_ok=True)
    dataset = datasets.load_dataset(str(case.data_dir), split="train")
    column = find_image_column(dataset.features)
    raw = dataset.cast_column(column, datasets.Image(decode=False))
    count = min(len(raw), case.preset.data.max_samples or len(raw))
    for index, item in enumerate(raw.select(range(count))[column]):
        kind = Image.open(io.BytesIO(item["bytes"])).format.lower()
        (folder / f"{index:06d}.{kind}").write_bytes(item["bytes"])
    return folder


def training_flops(case: Case, opts: Options, contender: str) -> float:
    """FLOPs per image of one forward + backward of the contender's network (2 per multiply-add)."""
    preset = case.preset
    device = torch.device(opts.device)
    shape = (2, preset.data.channels, preset.data.resolution, preset.data.resolution)
    x, t = torch.randn(shape, device=device), torch.tensor([10, 500], device=device)
    if contender == "ddpm-pytorch":
        net = ddpm_pytorch_unet(preset).to(device)
        return flops_per_image(lambda: net(x, t).square().mean().backward(), 2)
    from diffusers import UNet2DModel

    net = UNet2DModel(**preset.model.unet_config()).to(device)
    return flops_per_image(lambda: net(x, t).sample.square().mean().backward(), 2)


def measure(case: Case, opts: Options, contender: str) -> dict[str, float | None]:
    """One timed run: images/s after warm-up, and the peak device memory (CUDA)."""
    device = torch.device(opts.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with StepClock(device) as clock:
        RUNNERS[contender](case, opts, opts.warmup_steps + opts.steps)
    rate = clock.images_per_second(opts.warmup_steps, case.batch_size)
    cpu_rate = clock.images_per_second(opts.warmup_steps, case.batch_size, per="cpu")
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"images_per_s": rate, "images_per_cpu_s": cpu_rate, "peak_memory_mib": peak}


def largest_batch(case: Case, opts: Options, limit: int = 1 << 15) -> dict[str, Any]:
    """The largest batch whose bare training step fits on the GPU (eager: compiling each probe would take minutes).

    Doubles from the preset's batch until out of memory, then bisects to within 1/16.
    """
    device = torch.device(opts.device)

    def fits(batch: int) -> float | None:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        tiles = -(-batch // len(case.images))  # so that a batch that large exists
        try:
            run_bare(replace(case, images=case.images.repeat(tiles, 1, 1, 1)), opts, 2, batch, False)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated(device) / 2**20
        except torch.OutOfMemoryError:
            return None

    good, peak, bad = 0, None, None
    batch = case.batch_size
    while batch <= limit:
        result = fits(batch)
        if result is None:
            bad = batch
            break
        good, peak, batch = batch, result, batch * 2
    while bad is not None and bad - good > max(1, good // 16):
        middle = (good + bad) // 2
        result = fits(middle)
        good, peak, bad = (middle, result, bad) if result is not None else (good, peak, middle)
    return {"largest_batch": good, "peak_memory_mib": peak, "capped_at": limit if bad is None else None}


def bench_case(name: str, opts: Options, contenders: list[str], args: argparse.Namespace,
               log: Callable[[str], None], watch: LoadWatch) -> dict[str, Any]:
    preset = bench_preset(name)
    data_dir = mirror(preset, args.datasets_root)
    batch_size = args.batch_size or preset.train.batch_size
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        workdir = Path(tmp)
        images = load_training_images(str(data_dir), preset.data, cache_dir=workdir / "cache", progress=False)
        case = Case(name, preset, data_dir, batch_size, workdir, images.images.clone())
        if "ddpm-pytorch" in contenders:
            case.image_folder = export_image_files(case)
        unet_flops = training_flops(case, opts, "bare")  # punkdiff, recipe and bare train the same UNet
        flops = {c: training_flops(case, opts, c) if c == "ddpm-pytorch" else unet_flops for c in contenders}
        log(f"{name}: {len(images)} images, batch {batch_size}, {unet_flops / 1e9:.2f} GFLOP/image (fwd+bwd)")
        runs: dict[str, list[dict[str, float | None]]] = {c: [] for c in contenders}
        for repeat in range(opts.repeats):
            for contender in rotated(contenders, repeat):
                result = measure(case, opts, contender)
                runs[contender].append(result)
                cpu = "" if result["images_per_cpu_s"] is None else f", {result['images_per_cpu_s']:8.1f} img/cpu-s"
                log(f"  repeat {repeat + 1}/{opts.repeats} {contender:<13} {result['images_per_s']:8.1f} img/s{cpu}, "
                    f"load {watch.sample():.2f}")
        memory = largest_batch(case, opts) if args.memory and opts.device.startswith("cuda") else None
    return case_result(case, opts, runs, flops, memory)


def case_result(case: Case, opts: Options, runs: dict[str, list[dict[str, float | None]]],
                flops: dict[str, float], memory: dict[str, Any] | None) -> dict[str, Any]:
    """Medians, per-repeat ratios (each contender over bare and over recipe), MFU where the peak is known."""
    _, peak_tflops = bf16_peak_tflops(torch.device(opts.device))
    rates = {c: [r["images_per_s"] for r in rs] for c, rs in runs.items()}
    cpu_rates = {c: [r["images_per_cpu_s"] for r in rs] for c, rs in runs.items()}
    contenders = {}
    for contender, values in rates.items():
        median = statistics.median(values)
        entry: dict[str, Any] = {
            "images_per_s": summary(values),
            # CPU only: images per second of this process's CPU time, steady whatever else loads the machine
            "images_per_cpu_s": summary(cpu_rates[contender]) if None not in cpu_rates[contender] else None,
            "gflop_per_image_fwd_bwd": flops[contender] / 1e9,
            "peak_memory_mib": max((r["peak_memory_mib"] or 0 for r in runs[contender]), default=None) or None,
            "mfu": flops[contender] * median / (peak_tflops * 1e12) if peak_tflops else None,
        }
        for reference in ("bare", "recipe"):
            if reference in rates and reference != contender:
                entry[f"ratio_over_{reference}"] = summary(
                    [a / b for a, b in zip(values, rates[reference], strict=True)])
                if entry["images_per_cpu_s"] is not None:
                    entry[f"cpu_ratio_over_{reference}"] = summary(
                        [a / b for a, b in zip(cpu_rates[contender], cpu_rates[reference], strict=True)])
        contenders[contender] = entry
    return {
        "config": case.name,
        "preset": case.preset.to_dict(),
        "dataset": str(case.data_dir),
        "images": len(case.images),
        "batch_size": case.batch_size,
        "contenders": contenders,
        "memory": memory,
    }


# ---- report ----------------------------------------------------------------------------------------------


def table(results: list[dict[str, Any]], show_ratios: bool = True) -> str:
    """One row per configuration and contender: median images/s (min-max), ratios (`-` where refused), GFLOP, MFU,
    memory; then punkdiff/bare per repeat."""
    header = (f"{'config':<26} {'contender':<13} {'img/s':>9} {'min-max':>15} {'/bare':>6} {'/recipe':>7} "
              f"{'img/cpu-s':>9} {'/bare':>6} {'/recipe':>7} {'GFLOP/img':>9} {'MFU':>6} {'peak MiB':>9}")
    rows = [header, "-" * len(header)]
    keys = ("ratio_over_bare", "ratio_over_recipe", "cpu_ratio_over_bare", "cpu_ratio_over_recipe")
    for r in results:
        shown = show_ratios and r.get("ratios_comparable", True)
        for name, c in r["contenders"].items():
            s = c["images_per_s"]
            ratios = [f"{c[k]['median']:.3f}" if k in c and shown else "-" for k in keys]
            spread = f"{s['min']:.1f}-{s['max']:.1f}"
            cpu = "-" if c["images_per_cpu_s"] is None else f"{c['images_per_cpu_s']['median']:.1f}"
            mfu = "-" if c["mfu"] is None else f"{100 * c['mfu']:.1f}%"
            memory = "-" if c["peak_memory_mib"] is None else f"{c['peak_memory_mib']:.0f}"
            rows.append(
                f"{setting(r):<26} {name:<13} {s['median']:>9.1f} {spread:>15} {ratios[0]:>6} {ratios[1]:>7} "
                f"{cpu:>9} {ratios[2]:>6} {ratios[3]:>7} {c['gflop_per_image_fwd_bwd']:>9.2f} {mfu:>6} {memory:>9}"
            )
        ratio = r["contenders"].get("punkdiff", {}).get("ratio_over_bare")
        if ratio and shown:
            rows.append(f"{setting(r):<26} punkdiff/bare per repeat: {', '.join(f'{x:.3f}' for x in ratio['runs'])}; "
                        f"median {ratio['median']:.3f}")
        if r["memory"]:
            m = r["memory"]
            capped = f", capped at {m['capped_at']}" if m["capped_at"] else ""
            rows.append(f"{setting(r):<26} largest batch that fits (bare, eager): {m['largest_batch']} "
                        f"({m['peak_memory_mib']:.0f} MiB){capped}")
    return "\n".join(rows)


def setting(result: dict[str, Any]) -> str:
    """`config threads precision`, e.g. `mnist-32-bench 2t fp32`."""
    return f"{result['config']} {result.get('threads', '?')}t {result.get('precision', '')}".strip()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="shorthand: --device cuda --presets celeba-64 punks-32 --bf16 "
                   "--channels-last --compile --memory")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--presets", nargs="+", default=["mnist-32-bench"], help="presets or benchlib.CONFIGS names")
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    p.add_argument("--batch-size", type=int, help="default: each preset's own")
    p.add_argument("--bf16", action="store_true", help="shorthand for --precision bf16")
    p.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), help="one measurement per value (default "
                   "fp32; bf16: autocast for every contender, skipped on a CPU without native bf16)")
    p.add_argument("--channels-last", action="store_true", help="channels_last for punkdiff and bare")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet for punkdiff and bare")
    p.add_argument("--memory", action="store_true", help="CUDA: also find the largest batch that fits")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (ratios: median of per-repeat ratios)")
    p.add_argument("--threads", type=int, nargs="+", help="torch threads, one measurement per value (0: torch's "
                   "default; default: 1 on CPU, torch's default on CUDA)")
    add_load_arguments(p, "ratios")
    p.add_argument("--datasets-root", type=Path, default=DEFAULT_DATASETS)
    p.add_argument("--out", type=Path, help="JSON (default benchmarks/results/train-<device>.json)")
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = [0 if args.gpu or args.device.startswith("cuda") else 1]
    if args.gpu:
        args.device, args.bf16, args.channels_last, args.compile, args.memory = "cuda", True, True, True, True
    if args.precision is None:
        args.precision = ["bf16" if args.bf16 else "fp32"]
    if args.device.startswith("cuda"):  # CUDA events time the device: the host's load is recorded, not waited for
        args.skip_load_wait = True
        if args.presets == ["mnist-32-bench"]:
            args.presets = ["celeba-64", "punks-32"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    contenders = prepare_run(args.device, 0, args.contenders)
    base = Options(args.device, False, args.channels_last, args.compile, args.warmup_steps, args.steps, args.repeats)

    # fewer than 20 timed steps or 3 repeats is a smoke run, whose ratios are no measurement: no wait for it
    smoke = args.steps < 20 or args.repeats < 3
    watch = LoadWatch(args.max_load, args.wait_s, log, checked=not (args.skip_load_wait or smoke),
                      unchecked_because="a smoke run: fewer than 20 timed steps or 3 repeats" if smoke and not
                      args.skip_load_wait else "--skip-load-wait").wait()
    info = machine(torch.device(args.device))
    log(f"bench_train: {info['platform']}, {info['device']}, load {watch.start:.2f}")
    wall, results, own_threads = time.perf_counter(), [], 1
    for threads in args.threads:
        if threads:
            torch.set_num_threads(threads)
        own_threads = max(own_threads, torch.get_num_threads())
        for precision in args.precision:
            bf16 = precision == "bf16"
            # without native bf16 punkdiff trains float32 (as a user's run would) while the others emulate bf16
            comparable = not (bf16 and args.device == "cpu" and not cpu_has_native_bf16())
            if not comparable:
                log("bf16 on a CPU without native bf16 (AVX-512 BF16 or AMX): punkdiff trains float32, the others "
                    "emulate bf16; their ratios are not reported")
            opts = replace(base, bf16=bf16)
            for name in args.presets:
                result = bench_case(name, opts, contenders, args, log, watch)
                results.append({**result, "threads": torch.get_num_threads(), "precision": precision,
                                "ratios_comparable": comparable})
    info.update(watch.record())
    refused = watch.refusal(own_threads)
    report = {"benchmark": "training images/s: punkdiff vs diffusers recipe (reproduction) vs bare vs ddpm-pytorch",
              "options": asdict(base), "contenders": contenders, "machine": info,
              "wall_s": time.perf_counter() - wall, "ratios_refused": refused, "results": results}
    out = args.out or RESULTS / f"train-{torch.device(args.device).type}.json"
    note = (f"\n{base.warmup_steps} warm-up + {base.steps} timed steps per run, {base.repeats} interleaved repeats, "
            f"medians; ratios are medians of per-repeat ratios."
            f"{' channels_last;' if base.channels_last else ''}{' compile;' if base.compile else ''} "
            f"load {watch.start:.2f} -> {info['loadavg_end'] or 0:.2f} (peak {max(watch.samples, default=0):.2f}); "
            f"wall {report['wall_s']:.0f} s; JSON: {out}")
    return watch.report(out, report, table(results, show_ratios=refused is None or not watch.checked), note, refused,
                        "ratios")

if __name__ == "__main__":
    sys.exit(main())
