"""Data-path benchmark: punkdiff's cached uint8 tensors vs the diffusers `train_unconditional.py` data path.

For each preset (mnist-baseline-16, punks-32, celeba-64) on the offline mirrors in `../shared/datasets`:

- punkdiff's one-time preparation (decode + transform + `.npy` cache write into a fresh temporary cache dir)
  and its cached reload (fingerprint lookup + memory map);
- steady-state images/s of batches delivered as model-ready float tensors in [-1, 1]:
  punkdiff = `DataLoader` over the `ImageTensorDataset` + `to_model_input` (exactly as `training/train.py`);
  peer = the diffusers example: `load_dataset`, torchvision `Resize/Crop/Flip/ToTensor/Normalize` through
  `dataset.set_transform`, `DataLoader(shuffle=True, num_workers=0)`, so PIL decodes every image every step;
- the bytes of the decoded tensor (and how much of its memory map is resident after one full pass);
- the checksum check every cached load pays (xxh3 of the cache file, warm page cache), beside the decode it saves;
- streaming (`--streaming`, or a cache over budget): images/s of model-ready batches decoded on the fly by one
  process from `datasets` streaming, the same transform, beside the cached path's batches and its decode.

Timed repeats are interleaved (punkdiff and peer alternate, order swapped every repeat) and medians are reported;
the ratio is the median of the per-repeat punkdiff/peer ratios. Run: `.venv/bin/python benchmarks/bench_data.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import torch
from benchlib import (
    DEFAULT_DATASETS,
    RESULTS,
    PeakMemory,
    diffusers_example_loader,
    machine,
    mirror,
    require,
    summary,
    timed,
)

from punkdiff.data import (
    ImageStreamLoader,
    ImageTensorDataset,
    available_cores,
    file_digest,
    load_training_images,
    stream_training_images,
    to_model_input,
)
from punkdiff.presets import DataSpec, get_preset

PRESETS = ("mnist-baseline-16", "punks-32", "celeba-64", "celeba-128")


@dataclass(frozen=True)
class Settings:
    """What one run measures; `--quick` shrinks every count."""

    batch_size: int
    batches: int  # timed batches per repeat, the same count for both paths ...
    min_seconds: float  # ... pulled again (whole multiples) until a sample lasts this long, so fast paths aren't noise
    warmup_batches: int
    repeats: int
    max_samples: int | None  # None: the whole mirror
    seed: int = 0


FULL = Settings(batch_size=64, batches=50, min_seconds=0.5, warmup_batches=5, repeats=3, max_samples=None)
QUICK = Settings(batch_size=16, batches=5, min_seconds=0.05, warmup_batches=1, repeats=3, max_samples=500)


# ---- the two data paths ---------------------------------------------------------------------------------


def peer_batches(loader) -> Iterator[torch.Tensor]:
    """Model-ready batches from the peer, epoch after epoch."""
    while True:
        for batch in loader:
            yield batch["input"]


def streamed_batches(path: Path, spec: DataSpec, settings: Settings, images: int) -> Iterator[torch.Tensor]:
    """Model-ready batches as a `--streaming` run makes them (one process decoding its stream), epoch after epoch."""
    loader = ImageStreamLoader(stream_training_images(path, spec, seed=settings.seed), images, settings.batch_size)
    noise_rng = torch.Generator().manual_seed(settings.seed)
    for epoch in range(10**9):
        loader.set_epoch(epoch)
        for batch in loader:
            yield to_model_input(batch, spec.random_flip, noise_rng)


def punkdiff_batches(dataset: ImageTensorDataset, spec: DataSpec, settings: Settings) -> Iterator[torch.Tensor]:
    """Model-ready batches the way `training/train.py` makes them (one gather per batch), epoch after epoch."""
    loader = dataset.loader(settings.batch_size, settings.seed)
    noise_rng = torch.Generator().manual_seed(settings.seed)
    while True:
        for batch in loader:
            yield to_model_input(batch, spec.random_flip, noise_rng)


# ---- measuring ------------------------------------------------------------------------------------------


def images_per_second(batches: Iterator[torch.Tensor], count: int, min_seconds: float = 0.0) -> tuple[float, int]:
    """`(images/s, batches pulled)`: pull `count` batches, again until `min_seconds` have passed (timeit-style).

    Images are counted as delivered, so a short last batch counts right.
    """
    images = pulled = 0
    start = time.perf_counter()
    while True:
        for _ in range(count):
            images += next(batches).shape[0]
        pulled += count
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return images / elapsed, pulled


def mapped_resident_bytes(path: Path) -> int | None:
    """Resident bytes of this process's memory maps of `path` (Linux `/proc/self/smaps`; None elsewhere)."""
    smaps = Path("/proc/self/smaps")
    if not smaps.exists():
        return None
    total, inside = 0, False
    target = str(path.resolve())
    for line in smaps.read_text().splitlines():
        first = line.split(maxsplit=1)[0]
        if "-" in first and not first.endswith(":"):  # a mapping header: "start-end perms offset dev inode path"
            inside = line.rstrip().endswith(target)
        elif inside and first == "Rss:":
            total += int(line.split()[1]) * 1024
    return total


