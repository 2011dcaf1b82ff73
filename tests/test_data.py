"""Data: the three offline mirrors -> cached uint8 tensors, per preset, with clear errors. Runs offline."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from punkdiff.data import (
    DataError,
    ImageStreamLoader,
    ImageTensorDataset,
    ImageTransform,
    count_images,
    exceeds_cache_budget,
    load_image_dataset,
    load_training_images,
    pixel_art_palette,
    stream_training_images,
    to_model_input,
)
from punkdiff.presets import DataSpec, get_preset

PUNK_BLUE = (0x63, 0x85, 0x96)


def spec(preset: str, **changes) -> DataSpec:
    return dataclasses.replace(get_preset(preset).data, **changes)


def load(source, data_spec: DataSpec, cache_dir: Path, **kwargs):
    return load_training_images(source, data_spec, cache_dir=cache_dir, progress=False, **kwargs)


def write_pngs(folder: Path, images, names=None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / (names[i] if names else f"img_{i:03d}.png")
        image.save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("punkdiff-cache")


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Plain image folders made in tmp_path get their Arrow cache there too, not in ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


@pytest.fixture(scope="module")
def mnist_train(mnist_dir):
    return datasets.load_dataset(str(mnist_dir), split="train")


@pytest.fixture(scope="module")
def punks_train(punks_dir):
    return datasets.load_dataset(str(punks_dir), split="train")


@pytest.fixture(scope="module")
def celeba_train(celeba_dir):
    return datasets.load_dataset(str(celeba_dir), split="train")


@pytest.fixture(scope="module")
def punks24(punks_dir, cache_root):
    """The whole CryptoPunks mirror through the entry point, by path, at the native 24 px."""
    return load(punks_dir, spec("punks-24"), cache_root)


@pytest.fixture(scope="module")
def celeba64(celeba_dir, cache_root):
    return load(celeba_dir, spec("celeba-64"), cache_root)


# --- the three mirrors, per preset ---------------------------------------------------------------------


def test_mnist_mirror_by_path_is_one_channel_at_native_size(mnist_dir, mnist_train, cache_root):
    data_spec = spec("mnist-28")
    assert data_spec.channels == 1 and not data_spec.random_flip  # digits are never flipped
    images = load(mnist_dir, data_spec, cache_root)
    assert images.images.shape == (len(mnist_train), 1, 28, 28) == (5000, 1, 28, 28)
    assert images.images.dtype == torch.uint8
    for i in (0, 1, 2500, 4999):  # same order as the dataset, pixels untouched at native size
        np.testing.assert_array_equal(images[i][0].numpy(), np.asarray(mnist_train[i]["image"]))
    assert images.images.max() == 255 and images.images.min() == 0


@pytest.mark.parametrize("preset", ["mnist-baseline-16", "mnist-fast-16", "mnist-hp-16"])
def test_mnist_16_is_an_antialiased_downscale(preset, mnist_train, cache_root):
    subset = mnist_train.select(range(64))
    data_spec = spec(preset)
    images = load(subset, data_spec, cache_root).images
    assert images.shape == (64, 1, 16, 16)
    for i in (0, 31, 63):
        source = subset[i]["image"]
        expected = np.asarray(source.resize((16, 16), Image.Resampling.BILINEAR))
        np.testing.assert_array_equal(images[i][0].numpy(), expected)
        # antialiasing keeps the ink: the mean brightness survives the 28 -> 16 downscale
        assert abs(float(images[i].float().mean()) - float(np.asarray(source).mean())) < 4


def test_punks_24_transparent_background_becomes_the_stated_colour(punks24, punks_train):
    assert get_preset("punks-24").data.background.lower() == "#638596"
    assert punks24.images.shape == (10000, 3, 24, 24)
    counts = {"clear": 0, "opaque": 0, "partial": 0}
    for i in range(0, 10000, 97):
        rgba = np.asarray(punks_train[i]["image"].convert("RGBA")).astype(int)
        out = punks24[i].numpy().transpose(1, 2, 0).astype(int)
        alpha = rgba[..., 3]
        clear, opaque = alpha == 0, alpha == 255
        partial = ~clear & ~opaque
        np.testing.assert_array_equal(out[clear], np.broadcast_to(PUNK_BLUE, out[clear].shape))
        np.testing.assert_array_equal(out[opaque], rgba[opaque][:, :3])
        a = alpha[partial][:, None] / 255
        blended = rgba[partial][:, :3] * a + np.array(PUNK_BLUE) * (1 - a)
        assert np.all(np.abs(out[partial] - blended) <= 1)
        counts["clear"] += clear.sum()
        counts["opaque"] += opaque.sum()
        counts["partial"] += partial.sum()
    assert all(counts.values()), counts  # every kind of pixel was actually checked


def test_pixel_art_palette_is_every_colour_of_the_punks_and_none_for_photos(punks24, mnist_train, cache_root):
    images = punks24.images.numpy()
    palette = pixel_art_palette(images, ImageTransform.from_spec(spec("punks-24")))
    naive = np.unique(images.transpose(0, 2, 3, 1).reshape(-1, 3), axis=0)
    np.testing.assert_array_equal(palette, naive)  # sorted the same way: by R, then G, then B
    assert 100 < len(palette) <= 256 and [0x63, 0x85, 0x96] in palette.tolist()  # the background is a colour
    digits = load(mnist_train.select(range(200)), spec("mnist-baseline-16"), cache_root).images.numpy()
    assert pixel_art_palette(digits, ImageTransform.from_spec(spec("mnist-baseline-16"))) is None  # bilinear


def test_rgba_background_is_a_choice(punks_train, cache_root):
    subset = punks_train.select(range(8))
    white = load(subset, spec("punks-24", background="#ffffff"), cache_root).images
    blue = load(subset, spec("punks-24"), cache_root).images
    for i in range(8):
        clear = np.asarray(subset[i]["image"].convert("RGBA"))[..., 3] == 0
        assert clear.any()
        assert (white[i].numpy()[:, clear] == 255).all()
        np.testing.assert_array_equal(blue[i].numpy()[:, clear], np.array(PUNK_BLUE)[:, None].repeat(clear.sum(), 1))


def test_punks_32_is_nearest_upscale_without_blended_colours(punks24, punks_train, cache_root):
    data_spec = spec("punks-32")
    assert data_spec.resize_filter == "nearest"
    images = load(punks_train.select(range(40)), data_spec, cache_root).images
    assert images.shape == (40, 3, 32, 32)
    for i in range(40):
        source_colours = {tuple(c) for c in punks24[i].reshape(3, -1).T.tolist()}
        colours = {tuple(c) for c in images[i].reshape(3, -1).T.tolist()}
        assert colours == source_colours  # no new (blended) colour, none lost when upscaling 24 -> 32


def test_celeba_64_is_centre_cropped_and_flippable(celeba64, celeba_train):
    data_spec = spec("celeba-64")
    assert data_spec.center_crop and data_spec.random_flip and data_spec.channels == 3
    assert celeba64.images.shape == (5000, 3, 64, 64)
    for i in (0, 1234, 4999):
        image = celeba_train[i]["image"]
        w, h = image.size
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
        expected = np.asarray(image.crop(box).resize((64, 64), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
        np.testing.assert_array_equal(celeba64[i].numpy(), expected)
        squashed = np.asarray(image.resize((64, 64), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
        assert np.abs(squashed.astype(int) - expected).mean() > 5  # the crop really changed the framing


def test_celeba_128_preset(celeba_train, cache_root):
    images = load(celeba_train.select(range(6)), spec("celeba-128"), cache_root).images
    assert images.shape == (6, 3, 128, 128)
    image = celeba_train[5]["image"]
    w, h = image.size
    top = (h - w) // 2
    expected = np.asarray(image.crop((0, top, w, top + w)).resize((128, 128), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(images[5].numpy().transpose(1, 2, 0), expected)


def test_channel_handling(mnist_train, punks24, punks_train, cache_root):
    digits = mnist_train.select(range(16))
    gray = load(digits, spec("mnist-28"), cache_root).images
    rgb = load(digits, spec("mnist-28", channels=3), cache_root).images
    assert rgb.shape == (16, 3, 28, 28)
    for c in range(3):  # grayscale -> RGB copies the one channel
        assert torch.equal(rgb[:, c], gray[:, 0])
    punks = load(punks_train.select(range(16)), spec("punks-24", channels=1), cache_root).images
    assert punks.shape == (16, 1, 24, 24)
    for i in range(16):  # RGBA -> L goes through the composited colour, not the raw (black) transparent pixels
        expected = np.asarray(Image.fromarray(punks24[i].numpy().transpose(1, 2, 0)).convert("L"))
        np.testing.assert_array_equal(punks[i][0].numpy(), expected)


def test_split_selection(mnist_train, mnist_dir, cache_root):
    test_split = datasets.load_dataset(str(mnist_dir), split="test")
    both = datasets.DatasetDict({"train": mnist_train.select(range(8)), "test": test_split.select(range(8))})
    images = load(both, spec("mnist-28", split="test"), cache_root).images
    for i in range(8):
        np.testing.assert_array_equal(images[i][0].numpy(), np.asarray(test_split[i]["image"]))
    dataset, column = load_image_dataset(str(mnist_dir), split="test")
    assert len(dataset) == 10000 and column == "image"


def test_plain_image_folder(tmp_path, hf_cache, celeba_train, celeba64, cache_root):
    """Real CelebA pixels written out losslessly as PNGs: the folder loads to exactly the mirror's tensors."""
    folder = tmp_path / "faces"
    write_pngs(folder, [celeba_train[i]["image"] for i in range(10)])
    images = load(folder, spec("celeba-64"), cache_root)
    assert len(images) == 10
    assert torch.equal(images.images, celeba64.images[:10])
    assert load(str(folder), spec("celeba-64"), cache_root).images.shape == (10, 3, 64, 64)


