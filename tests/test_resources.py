"""Output folders are checked before training: a path that is (or lies under) a file, a folder that cannot be
written, or a disk too small for the checkpoints fails in a second, with the reason, not at the first checkpoint."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from killable import TrainingProcess
from tiny_training import exported_weights, max_diff, tiny_args

from punkdiff.presets import apply_overrides, get_preset
from punkdiff.scripts.train import main as train_main
from punkdiff.training import TrainingError
from punkdiff.training.resources import (
    check_run_outputs,
    check_writable,
    cpu_threads_warning,
    out_of_memory_message,
)

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture
def four_cores(monkeypatch):
    """A process allowed on 4 cores, and torch's thread count restored after the test."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_one_thread_on_a_multicore_cpu_names_the_launch_flag(four_cores, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what `accelerate launch` exports unless told otherwise
    torch.set_num_threads(1)
    message = cpu_threads_warning("cpu", num_processes=1)
    assert "1 CPU thread(s) of the 4" in message and "OMP_NUM_THREADS=1" in message
    assert "accelerate launch --num_cpu_threads_per_process 4" in message and "--cpu --num_processes 1" in message
    assert "of the 2" in cpu_threads_warning("cpu", num_processes=2)  # each process's share


def test_enough_threads_or_a_gpu_give_no_thread_warning(four_cores):
    torch.set_num_threads(4)
    assert cpu_threads_warning("cpu", num_processes=1) is None
    torch.set_num_threads(2)
    assert cpu_threads_warning("cpu", num_processes=2) is None
    torch.set_num_threads(1)
    assert cpu_threads_warning("cuda", num_processes=1) is None


@pytest.mark.parametrize(
    ("where", "message"),
    [
        (lambda tmp: tmp / "afile", "afile is a file, not a folder"),
        (lambda tmp: tmp / "afile" / "run", "afile is a file, not a folder"),
        (lambda tmp: Path("/proc/punkdiff-run"), "is not writable"),
        (lambda tmp: Path("/proc/self/punkdiff"), "is not writable"),
    ],
    ids=["is-a-file", "under-a-file", "proc", "proc-self"],
)
def test_unwritable_folders_are_named(tmp_path, where, message):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(TrainingError, match=message):
        check_writable(where(tmp_path), "--output-dir")


def test_writable_folder_is_created_and_left_clean(tmp_path):
    folder = check_writable(tmp_path / "new" / "run", "--output-dir")
    assert folder.is_dir() and not list(folder.iterdir())


def test_a_disk_too_small_for_the_checkpoints_is_found_before_training(tmp_path):
    huge = apply_overrides(get_preset("mnist-baseline-16"), {"model": {"block_out_channels": [8192, 8192, 8192]},
                                                             "train": {"checkpoints_total_limit": 100}})
    with pytest.raises(TrainingError, match=r"MB free, but 100 checkpoint\(s\) of this .*M-parameter model"):
        check_run_outputs(tmp_path / "run", tmp_path / "cache", huge)
    check_run_outputs(tmp_path / "run", tmp_path / "cache", get_preset("mnist-baseline-16"))


@pytest.mark.parametrize("flag", ["--output-dir", "--cache-dir"])
def test_training_stops_before_any_data_loads(tmp_path, capsys, flag):
    (tmp_path / "afile").write_text("x")
    args = tiny_args(tmp_path / "no-such-dataset", tmp_path / "cache", tmp_path / "out")
    args[args.index(flag) + 1] = str(tmp_path / "afile" / "sub")
    assert train_main(args) == 2  # a missing dataset would fail differently, later
    assert f"error: {flag} {tmp_path / 'afile' / 'sub'}: {tmp_path / 'afile'} is a file" in capsys.readouterr().out


@pytest.mark.parametrize(("batch", "accumulation", "advice"), [
    (64, 1, "try --batch-size 32 --gradient-accumulation-steps 2 "),
    (6, 2, "try --batch-size 3 --gradient-accumulation-steps 4 "),
    (1, 1, "even with --batch-size 1: use a smaller model"),
])
def test_out_of_memory_advice_keeps_the_global_batch(batch, accumulation, advice):
    message = out_of_memory_message("cuda:0", batch, accumulation)
    assert advice in message and "cuda:0" in message


# ---- read-only folders: root ignores permissions, so the run drops to an unprivileged user ----------------------