def check_batches(ours: torch.Tensor, theirs: torch.Tensor, spec: DataSpec, batch_size: int) -> dict[str, Any]:
    """Both paths must hand the model the same thing: float32 `[B, C, res, res]` in [-1, 1], not constant."""
    expected = (batch_size, spec.channels, spec.resolution, spec.resolution)
    for name, x in (("punkdiff", ours), ("peer", theirs)):
        require(tuple(x.shape) == expected, f"{name} batch has shape {tuple(x.shape)}, expected {expected}")
        require(x.dtype == torch.float32, f"{name} batch is {x.dtype}, expected float32")
        require(x.min() >= -1.0 and x.max() <= 1.0, f"{name} batch spans [{x.min()}, {x.max()}], not [-1, 1]")
        require(x.std() > 0.05, f"{name} batch is (nearly) constant")
    return {
        "shape": list(expected),
        "dtype": "float32",
        "punkdiff_range": [float(ours.min()), float(ours.max())],
        "peer_range": [float(theirs.min()), float(theirs.max())],
        # same first images, no shuffle, no flip: ~0 where both pipelines agree (MNIST: bilinear both), larger where
        # they differ on purpose (punks: composited background + nearest; CelebA: crop-then-bicubic)
        "first_batch_mean_abs_diff": float((ours - theirs).abs().mean()),
    }