# --- scaling, flips, order ----------------------------------------------------------------------------


def test_to_model_input_maps_uint8_onto_minus_one_one():
    values = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = to_model_input(values)
    assert x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() == 1.0
    assert x.flatten()[0] == -1.0 and x.flatten()[255] == 1.0  # exactly, not approximately
    assert torch.all(x.flatten().diff() > 0)
    torch.testing.assert_close(x.flatten(), torch.linspace(-1, 1, 256), atol=1e-6, rtol=0)
    assert values.flatten()[255] == 255  # the uint8 batch itself is left alone


def flip_pattern(batch: torch.Tensor, out: torch.Tensor) -> list[bool]:
    plain = to_model_input(batch)
    pattern = []
    for o, p in zip(out, plain, strict=True):
        flipped = torch.equal(o, p.flip(-1))
        assert flipped or torch.equal(o, p)  # each image is either untouched or mirrored, never changed otherwise
        pattern.append(flipped)
    return pattern


def test_random_flip_is_per_image_and_reproducible(celeba64):
    batch = celeba64.images[:64]
    assert all(not torch.equal(img, img.flip(-1)) for img in batch)  # so a flip is visible
    a = flip_pattern(batch, to_model_input(batch, True, torch.Generator().manual_seed(0)))
    again = flip_pattern(batch, to_model_input(batch, True, torch.Generator().manual_seed(0)))
    other = flip_pattern(batch, to_model_input(batch, True, torch.Generator().manual_seed(1)))
    assert a == again
    assert a != other
    assert 0 < sum(a) < 64  # decided per image, not per batch
    assert not any(flip_pattern(batch, to_model_input(batch, False)))