NOBODY = 65534


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def unprivileged(tmp_path_factory):
    """`(uid, home)`: a training child as `uid` finds permissions enforced; `home` is a folder it may write.

    As root the child drops to uid 65534 ("nobody"); as another user it runs as that user, whom permissions bind
    already. The folders live outside pytest's own temporary root, which is private to its owner.
    """
    import shutil
    import tempfile

    if sys.platform != "linux":
        pytest.skip("forkserver children and uids: Linux only")
    uid = NOBODY if os.geteuid() == 0 else None
    home = Path(tempfile.mkdtemp(prefix="punkdiff-unprivileged-"))
    home.chmod(0o755)
    if uid is not None:
        os.chown(home, uid, uid)
    probe = home / "read-only"
    probe.mkdir(mode=0o555)
    if uid is None and os.access(probe, os.W_OK):
        shutil.rmtree(home)
        pytest.skip("this user may write read-only folders (a capability such as CAP_DAC_OVERRIDE) and is not root, "
                    "so it cannot drop to a user that permissions bind")
    probe.rmdir()
    yield uid, home
    shutil.rmtree(home)


def read_only_folder(path: Path, files: dict[str, bytes] | None = None) -> Path:
    """A folder (owned by this user) that others may read but not write, holding `files`."""
    path.mkdir(parents=True)
    for name, data in (files or {}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    for folder in [p for p in path.rglob("*") if p.is_dir()] + [path]:
        folder.chmod(0o555)
    return path


def run_as(unprivileged, args: list[str], log: Path) -> tuple[int, str]:
    uid, home = unprivileged
    code = TrainingProcess(args, log, user=uid, home=home).wait()
    return code, log.read_text()


FAST = ["--max-steps", "2", "--checkpoint-every", "2", "--lr-warmup-steps", "1", "--seed", "5"]


def test_a_read_only_output_folder_fails_before_training_and_loses_nothing(unprivileged, mnist_dir):
    """An earlier run's files in a folder this user cannot write, with --overwrite-output-dir: refused in the
    checks before any data loads, every earlier file kept byte for byte."""
    _, home = unprivileged
    earlier = {"samples.png": b"\x89PNG earlier grid", "training_summary.json": b'{"steps": 7}',
               "pipeline/model_index.json": b'{"_class_name": "PunkDiffPipeline"}', "logs/events": b"tb"}
    out = read_only_folder(home / "run", earlier)
    cache = home / "cache"
    cache.mkdir()
    if unprivileged[0] is not None:
        os.chown(cache, unprivileged[0], unprivileged[0])
    code, log = run_as(unprivileged, tiny_args(mnist_dir, cache, out, *FAST, "--overwrite-output-dir"),
                       home / "log")
    assert code == 2, log
    assert f"error: --output-dir {out} is not writable (Permission denied): choose a folder you can write to" in log
    assert "Traceback" not in log
    assert snapshot(out) == earlier  # nothing lost, nothing added
    assert not list(cache.iterdir())  # it stopped before the data: nothing decoded


@pytest.fixture(scope="module")
def reference_weights(mnist_dir, cache_dir, tmp_path_factory):
    """The run as this user, with a writable cache (which it fills with these 64 digits)."""
    from tiny_training import train_tiny

    out = tmp_path_factory.mktemp("reference") / "run"
    assert train_tiny(mnist_dir, cache_dir, out, *FAST) == 0
    return exported_weights(out)


@pytest.mark.parametrize("cache_state", ["empty", "good-cache", "damaged-cache"])
def test_a_read_only_cache_folder_is_read_or_bypassed(unprivileged, mnist_dir, cache_dir, reference_weights,
                                                      cache_state):
    """The run trains on the same images whatever the cache folder holds: a good cache is read in place, an empty
    or damaged one is bypassed (decoded into memory) with a warning that says how to cache, and never written."""
    import numpy as np

    uid, home = unprivileged
    built = {}
    if cache_state != "empty":  # the cache of exactly these 64 digits, as the reference run wrote it
        (npy,) = [p for p in cache_dir.glob("images-*.npy") if np.load(p, mmap_mode="r").shape == (64, 1, 16, 16)]
        built = {npy.name: npy.read_bytes(), npy.name + ".xxh3": (cache_dir / (npy.name + ".xxh3")).read_bytes()}
        if cache_state == "damaged-cache":
            pixels = bytearray(built[npy.name])
            pixels[-100] ^= 0x01
            built[npy.name] = bytes(pixels)
    cache = read_only_folder(home / "cache", built)
    out = home / "run"
    out.mkdir()
    if uid is not None:
        os.chown(out, uid, uid)
    code, log = run_as(unprivileged, tiny_args(mnist_dir, cache, out, *FAST), home / "log")
    assert code == 0, log
    bypassed = "is not writable (Permission denied): decoding the images into memory for this run only; pass " \
               "--cache-dir (or set PUNKDIFF_CACHE) to a writable folder"
    assert (bypassed in log) == (cache_state != "good-cache"), log
    assert ("does not match the checksum" in log) == (cache_state == "damaged-cache"), log
    assert snapshot(cache) == built  # never written, never "repaired" in place
    assert max_diff(exported_weights(out), reference_weights) == 0.0
