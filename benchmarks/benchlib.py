"""What the benchmark scripts share: the configurations they run, the peers' data path, clocks, FLOPs, the machine.

Not part of the package: `bench_data.py`, `bench_train.py` and `bench_sample.py` import it from this folder.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from punkdiff.presets import DataSpec, Preset, apply_overrides, get_preset

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATASETS = Path(os.environ.get("PUNKDIFF_SHARED_DATASETS", REPO.parent / "shared" / "datasets"))
RESULTS = REPO / "benchmarks" / "results"
# a preset's Hub dataset -> the folder of its offline mirror under the datasets root
MIRRORS = {"ylecun/mnist": "mnist", "huggingnft/cryptopunks": "cryptopunks", "nielsr/CelebA-faces": "celeba-faces"}

# Configurations that are not presets, as a preset plus overrides. `mnist-32-bench` is the UNet the training and
# sampling comparisons share: channels 32/64/64, 2 layers per block, attention at the middle (16 px) level and in
# the mid block, 1.62 M parameters, 0.75 GFLOP per image forward, MNIST at 32 px, batch 64.
CONFIGS: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    "mnist-32-bench": ("mnist-baseline-16", {
        "name": "mnist-32-bench",
        "model": {"sample_size": 32, "layers_per_block": 2, "attention_resolutions": (16,), "mid_attention": True,
                  "norm_num_groups": 32},
        "data": {"resolution": 32},
        "train": {"batch_size": 64},
    }),
    "mnist-32-tiny": ("mnist-baseline-16", {  # the CI smoke: same code paths, a UNet small enough for seconds
        "name": "mnist-32-tiny",
        "model": {"sample_size": 32, "block_out_channels": (8, 16), "layers_per_block": 1,
                  "attention_resolutions": (16,), "norm_num_groups": 4},
        "data": {"resolution": 32, "max_samples": 256},
        "train": {"batch_size": 16},  # denoising-diffusion-pytorch asks for >= 16
    }),
}


def bench_preset(name: str) -> Preset:
    """A named preset, or one of `CONFIGS`, validated."""
    if name in CONFIGS:
        base, overrides = CONFIGS[name]
        return apply_overrides(get_preset(base), overrides).validate()
    return get_preset(name).validate()


def preset_flags(name: str) -> list[str]:
    """`--preset/--set` flags that make punkdiff's own parser build `bench_preset(name)`."""
    if name not in CONFIGS:
        return ["--preset", name]
    base, overrides = CONFIGS[name]
    flags = ["--preset", base]
    for section, values in overrides.items():
        if section == "name":
            continue
        for key, value in values.items():
            text = f"[{','.join(map(str, value))}]" if isinstance(value, tuple) else str(value).lower() \
                if isinstance(value, bool) else str(value)
            flags += ["--set", f"{section}.{key}={text}"]
    return flags


def mirror(preset: Preset, root: Path) -> Path:
    """The offline mirror of the preset's dataset under `root`; exits with the fix if it is missing."""
    path = root / MIRRORS.get(str(preset.data.dataset), "")
    if preset.data.dataset not in MIRRORS or not path.is_dir():
        raise SystemExit(f"no offline mirror of {preset.data.dataset} under {root} "
                         "(pass --datasets-root or set PUNKDIFF_SHARED_DATASETS)")
    return path


# ---- the peers' data path -------------------------------------------------------------------------------