def test_dataloader_order_is_seeded(punks24):
    dataset = ImageTensorDataset(punks24.images[:96].clone())

    def epoch(seed):
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed)
        )
        return torch.cat(list(loader))

    first, again, other = epoch(0), epoch(0), epoch(1)
    assert first.shape == (96, 3, 24, 24)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, dataset.images)  # actually shuffled

    def as_set(t):
        return sorted(bytes(row.numpy()) for row in t.reshape(len(t), -1))

    assert as_set(first) == as_set(dataset.images)  # a permutation: every image exactly once


def test_image_tensor_dataset_moves_whole_and_checks_its_input(punks24):
    small = ImageTensorDataset(punks24.images[:32].clone())
    moved = small.to("cpu")
    assert isinstance(moved, ImageTensorDataset) and len(moved) == 32
    assert torch.equal(moved.images, punks24.images[:32])
    assert torch.equal(moved[7], punks24[7])
    with pytest.raises(DataError, match="uint8"):
        ImageTensorDataset(punks24.images[:4].float())
    with pytest.raises(DataError, match=r"\[N, C, H, W\]"):
        ImageTensorDataset(punks24.images[0])


def test_loader_takes_each_batch_as_one_slice_in_the_seeded_order(punks24):
    """`ImageTensorDataset.loader`: the same batches as a per-item DataLoader with the same seed, but each one
    gathered by a single `__getitems__` call (so `__getitem__` is never called)."""
    images = punks24.images[:96].clone()

    class PerItem(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i]

    class NoPerItem(ImageTensorDataset):
        def __getitem__(self, index):
            raise AssertionError("a batch was assembled item by item")

    batches = list(NoPerItem(images).loader(batch_size=16, seed=3))
    expected = torch.utils.data.DataLoader(PerItem(), batch_size=16, shuffle=True, drop_last=True,
                                           generator=torch.Generator().manual_seed(3))
    assert len(batches) == 6
    for ours, theirs in zip(batches, expected, strict=True):
        assert torch.equal(ours, theirs)
    assert len(list(ImageTensorDataset(images[:90]).loader(batch_size=16, seed=3))) == 5  # partial batch dropped


# --- the decode-once cache ----------------------------------------------------------------------------


def mapped_files() -> dict[str, list[tuple[int, int]]]:
    ranges: dict[str, list[tuple[int, int]]] = {}
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            ranges.setdefault(parts[5], []).append((lo, hi))
    return ranges


def test_cache_is_written_once_reused_and_memory_mapped(tmp_path, punks_train, monkeypatch):
    import punkdiff.data as data

    subset = punks_train.select(range(48))
    first = load(subset, spec("punks-24"), tmp_path)
    files = sorted(tmp_path.iterdir())
    # one complete file and its checksum, no temporary left behind
    assert [f.name.split(".", 1)[1] for f in files] == ["npy", "npy.xxh3"]
    cache = files[0]
    stamp = cache.stat().st_mtime_ns
    np.testing.assert_array_equal(np.load(cache), first.images.numpy())

    def no_decoding(*args, **kwargs):
        raise AssertionError("a cached dataset was decoded again")

    with monkeypatch.context() as patched:
        patched.setattr(data, "decode_images", no_decoding)
        second = load(subset, spec("punks-24"), tmp_path)
    assert torch.equal(first.images, second.images)
    assert cache.stat().st_mtime_ns == stamp and sorted(tmp_path.iterdir()) == files

    if Path("/proc/self/maps").exists():  # the tensor's memory *is* the file, not a copy of it
        ptr = second.images.data_ptr()
        assert any(lo <= ptr < hi for lo, hi in mapped_files().get(str(cache.resolve()), []))

    # use_cache=False decodes again (and leaves the cache alone)
    assert torch.equal(load(subset, spec("punks-24"), tmp_path, use_cache=False).images, first.images)
    assert cache.stat().st_mtime_ns == stamp
    # another transform or another slice is another cache entry
    assert load(subset, spec("punks-32"), tmp_path).images.shape == (48, 3, 32, 32)
    assert torch.equal(load(punks_train.select(range(8)), spec("punks-24"), tmp_path).images, first.images[:8])
    assert len(list(tmp_path.glob("*.npy"))) == len(list(tmp_path.glob("*.npy.xxh3"))) == 3