def bench_preset(name: str, root: Path, settings: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    """Every measurement for one preset."""
    preset = get_preset(name)
    spec = replace(preset.data, max_samples=settings.max_samples)
    path = mirror(preset, root)
    datasets.load_dataset(str(path), split="train")  # build/warm the Arrow cache both paths read; not timed

    # punkdiff: one-time preparation (decode on every core into the memory-mapped cache) into a fresh cache, with
    # the peak memory of this process and its decode workers, then the cached (memory-mapped) reload
    prep, prep_memory, reload, keep = [], [], [], []
    for _ in range(settings.repeats):
        cache = tempfile.TemporaryDirectory(prefix="punkdiff-bench-")
        with PeakMemory() as memory:
            seconds, _ = timed(lambda c=cache.name: load_training_images(str(path), spec, cache_dir=c,
                                                                         progress=False))
        prep.append(seconds)
        prep_memory.append(memory.peaks())
        seconds, ours = timed(lambda c=cache.name: load_training_images(str(path), spec, cache_dir=c, progress=False))
        reload.append(seconds)
        keep.append(cache)
    cache_file = next(Path(keep[-1].name).glob("images-*.npy"))
    verify = [timed(lambda: file_digest(cache_file))[0] for _ in range(settings.repeats)]  # in every reload above
    # side by side: the same decode into one array in RAM (no cache: how the cache was built before decoding
    # went straight into the memory map)
    with PeakMemory() as memory:
        in_ram_seconds = timed(lambda: load_training_images(str(path), spec, use_cache=False, progress=False))[0]
    in_ram_memory = memory.peaks()
    log(f"  {name}: prep {statistics.median(prep):.2f} s ({len(ours) / statistics.median(prep):,.0f} img/s, peak "
        f"anonymous memory {max(m['anon_bytes'] for m in prep_memory) / 2**20:.0f} MiB; into RAM: "
        f"{in_ram_memory['anon_bytes'] / 2**20:.0f} MiB), reload "
        f"{1e3 * statistics.median(reload):.1f} ms")

    # peer: what it pays before its first batch (load_dataset on the warm Arrow cache + set_transform)
    def peer_loader(shuffle: bool = True, flip: bool | None = None):
        return diffusers_example_loader(path, spec, settings.batch_size, settings.seed, shuffle, flip)

    peer_setup = [timed(peer_loader)[0] for _ in range(settings.repeats)]
    loader, arrow_bytes = peer_loader()

    # same shapes and range on both paths (and the same first images, for a sense of pixel agreement)
    first_ours = to_model_input(ours.images[:settings.batch_size])
    first_theirs = next(peer_batches(peer_loader(shuffle=False, flip=False)[0]))
    check = check_batches(first_ours, first_theirs, spec, settings.batch_size)

    # steady state: warm up, then interleaved repeats
    paths = {"punkdiff": punkdiff_batches(ours, spec, settings), "peer": peer_batches(loader),
             "streamed": streamed_batches(path, spec, settings, len(ours))}
    for batches in paths.values():
        images_per_second(batches, settings.warmup_batches)  # also pages the memory map in
    rates: dict[str, list[float]] = {key: [] for key in paths}
    timed_batches: dict[str, list[int]] = {key: [] for key in paths}
    for rep in range(settings.repeats):
        for key in list(paths) if rep % 2 == 0 else list(paths)[::-1]:
            rate, pulled = images_per_second(paths[key], settings.batches, settings.min_seconds)
            rates[key].append(rate)
            timed_batches[key].append(pulled)
    ratios = [a / b for a, b in zip(rates["punkdiff"], rates["peer"], strict=True)]
    log(f"  {name}: punkdiff {statistics.median(rates['punkdiff']):,.0f} img/s, "
        f"peer {statistics.median(rates['peer']):,.0f} img/s, streamed {statistics.median(rates['streamed']):,.0f} "
        f"img/s; checksum check {1e3 * statistics.median(verify):.0f} ms")

    # memory: the decoded tensor, and how much of its map is resident once every page has been read
    int(ours.images.reshape(-1)[::4096].sum())  # touch every page
    resident = mapped_resident_bytes(cache_file)
    result = {
        "preset": name,
        "dataset": str(path),
        "images": len(ours),
        "tensor_shape": list(ours.images.shape),
        "data_spec": {k: getattr(spec, k) for k in ("resolution", "channels", "resize_filter", "center_crop",
                                                     "random_flip", "background", "max_samples")},
        "punkdiff_prep_s": summary(prep),
        "punkdiff_prep_images_per_s": len(ours) / statistics.median(prep),
        # peak over the preparation, this process and its decode workers (proportional set sizes, shared pages
        # counted once): anonymous memory, what it was before, and all memory including the pages of the
        # memory-mapped cache file the kernel may write back and drop
        "punkdiff_prep_peak_anon_bytes": max(m["anon_bytes"] for m in prep_memory),
        "punkdiff_prep_anon_baseline_bytes": min(m["anon_baseline_bytes"] for m in prep_memory),
        "punkdiff_prep_peak_pss_bytes": max(m["pss_bytes"] for m in prep_memory),
        "in_ram_decode_s": in_ram_seconds,
        "in_ram_decode_peak_anon_bytes": in_ram_memory["anon_bytes"],
        "in_ram_decode_anon_baseline_bytes": in_ram_memory["anon_baseline_bytes"],
        "decode_workers": available_cores(),
        "punkdiff_reload_s": summary(reload),
        # xxh3 of the cache file, part of every reload (the file is in the page cache, as right after a build)
        "punkdiff_verify_s": summary(verify),
        "punkdiff_verify_bytes_per_s": cache_file.stat().st_size / statistics.median(verify),
        # --streaming: model-ready batches decoded on the fly by this one process (datasets streaming, shuffled)
        "streamed_images_per_s": summary(rates["streamed"]),
        "ratio_streamed_over_cached": summary([a / b for a, b in zip(rates["streamed"], rates["punkdiff"],
                                                                      strict=True)]),
        "peer_setup_s": summary(peer_setup),
        "punkdiff_images_per_s": summary(rates["punkdiff"]),
        "peer_images_per_s": summary(rates["peer"]),
        "ratio_punkdiff_over_peer": summary(ratios),
        "timed_batches": timed_batches,
        # the one-time preparation, in epochs of the peer's per-step decoding: below 1, it pays off in the first epoch
        "prep_in_peer_epochs": statistics.median(prep) * statistics.median(rates["peer"]) / len(ours),
        "tensor_bytes": ours.images.nbytes,
        "cache_file_bytes": cache_file.stat().st_size,
        "mapped_resident_bytes": resident,
        "peer_arrow_bytes": arrow_bytes,
        "check": check,
    }
    del ours, paths, loader
    for cache in keep:
        cache.cleanup()
    return result


# ---- report ---------------------------------------------------------------------------------------------


def table(results: list[dict[str, Any]]) -> str:
    """The printed summary: one row per preset, medians."""
    header = (f"{'preset':<18} {'images':>7} {'shape':>10} {'prep s':>7} {'decode img/s':>12} "
              f"{'anon MiB base->peak':>19} {'into RAM':>8} {'reload ms':>9} {'of it xxh3':>10} {'tensor MiB':>10} "
              f"{'resident MiB':>12} {'punkdiff img/s':>14} {'peer img/s':>10} {'ratio':>6} {'prep/peer epoch':>15} "
              f"{'streamed img/s':>14}")
    rows = [header, "-" * len(header)]
    for r in results:
        _, c, h, w = r["tensor_shape"]
        resident = r["mapped_resident_bytes"]
        anon = f"{r['punkdiff_prep_anon_baseline_bytes'] / 2**20:.0f}->{r['punkdiff_prep_peak_anon_bytes'] / 2**20:.0f}"
        rows.append(
            f"{r['preset']:<18} {r['images']:>7} {f'{c}x{h}x{w}':>10} {r['punkdiff_prep_s']['median']:>7.2f} "
            f"{r['punkdiff_prep_images_per_s']:>12,.0f} {anon:>19} {r['in_ram_decode_peak_anon_bytes'] / 2**20:>8.0f} "
            f"{1e3 * r['punkdiff_reload_s']['median']:>9.1f} {1e3 * r['punkdiff_verify_s']['median']:>10.1f} "
            f"{r['tensor_bytes'] / 2**20:>10.2f} "
            f"{'n/a' if resident is None else f'{resident / 2**20:.2f}':>12} "
            f"{r['punkdiff_images_per_s']['median']:>14,.0f} {r['peer_images_per_s']['median']:>10,.0f} "
            f"{r['ratio_punkdiff_over_peer']['median']:>5.1f}x {r['prep_in_peer_epochs']:>15.2f} "
            f"{r['streamed_images_per_s']['median']:>14,.0f}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run (first 500 images, 5 batches of 16)")
    parser.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/data.json, "
                                                  "data-quick.json with --quick)")
    parser.add_argument("--datasets-root", type=Path, default=DEFAULT_DATASETS, help="folder holding the mirrors")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS[:3]), choices=PRESETS)
    parser.add_argument("--batches", type=int, help="timed batches per repeat (overrides the mode's default)")
    parser.add_argument("--repeats", type=int, help="interleaved repeats (overrides the mode's default)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0 keeps torch's default "
                        "(default 1: on a busy 2-core box, 2 OpenMP threads stall ~7 ms per op on a 64x3x32x32 batch)")
    args = parser.parse_args(argv)

    settings = QUICK if args.quick else FULL
    settings = replace(settings, batches=args.batches or settings.batches, repeats=args.repeats or settings.repeats)
    out = args.out or RESULTS / ("data-quick.json" if args.quick else "data.json")
    torch_default_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    datasets.logging.set_verbosity_error()  # the mirrors' cards trip a harmless dataset_info warning
    datasets.disable_progress_bars()
    torch.manual_seed(settings.seed)  # the peer's RandomHorizontalFlip draws from the global generator

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    info = machine(torch.device("cpu"))
    info["torch_default_threads"] = torch_default_threads
    load_start = os.getloadavg()
    log(f"bench_data: {info['platform']}, {info['cpu_count']} CPUs, torch threads {info['torch_threads']}, "
        f"load {load_start[0]:.2f}; {'quick' if args.quick else 'full'} run")
    wall = time.perf_counter()
    results = [bench_preset(name, args.datasets_root, settings, log) for name in args.presets]
    info["loadavg_start"] = list(load_start)
    info["loadavg_end"] = list(os.getloadavg())

    report = {
        "benchmark": "data path: punkdiff cached uint8 tensors vs diffusers train_unconditional.py",
        "mode": "quick" if args.quick else "full",
        "settings": settings.__dict__,
        "machine": info,
        "wall_s": time.perf_counter() - wall,
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(results))
    print(f"\nbatch {settings.batch_size}; each sample {settings.batches} batches (multiples, until >= "
          f"{settings.min_seconds} s); {settings.repeats} interleaved repeats, medians (ratio = median of per-repeat "
          f"punkdiff/peer); torch threads {info['torch_threads']}, "
          f"load {info['loadavg_start'][0]:.2f} -> {info['loadavg_end'][0]:.2f}; wall {report['wall_s']:.0f} s; "
          f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
