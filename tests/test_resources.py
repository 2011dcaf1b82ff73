"""Output folders are checked before training: a path that is (or lies under) a file, a folder that cannot be
written, or a disk too small for the checkpoints fails in a second, with the reason, not at the first checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_training import tiny_args

from punkdiff.presets import apply_overrides, get_preset
from punkdiff.scripts.train import main as train_main
from punkdiff.training import TrainingError
from punkdiff.training.resources import check_run_outputs, check_writable, out_of_memory_message

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


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