def flip_one_bit(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


@pytest.mark.parametrize("damage", ["pixel-bit-flip", "valid-array-swapped-in", "checksum-missing",
                                    "checksum-garbled"])
def test_a_damaged_cache_is_rebuilt_with_a_warning_never_used(tmp_path, mnist_train, damage):
    """The MNIST mirror's first 300 digits: the cache is damaged on disk after it was built; the next load warns,
    rebuilds it, and hands back exactly what a fresh decode gives."""
    subset = mnist_train.select(range(300))
    data_spec = spec("mnist-28")
    fresh = load(subset, data_spec, tmp_path, use_cache=False).images
    load(subset, data_spec, tmp_path)
    (cache,) = tmp_path.glob("*.npy")
    checksum = cache.with_name(cache.name + ".xxh3")
    header = cache.stat().st_size - fresh.numel()
    if damage == "pixel-bit-flip":  # one bit of one pixel of digit 123: the header and shape stay valid
        flip_one_bit(cache, header + 123 * 28 * 28 + 14 * 28 + 14)
        match = "does not match the checksum written when it was built"
    elif damage == "valid-array-swapped-in":
        np.save(cache, np.zeros_like(fresh.numpy()))
        match = "does not match the checksum"
    elif damage == "checksum-missing":
        checksum.unlink()
        match = "has no readable checksum"
    else:
        checksum.write_text("{not json")
        match = "has no readable checksum"
    with pytest.warns(UserWarning, match=match):
        rebuilt = load(subset, data_spec, tmp_path)
    assert torch.equal(rebuilt.images, fresh)
    assert len(list(tmp_path.glob("*.npy"))) == 1 and checksum.is_file()
    with warnings.catch_warnings():  # the rebuilt cache and its new checksum agree: used silently
        warnings.simplefilter("error")
        assert torch.equal(load(subset, data_spec, tmp_path).images, fresh)


def test_in_memory_dataset_is_not_cached(tmp_path, punks_train):
    subset = punks_train.select(range(6))
    in_memory = datasets.Dataset.from_dict({"image": [subset[i]["image"] for i in range(6)]},
                                           features=datasets.Features({"image": datasets.Image()}))
    images = load(in_memory, spec("punks-24"), tmp_path)
    assert torch.equal(images.images, load(subset, spec("punks-24"), tmp_path / "other").images)
    assert not list(tmp_path.glob("*.npy"))


INTERRUPTED_WRITE = textwrap.dedent("""
    import resource, signal, sys
    import datasets
    from punkdiff.data import load_training_images
    from punkdiff.presets import get_preset
    subset = datasets.load_dataset(sys.argv[1], split="train").select(range(200))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
    try:
        load_training_images(subset, get_preset("punks-24").data, cache_dir=sys.argv[2], progress=False)
    except OSError as err:
        print("interrupted:", err)
        sys.exit(3)
""")


@pytest.mark.skipif(sys.platform != "linux", reason="uses RLIMIT_FSIZE to cut a write short")
def test_interrupted_cache_write_leaves_no_truncated_cache(tmp_path, punks_dir, punks_train):
    """A real write cut short at 100 kB (the cache is 345 kB): no cache file may claim to be complete."""
    cache = tmp_path / "cache"
    run = subprocess.run([sys.executable, "-c", INTERRUPTED_WRITE, str(punks_dir), str(cache)],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert run.returncode == 3, run.stdout + run.stderr
    assert "interrupted" in run.stdout
    assert cache.is_dir() and not list(cache.iterdir())  # no truncated cache, no stray temporary file
    # the next run decodes and writes a complete cache
    subset = punks_train.select(range(200))
    images = load(subset, spec("punks-24"), cache)
    (complete,) = cache.glob("*.npy")
    np.testing.assert_array_equal(np.load(complete), images.images.numpy())
    np.testing.assert_array_equal(np.load(complete), load(subset, spec("punks-24"), cache, use_cache=False).images)


def test_a_full_disk_during_the_cache_decode_removes_the_partial_cache_and_says_how_much_is_needed(
        small_disk, mnist_train):
    disk = small_disk(1024)
    with pytest.raises(DataError) as caught:
        load(mnist_train.select(range(5000)), spec("mnist-baseline-16"), disk / "cache")
    message = str(caught.value)
    assert f"the disk holding {disk / 'cache'} is full (1 MB free): the decoded image cache needs about 1.2 MB" \
        in message  # 5,000 images of 16 x 16 x 1 bytes
    assert "the partial cache was removed" in message and "--cache-dir" in message and "--streaming" in message
    assert list((disk / "cache").iterdir()) == []


KILLED_DECODE = textwrap.dedent("""
    import sys
    import datasets
    import punkdiff.data as data
    from punkdiff.presets import get_preset
    data.DECODE_CHUNK = 16  # many small chunks: the test kills the parent while the workers decode
    punks = datasets.load_dataset(sys.argv[1], split="train")
    data.load_training_images(punks, get_preset("punks-24").data, cache_dir=sys.argv[2], progress=False,
                              num_workers=2)
""")


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_kill_9_during_the_decode_leaves_no_worker_and_the_next_start_removes_its_temporary_cache(
        tmp_path, punks_dir, punks_train):
    import psutil

    cache = tmp_path / "cache"
    run = subprocess.Popen([sys.executable, "-c", KILLED_DECODE, str(punks_dir), str(cache)],
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    parent = psutil.Process(run.pid)
    deadline = time.time() + 120
    while not (list(cache.glob("*.tmp.npy")) and len(parent.children()) >= 2):
        assert run.poll() is None and time.time() < deadline, "the decode ended before it could be killed"
        time.sleep(0.02)
    workers = parent.children()
    run.kill()
    run.wait()
    gone, alive = psutil.wait_procs(workers, timeout=20)
    assert not alive, f"decode workers outlived their parent: {alive}"
    (left,) = cache.glob("*.tmp.npy")
    assert left.stat().st_size > 10000 * 24 * 24 * 3 // 2  # full size: the file is allocated at the start
    # the next start removes the dead process's temporary cache, then builds its own
    images = load(punks_train.select(range(100)), spec("punks-24"), cache)
    assert len(images) == 100
    assert not list(cache.glob("*.tmp.npy*"))


# --- errors name the item and the fix; nothing is silently dropped ------------------------------------


def test_corrupt_image_in_folder_names_the_file_and_writes_no_cache(tmp_path, hf_cache, punks_train):
    folder = tmp_path / "punks"
    paths = write_pngs(folder, [punks_train[i]["image"] for i in range(6)])
    paths[3].write_bytes(paths[3].read_bytes()[:60])  # truncated PNG
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"item 3 \(.*img_003\.png\).*not a readable image"):
        load(folder, spec("punks-24"), cache)
    assert not cache.exists() or not list(cache.iterdir())


def test_corrupt_bytes_in_dataset_names_the_index(tmp_path, punks_train):
    good = []
    for i in range(3):
        buf = io.BytesIO()
        punks_train[i]["image"].save(buf, format="PNG")
        good.append({"bytes": buf.getvalue(), "path": None})
    rows = good[:2] + [{"bytes": b"\x89PNG\r\n\x1a\nnot really", "path": None}] + good[2:]
    dataset = datasets.Dataset.from_dict({"picture": rows}, features=datasets.Features({"picture": datasets.Image()}))
    with pytest.raises(DataError, match=r"item 2 of column 'picture' is not a readable image"):
        load(dataset, spec("punks-24"), tmp_path)
    fine = load(dataset.select([0, 1, 3]), spec("punks-24"), tmp_path)
    assert len(fine) == 3


def test_decoding_on_several_processes_gives_the_same_cache(tmp_path, punks_train, monkeypatch):
    """Chunks decoded by a process pool land in the memory-mapped file exactly where one process puts them."""
    import punkdiff.data as data

    monkeypatch.setattr(data, "DECODE_CHUNK", 64)  # 200 images: 4 chunks, so both workers get some
    subset = punks_train.select(range(200))
    one = load(subset, spec("punks-24"), tmp_path / "one", num_workers=1)
    two = load(subset, spec("punks-24"), tmp_path / "two", num_workers=2)
    assert torch.equal(one.images, two.images)
    (file, checksum) = sorted((tmp_path / "two").iterdir())  # the cache and its checksum, no temporary file
    assert checksum.name == file.name + ".xxh3"
    np.testing.assert_array_equal(np.load(file), one.images.numpy())
    in_memory = data.decode_images(subset, "image", data.ImageTransform.from_spec(spec("punks-24")), False,
                                   num_workers=2)
    np.testing.assert_array_equal(in_memory, one.images.numpy())


def test_a_corrupt_image_in_a_worker_names_its_index_and_leaves_no_file(tmp_path, punks_train, monkeypatch):
    import punkdiff.data as data

    monkeypatch.setattr(data, "DECODE_CHUNK", 4)
    rows = []
    for i in range(12):
        buf = io.BytesIO()
        punks_train[i]["image"].save(buf, format="PNG")
        rows.append({"bytes": buf.getvalue() if i != 9 else b"broken", "path": None})
    dataset = datasets.Dataset.from_dict({"image": rows}, features=datasets.Features({"image": datasets.Image()}))
    dataset.save_to_disk(tmp_path / "saved")  # file-backed, so it is cached (written through the memory map)
    dataset = datasets.load_from_disk(tmp_path / "saved")
    with pytest.raises(DataError, match=r"item 9 of column 'image' is not a readable image"):
        load(dataset, spec("punks-24"), tmp_path / "cache", num_workers=2)
    assert not list((tmp_path / "cache").iterdir())


def test_empty_inputs(tmp_path, hf_cache, punks_train):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        load(tmp_path / "empty", spec("punks-24"), tmp_path)
    with pytest.raises(DataError, match=r"is empty: nothing to train on"):
        load(punks_train.select([]), spec("punks-24"), tmp_path)


def test_missing_or_wrong_image_column(mnist_train, tmp_path):
    digits = mnist_train.select(range(4))
    with pytest.raises(DataError, match=r"no image column \(columns: label.*pass data.image_column"):
        load(digits.remove_columns("image"), spec("mnist-28"), tmp_path)
    with pytest.raises(DataError, match=r"no column 'img'; columns: image, label"):
        load(digits, spec("mnist-28", image_column="img"), tmp_path)
    with pytest.raises(DataError, match=r"'label'.*not images.*image columns: image"):
        load(digits, spec("mnist-28", image_column="label"), tmp_path)
    renamed = digits.rename_column("image", "digit")  # found by type, not by name
    assert load(renamed, spec("mnist-28"), tmp_path).images.shape == (4, 1, 28, 28)


def test_wrong_split_lists_the_available_ones(mnist_dir, punks_dir, tmp_path):
    with pytest.raises(DataError, match=r"no split 'validation'; available splits: train, test"):
        load(mnist_dir, spec("mnist-28", split="validation"), tmp_path)
    with pytest.raises(DataError, match=r"no split 'test'; available splits: train$"):
        load(punks_dir, spec("punks-24", split="test"), tmp_path)


def test_bad_paths(mnist_dir, tmp_path, monkeypatch):
    parquet = next((mnist_dir / "data").glob("train-*.parquet"))
    with pytest.raises(DataError, match="is a file"):
        load(parquet, spec("mnist-28"), tmp_path)
    with pytest.raises(DataError, match="could not find dataset"):
        load(tmp_path / "missing", spec("mnist-28"), tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"could not find dataset './typo'"):
        load("./typo", spec("mnist-28"), tmp_path)


def test_sklearn_digits_builtin_is_the_real_digits_framed_like_mnist():
    from sklearn.datasets import load_digits

    from punkdiff.data import load_image_dataset

    dataset, column = load_image_dataset("sklearn-digits")
    digits = load_digits()
    assert column == "image" and len(dataset) == len(digits.images) == 1797
    first = np.asarray(dataset[0]["image"])
    assert first.shape == (12, 12)
    assert first[:2].max() == first[-2:].max() == first[:, :2].max() == first[:, -2:].max() == 0  # black frame
    np.testing.assert_array_equal(first[2:-2, 2:-2], np.round(digits.images[0] * 255 / 16).astype(np.uint8))
    assert dataset[5]["label"] == digits.target[5]


# --- hostile images: rescaled correctly, or refused with the item named; never a raw traceback -------------------


def _encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _decode_rows(rows: list[bytes], data_spec: DataSpec) -> torch.Tensor:
    dataset = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in rows]},
                                         features=datasets.Features({"image": datasets.Image()}))
    return load_training_images(dataset, data_spec, progress=False).images