def diffusers_example_loader(
    path: Path, spec: DataSpec, batch_size: int, seed: int = 0, shuffle: bool = True, flip: bool | None = None
) -> tuple[torch.utils.data.DataLoader, int]:
    """The data path of diffusers' `train_unconditional.py`, matched to the spec's resolution and channels.

    `load_dataset`, torchvision `Resize/Crop/Flip/ToTensor/Normalize` per item through `set_transform`,
    `DataLoader(shuffle=True, num_workers=0)` (the example's default), so PIL decodes every image every step.
    Returns `(loader, arrow_bytes)`; each batch is `{"input": float [B, C, H, W] in [-1, 1]}`.
    """
    import datasets
    from torchvision import transforms

    from punkdiff.data import find_image_column

    dataset = datasets.load_dataset(str(path), split="train")
    if spec.max_samples is not None:
        dataset = dataset.select(range(min(spec.max_samples, len(dataset))))
    arrow_bytes = sum(os.path.getsize(f["filename"]) for f in dataset.cache_files)
    column = find_image_column(dataset.features)
    mode = "L" if spec.channels == 1 else "RGB"
    flip = spec.random_flip if flip is None else flip
    res = spec.resolution
    augmentations = transforms.Compose(
        [
            transforms.Resize(res, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(res) if spec.center_crop else transforms.RandomCrop(res),
            transforms.RandomHorizontalFlip() if flip else transforms.Lambda(lambda x: x),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )

    def transform_images(examples: dict[str, list]) -> dict[str, list[torch.Tensor]]:
        return {"input": [augmentations(image.convert(mode)) for image in examples[column]]}

    dataset.set_transform(transform_images)
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=0, generator=generator
    )
    return loader, arrow_bytes


def ddpm_pytorch_unet(preset: Preset):
    """denoising-diffusion-pytorch's `Unet` closest to the preset's: the same channels per level."""
    from denoising_diffusion_pytorch import Unet

    channels = preset.model.block_out_channels
    return Unet(dim=channels[0], dim_mults=tuple(c // channels[0] for c in channels), channels=preset.data.channels)


# ---- measuring ------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """`(seconds, result)` of one call (on CUDA, after the queued work has finished)."""
    seconds, _, result = timed_cpu(fn)
    return seconds, result


def timed_cpu(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """`(wall seconds, CPU seconds of this process, result)` of one call (on CUDA, after the queued work)."""
    synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    synchronize()
    return time.perf_counter() - start, time.process_time() - cpu, result


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class StepClock:
    """Times optimizer steps from outside any training loop, the same way for every contender.

    A global `torch.optim` post-step hook marks the end of each optimizer step: on CPU a host timestamp and this
    process's CPU time, on a GPU a CUDA event (recorded on the stream, so the clock adds no host synchronisation
    and measures when the device finished the step). Steady-state throughput is images between the mark after
    warm-up step `warmup` and the last mark, over the time between them: set-up, compilation, warm-up and whatever
    a loop does after its last step (checkpoint, sample grid, export) fall outside.

    On a shared CPU machine wall time depends on what else runs; CPU time (all of this process's threads) counts
    the work a loop does whatever the load, so `per="cpu"` compares overheads where the wall clock cannot. It
    misses work done in other processes (DataLoader workers).
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def __enter__(self) -> StepClock:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self._handle = register_optimizer_step_post_hook(self._mark)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def _mark(self, optimizer, args, kwargs) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append((time.perf_counter(), time.process_time()))

    def images_per_second(self, warmup: int, images_per_step: int, per: str = "wall") -> float | None:
        """Images per second of wall time (`per="wall"`) or of CPU time (`"cpu"`; None on a GPU) over the steps
        after the first `warmup` ones."""
        if len(self.marks) < warmup + 2:
            raise RuntimeError(f"{len(self.marks)} optimizer steps seen; need warm-up {warmup} + at least 2")
        first, last = self.marks[warmup], self.marks[-1]
        if self.cuda:
            if per == "cpu":
                return None
            last.synchronize()
            seconds = first.elapsed_time(last) / 1000
        else:
            which = 0 if per == "wall" else 1
            seconds = last[which] - first[which]
        return (len(self.marks) - 1 - warmup) * images_per_step / seconds


def summary(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def cpu_report(benchmark: str, args: argparse.Namespace, watch: Any, started: float, results: list[dict[str, Any]],
               own_threads: int) -> tuple[dict[str, Any], str | None]:
    """A CPU benchmark's JSON (what it measured, its options, the machine and load, its results) and why its figures
    are refused, if they are (the load rose during the run)."""
    from punkdiff.precision import cpu_has_native_bf16

    info = {**machine(torch.device("cpu")), **watch.record(), "native_bf16": cpu_has_native_bf16()}
    refused = watch.refusal(own_threads=own_threads)
    return {"benchmark": benchmark, "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": info, "wall_s": time.perf_counter() - started, "figures_refused": refused,
            "results": results}, refused


def require(condition: bool, message: str) -> None:
    """An assertion that `python -O` keeps."""
    if not condition:
        raise AssertionError(message)


def flops_per_image(step: Callable[[], Any], batch_size: int) -> float:
    """FLOPs of one call of `step` per image, counted by `torch.utils.flop_counter` (2 per multiply-add)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / batch_size


class PeakMemory:
    """Peak memory of this process and its children (decode workers), sampled every `interval` s in a thread.

    Sums over the process tree of the proportional set size (Linux `/proc/<pid>/smaps_rollup`), so pages a forked
    worker shares with its parent count once: `Pss_Anon`, private memory that only the processes can free, and
    `Pss`, which also counts the file pages of memory maps (the cache file being written: pages the kernel can
    write back and drop). `baseline` is the anonymous memory when sampling began. Elsewhere everything stays 0.
    """

    def __init__(self, interval: float = 0.1) -> None:
        self.interval, self.anon, self.pss, self.baseline = interval, 0, 0, 0

    def __enter__(self) -> PeakMemory:
        import threading

        self.baseline = self._sample()[0]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _sample() -> tuple[int, int]:
        import psutil

        me = psutil.Process()
        anon = pss = 0
        for process in [me, *me.children(recursive=True)]:
            fields = _rollup_fields(process.pid)
            anon, pss = anon + fields.get("Pss_Anon", 0), pss + fields.get("Pss", 0)
        return anon, pss

    def _watch(self) -> None:
        while True:
            anon, pss = self._sample()
            self.anon, self.pss = max(self.anon, anon), max(self.pss, pss)
            if self._stop.wait(self.interval):
                return

    def peaks(self) -> dict[str, int]:
        return {"anon_bytes": self.anon, "pss_bytes": self.pss, "anon_baseline_bytes": self.baseline}


def _rollup_fields(pid: int) -> dict[str, int]:
    """The `kB` fields of `/proc/<pid>/smaps_rollup`, in bytes ({} if the process ended or there is no /proc)."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def log(message: str) -> None:
    """Progress on stderr (stdout keeps the table)."""
    print(message, file=sys.stderr, flush=True)


def prepare_run(device: str, threads: int, contenders: list[str]) -> list[str]:
    """What every benchmark checks and sets first: the device exists, torch's threads, and the contenders that
    can run (ddpm-pytorch is skipped, with the command to install it, where it is not installed)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if threads:
        torch.set_num_threads(threads)
    contenders = list(contenders)
    if "ddpm-pytorch" in contenders:
        try:
            import denoising_diffusion_pytorch  # noqa: F401
        except ImportError:
            log("ddpm-pytorch skipped: pip install -e '.[bench]' (denoising-diffusion-pytorch)")
            contenders.remove("ddpm-pytorch")
    return contenders


def wait_for_quiet(max_load: float, timeout_s: float, log: Callable[[str], None]) -> float:
    """Wait (polling) until the 1-minute load average is at most `max_load`, or `timeout_s` passed; the load."""
    deadline = time.monotonic() + timeout_s
    while (load := os.getloadavg()[0]) > max_load and time.monotonic() < deadline:
        log(f"load {load:.2f} > {max_load}: waiting")
        time.sleep(min(30.0, max(0.0, deadline - time.monotonic())))
    return load


def add_load_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """`--max-load`, `--wait-s`, `--skip-load-wait`: the flags of a `LoadWatch`; `what` names what is refused."""
    parser.add_argument("--max-load", type=float, default=0.5, help="wait until the 1-minute load average is at most "
                        f"this; {what} are refused (exit 3) if it was above at the start or rose above this + the "
                        "benchmark's threads + 0.5 during the run")
    parser.add_argument("--wait-s", type=float, default=900.0, help="wait at most this long for the load to drop")
    parser.add_argument("--skip-load-wait", action="store_true", help=f"smoke runs: neither wait nor check the load "
                        f"({what} are printed, marked unchecked)")


class LoadWatch:
    """The machine's 1-minute load average before, during and after a timed run, and whether a ratio may be trusted.

    A benchmark's own threads raise the load by about their number; anything above `max_load + own_threads +
    margin` at any sample means another job shared the cores during the run, so ratios measured then are refused.

    Examples:
        ```py
        >>> watch = LoadWatch(max_load=0.5, timeout_s=900, log=print).wait()
        >>> ...  # each repeat: watch.sample()
        >>> watch.refusal(own_threads=2)   # None: quiet throughout
        ```
    """

    def __init__(self, max_load: float, timeout_s: float, log: Callable[[str], None], margin: float = 0.5,
                 checked: bool = True, unchecked_because: str = "--skip-load-wait") -> None:
        self.max_load, self.timeout_s, self.log, self.margin, self.checked = max_load, timeout_s, log, margin, checked
        self.unchecked_because = unchecked_because
        self.start: float | None = None
        self.samples: list[float] = []

    def wait(self) -> LoadWatch:
        """Wait for the load to drop to `max_load` (not when unchecked); record it."""
        self.start = wait_for_quiet(self.max_load, self.timeout_s, self.log) if self.checked else os.getloadavg()[0]
        if self.checked and self.start > self.max_load:
            self.log(f"load {self.start:.2f} still above {self.max_load} after {self.timeout_s:.0f} s: measuring "
                     "anyway, but no ratio will be reported")
        return self

    def sample(self) -> float:
        load = os.getloadavg()[0]
        self.samples.append(load)
        return load

    def refusal(self, own_threads: int) -> str | None:
        """Why ratios from this run must not be reported (None: the machine stayed quiet)."""
        if not self.checked:
            return f"the load was not checked ({self.unchecked_because})"
        if self.start is not None and self.start > self.max_load:
            return f"the load was {self.start:.2f} at the start, above --max-load {self.max_load}"
        limit = self.max_load + own_threads + self.margin
        peak = max(self.samples, default=0.0)
        if peak > limit:
            return (f"the load rose to {peak:.2f} during the run, above {limit:.2f} (--max-load {self.max_load} + "
                    f"{own_threads} benchmark thread(s) + {self.margin}): another job shared the cores")
        return None

    def record(self) -> dict[str, Any]:
        return {"loadavg_start": self.start, "loadavg_samples": self.samples,
                "loadavg_end": self.samples[-1] if self.samples else None, "max_load": self.max_load,
                "load_checked": self.checked}

    def report(self, out: Path, report: dict[str, Any], table: str, note: str, refused: str | None,
               what: str) -> int:
        """Write `report` as JSON to `out`, print the table, the note and why `what` (ratios, figures) are refused;
        the exit status: 3 when they are refused, 0 otherwise (and for an unchecked smoke run)."""
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(table)
        print(note)
        if refused:
            print(f"{what} {'not checked' if not self.checked else 'refused'}: {refused}")
        return 3 if refused and self.checked else 0


# ---- the machine ----------------------------------------------------------------------------------------

# bf16 dense tensor-core peak (TFLOP/s, no sparsity) from the vendors' data sheets, by device name fragment;
# checked in order, so the more specific names come first. Pass --peak-tflops for anything else.
BF16_DENSE_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM ("H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
)


def bf16_peak_tflops(device: torch.device) -> tuple[str | None, float | None]:
    """`(device name, bf16 dense peak TFLOP/s)` of a CUDA device; the peak is None when the name is not known."""
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    return name, next((peak for fragment, peak in BF16_DENSE_TFLOPS if fragment in name), None)


def machine(device: torch.device) -> dict[str, Any]:
    """Where and with what a result was measured."""
    versions = {"python": platform.python_version()}
    for package in ("punkdiff", "torch", "torchvision", "diffusers", "accelerate", "datasets", "numpy",
                    "denoising-diffusion-pytorch"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "versions": versions,
    }
    if device.type == "cuda":
        name, peak = bf16_peak_tflops(device)
        info.update(gpu=name, gpu_memory_gib=torch.cuda.get_device_properties(device).total_memory / 2**30,
                    bf16_dense_peak_tflops=peak, cuda=torch.version.cuda)
    return info


def reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons; each in-process run starts from a clean slate."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def rotated(names: list[str], repeat: int) -> list[str]:
    """The order of one interleaved repeat: A B C, then B C A, ..., so drift in the machine hits each alike."""
    k = repeat % len(names)
    return names[k:] + names[:k]