GRADIENT = np.linspace(0, 1, 16 * 16).reshape(16, 16)


@pytest.mark.parametrize(
    ("image", "fmt"),
    [
        (Image.fromarray((GRADIENT * 65535).round().astype(np.uint16)), "PNG"),  # mode I;16
        (Image.fromarray(GRADIENT.astype(np.float32)), "TIFF"),  # mode F, values in [0, 1]
        (Image.fromarray((GRADIENT * 255).astype(np.float32)), "TIFF"),  # mode F, values in [0, 255]
        (Image.fromarray((GRADIENT * 65535).round().astype(np.int32)), "TIFF"),  # mode I, 16-bit range
    ],
    ids=["png-16-bit", "tiff-float-unit", "tiff-float-255", "tiff-int32"],
)
def test_high_bit_depth_images_are_rescaled_not_clipped(image, fmt):
    """16-bit and float grayscale keep their tones: PIL's own convert would clip them to white or black."""
    decoded = _decode_rows([_encoded(image, fmt)], spec("mnist-28", resolution=16))
    expected = torch.from_numpy((GRADIENT * 255).round().astype(np.uint8))
    assert (decoded[0, 0].int() - expected.int()).abs().max() <= 1


def test_out_of_range_float_images_are_refused():
    hot = Image.fromarray((GRADIENT * 1000 - 50).astype(np.float32))
    with pytest.raises(DataError, match=r"item 0 .*F image with values in \[-50, 950\]"):
        _decode_rows([_encoded(hot, "TIFF")], spec("mnist-28", resolution=16))


def _bomb_png(side: int = 100_000) -> bytes:
    """A valid PNG header claiming side x side pixels: PIL refuses it as a decompression bomb before decoding."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


PHOTO = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8))
HOSTILE_ROWS = {
    "truncated-png": (_encoded(PHOTO)[:80], "not a readable image"),
    "truncated-jpeg": (_encoded(PHOTO, "JPEG")[:200], "not a readable image"),
    "text-named-png": (b"this is a text file, not a picture\n", "not a readable image"),
    "decompression-bomb": (_bomb_png(), "not a readable image"),
    "one-pixel": (_encoded(Image.new("RGB", (1, 1), (10, 200, 30))), None),
    "huge-width": (_encoded(Image.new("L", (20_000, 1), 77)), None),
    "cmyk-jpeg": (_encoded(PHOTO.convert("CMYK"), "JPEG"), None),
    "palette": (_encoded(PHOTO.convert("P")), None),
    "grey-alpha": (_encoded(PHOTO.convert("LA")), None),
    "one-bit": (_encoded(PHOTO.convert("1")), None),
    "16-bit": (_encoded(Image.fromarray((GRADIENT * 65535).astype(np.uint16))), None),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_ROWS))
@pytest.mark.parametrize("channels", [1, 3])
def test_hostile_rows_decode_to_the_right_shape_or_name_the_item(kind, channels):
    data, refused = HOSTILE_ROWS[kind]
    data_spec = spec("punks-24", channels=channels)
    rows = [_encoded(PHOTO), data]
    if refused:
        with pytest.raises(DataError, match=rf"item 1 of column 'image' is {refused}"):
            _decode_rows(rows, data_spec)
    else:
        decoded = _decode_rows(rows, data_spec)
        assert decoded.shape == (2, channels, 24, 24) and decoded.dtype == torch.uint8


@settings(max_examples=150, deadline=None)
@given(
    fmt=st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]),
    cut=st.integers(min_value=0, max_value=400),
    flips=st.lists(st.tuples(st.integers(min_value=0, max_value=10_000), st.integers(1, 255)), max_size=6),
)
def test_fuzzed_image_bytes_decode_or_name_the_item(fmt, cut, flips):
    """Any truncation and bit flips of any format: a uint8 image of the right shape, or a DataError naming it."""
    data = bytearray(_encoded(PHOTO, fmt))
    data = data[: max(len(data) - cut, 0)]
    for position, mask in flips:
        if data:
            data[position % len(data)] ^= mask
    try:
        decoded = _decode_rows([bytes(data)], spec("punks-24"))
    except DataError as err:
        assert "item 0 of column 'image'" in str(err)
        return
    assert decoded.shape == (1, 3, 24, 24)


@pytest.mark.parametrize("damage", ["truncated", "header", "other-shape"])
def test_damaged_cache_is_rebuilt_not_used(tmp_path, punks_train, damage):
    subset = punks_train.select(range(8))
    first = load(subset, spec("punks-24"), tmp_path).images.clone()  # a copy: the loaded tensor maps the file
    (cache,) = tmp_path.glob("*.npy")
    if damage == "truncated":
        cache.write_bytes(cache.read_bytes()[:-500])
    elif damage == "header":
        cache.write_bytes(b"garbage" + cache.read_bytes()[7:])
    else:
        np.save(cache, np.zeros((8, 3, 12, 12), dtype=np.uint8))
    with pytest.warns(UserWarning, match="rebuilding it"):
        again = load(subset, spec("punks-24"), tmp_path)
    assert torch.equal(again.images, first)
    np.testing.assert_array_equal(np.load(cache), first.numpy())


# --- streaming: datasets larger than the cache budget ------------------------------------------------------------


def as_rows(images: torch.Tensor) -> list[bytes]:
    return [bytes(image.numpy()) for image in images]


def streamed(loader: ImageStreamLoader, epoch: int = 0) -> torch.Tensor:
    loader.set_epoch(epoch)
    return torch.cat(list(loader))


@pytest.fixture(scope="module")
def mnist300(mnist_dir, cache_root):
    """The MNIST mirror's first 300 digits at 28 px through the cache, the order every stream is compared with."""
    return load(mnist_dir, spec("mnist-28", max_samples=300), cache_root).images


def test_an_unshuffled_stream_is_the_cache_item_for_item(mnist_dir, mnist300, celeba_dir, celeba64):
    stream = stream_training_images(mnist_dir, spec("mnist-28", max_samples=300), shuffle=False)
    assert torch.equal(torch.stack([torch.as_tensor(row["image"]) for row in stream]), mnist300)
    # the same transform: CelebA's centre crop and bicubic resize
    faces = stream_training_images(celeba_dir, spec("celeba-64", max_samples=24), shuffle=False)
    assert torch.equal(torch.stack([torch.as_tensor(row["image"]) for row in faces]), celeba64.images[:24])


def test_a_shuffled_stream_is_a_seeded_permutation_each_epoch(mnist_dir, mnist300):
    def loader(seed):
        return ImageStreamLoader(stream_training_images(mnist_dir, spec("mnist-28", max_samples=300), seed=seed),
                                 num_images=300, batch_size=30)

    first, second = streamed(loader(0), 0), streamed(loader(0), 1)
    assert len(loader(0)) == 10 and first.shape == (300, 1, 28, 28) and first.dtype == torch.uint8
    assert sorted(as_rows(first)) == sorted(as_rows(second)) == sorted(as_rows(mnist300))  # each digit once
    assert not torch.equal(first, mnist300) and not torch.equal(first, second)  # shuffled, reshuffled per epoch
    assert torch.equal(streamed(loader(0), 0), first) and not torch.equal(streamed(loader(1), 0), first)


@pytest.mark.parametrize("world_size", [2, 3])
def test_process_shards_are_disjoint_and_cover_the_data(mnist_dir, mnist300, world_size):
    shards = [streamed(ImageStreamLoader(
        stream_training_images(mnist_dir, spec("mnist-28", max_samples=300), seed=4, rank=rank, world_size=world_size),
        num_images=300, batch_size=10, world_size=world_size)) for rank in range(world_size)]
    per_process = 300 // (10 * world_size) * 10
    assert [len(shard) for shard in shards] == [per_process] * world_size  # the same batches on every process
    rows = [row for shard in shards for row in as_rows(shard)]
    assert len(set(rows)) == len(rows)  # disjoint
    whole = [streamed(ImageStreamLoader(stream_training_images(
        mnist_dir, spec("mnist-28", max_samples=300), seed=4, rank=rank, world_size=world_size, shuffle=False),
        num_images=300, batch_size=1, world_size=world_size)) for rank in range(world_size)]  # all of each shard
    assert sorted(row for shard in whole for row in as_rows(shard)) == sorted(as_rows(mnist300))  # they cover it


def test_an_unshuffled_stream_resumes_exactly_after_the_last_batch(mnist_dir, mnist300):
    def loader():
        return ImageStreamLoader(stream_training_images(mnist_dir, spec("mnist-28", max_samples=300), shuffle=False),
                                 num_images=300, batch_size=20)

    straight = loader()
    straight.set_epoch(1)
    batches = iter(straight)
    before = torch.cat([next(batches) for _ in range(4)])
    state = json.loads(json.dumps(straight.state_dict()))  # as a checkpoint keeps it
    after = torch.cat(list(batches))
    resumed = loader()
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    assert torch.equal(torch.cat(list(resumed)), after) and torch.equal(torch.cat([before, after]), mnist300)
    resumed.set_epoch(2)  # the next epoch starts afresh, whole
    assert torch.equal(torch.cat(list(resumed)), mnist300)


def test_a_shuffled_stream_resumes_where_it_was_but_not_in_the_same_order(mnist_dir, monkeypatch):
    """The documented limit: `datasets` does not save the shuffle buffer (here 64 images, as it is small beside
    the data in real use), so a resumed epoch goes on from about the stream's position with a refilled buffer: the
    count of batches is kept, but up to a buffer's worth of images come twice in that epoch and as many are
    skipped (measured: 56 of 5,000), and the order is not the uninterrupted run's."""
    import punkdiff.data as data

    monkeypatch.setattr(data, "STREAM_SHUFFLE_BUFFER", 64)

    def loader():
        return ImageStreamLoader(stream_training_images(mnist_dir, spec("mnist-28"), seed=2), num_images=5000,
                                 batch_size=20)

    straight = loader()
    straight.set_epoch(0)
    batches = iter(straight)
    before = torch.cat([next(batches) for _ in range(100)])
    state = json.loads(json.dumps(straight.state_dict()))
    after = torch.cat([next(batches) for _ in range(20)])
    resumed = loader()
    resumed.load_state_dict(state)
    resumed.set_epoch(0)
    again = list(resumed)
    assert len(again) == 250 - 100
    seen, rest = set(as_rows(before)), as_rows(torch.cat(again))
    assert sum(row in seen for row in rest) <= 64 and len(seen | set(rest)) >= 5000 - 64
    assert not torch.equal(torch.cat(again[:20]), after)


def test_uneven_shards_still_give_every_process_the_same_batches(tmp_path, mnist_train):
    """Two Parquet files of 40 and 20 digits on two processes: `datasets` gives each process a file; the short one
    starts over rather than leave the other waiting at a collective."""
    folder = tmp_path / "uneven"
    for i, rows in enumerate([range(40), range(40, 60)]):
        mnist_train.select(rows).to_parquet(str(folder / "data" / f"train-0000{i}-of-00002.parquet"))
    shards = [streamed(ImageStreamLoader(stream_training_images(folder, spec("mnist-28"), rank=rank, world_size=2),
                                         num_images=60, batch_size=10, world_size=2)) for rank in range(2)]
    assert [len(shard) for shard in shards] == [30, 30]
    long, short = (set(as_rows(shard)) for shard in shards)
    assert len(long) == 30 and len(short) == 20 and not long & short  # one file each; the short one wrapped


def test_the_cache_budget_decides_from_metadata(celeba_dir, mnist_dir, tmp_path):
    celeba128 = spec("celeba-128")
    assert count_images(celeba_dir, celeba128) == 5000
    assert count_images(mnist_dir, spec("mnist-28", split="test", max_samples=123)) == 123
    assert count_images(tmp_path / "nothing-here", celeba128) is None
    size = 5000 * 3 * 128 * 128  # 234 MiB decoded
    assert exceeds_cache_budget(celeba_dir, celeba128, budget=size) is None
    assert exceeds_cache_budget(celeba_dir, celeba128, budget=size - 1) == (
        "its decoded cache would take 234 MiB, more than the cache budget of 234 MiB")
    assert exceeds_cache_budget(celeba_dir, celeba128, tmp_path) is None  # the default: the disk's free space


def test_an_unreadable_streamed_image_is_named(tmp_path, punks_train):
    rows = [{"bytes": _encoded(punks_train[i]["image"]), "path": None} for i in range(5)]
    rows[3] = {"bytes": b"\x89PNG\r\n\x1a\nbroken", "path": None}
    folder = tmp_path / "broken-punks"
    datasets.Dataset.from_dict({"image": rows}, features=datasets.Features({"image": datasets.Image()})).to_parquet(
        str(folder / "data" / "train-00000-of-00001.parquet"))
    stream = stream_training_images(folder, spec("punks-24"), shuffle=False)
    with pytest.raises(DataError, match=r"streamed item 3 of process 0 of column 'image' is not a readable image"):
        list(stream)
