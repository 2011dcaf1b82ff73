"""Checkpoints: a damaged file (truncated or bit-flipped) is found by its checksum before anything loads; `latest`
falls back to the previous good checkpoint naming the file, a named damaged checkpoint is refused; no checkpoint is
ever written of non-finite weights, and a failed write keeps the last good one."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_unet
from tiny_training import exported_weights, max_diff, tiny_args, train_tiny

from punkdiff.scripts.train import main as train_main
from punkdiff.training import TrainingError
from punkdiff.training.checkpoints import (
    DamagedCheckpointWarning,
    checkpoint_problem,
    find_checkpoint,
    list_checkpoints,
    require_finite_weights,
)

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
RUN = ["--max-steps", "4", "--checkpoint-every", "2", "--set", "model.dropout=0.1"]
FILES = ["model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "noise_rng_0.safetensors",
         "unet_ema/diffusion_pytorch_model.safetensors", "unet_ema/config.json", "training_state.json"]


@pytest.fixture(scope="module")
def finished(mnist_dir, cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train_tiny(mnist_dir, cache_dir, out, *RUN) == 0
    return out


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x04
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_bit], ids=["truncated", "bit-flip"])
@pytest.mark.parametrize("name", FILES)
def test_damaged_file_is_named_latest_falls_back_and_explicit_is_refused(finished, tmp_path, name, damage):
    out = Path(shutil.copytree(finished, tmp_path / "run"))
    latest = out / "checkpoints" / "checkpoint-4"
    assert checkpoint_problem(latest) is None
    damage(latest / name)
    with pytest.warns(DamagedCheckpointWarning, match=rf"checkpoint-4 is damaged \(.*{name.split('/')[-1]}"):
        assert find_checkpoint(out, "latest") == out / "checkpoints" / "checkpoint-2"
    with pytest.raises(TrainingError, match=rf"checkpoint-4 is damaged \(.*{name.split('/')[-1]}"):
        find_checkpoint(out, str(latest))


def test_missing_file_and_damaged_manifest_are_detected(finished, tmp_path):
    out = Path(shutil.copytree(finished, tmp_path / "run"))
    (out / "checkpoints" / "checkpoint-4" / "optimizer.bin").unlink()
    assert "optimizer.bin is missing" in checkpoint_problem(out / "checkpoints" / "checkpoint-4")
    (out / "checkpoints" / "checkpoint-2" / "checksums.json").write_text("{not json")
    assert "checksums.json is unreadable" in checkpoint_problem(out / "checkpoints" / "checkpoint-2")
    with pytest.warns(DamagedCheckpointWarning):
        assert find_checkpoint(out, "latest") is None


def test_truncated_rng_state_falls_back_and_resumes_exactly(finished, mnist_dir, cache_dir, tmp_path, capsys):
    """Accelerate skips an unreadable RNG file (logged at INFO only) and the run silently diverges; not any more."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    for step in (2, 4):
        shutil.copytree(finished / "checkpoints" / f"checkpoint-{step}", out / "checkpoints" / f"checkpoint-{step}")
    _truncate(out / "checkpoints" / "checkpoint-4" / "random_states_0.pkl")
    with pytest.warns(DamagedCheckpointWarning, match="random_states_0.pkl does not match its checksum"):
        assert train_main(tiny_args(mnist_dir, cache_dir, out, *RUN, "--resume-from-checkpoint", "latest")) == 0
    assert "resumed from" in capsys.readouterr().out and "checkpoint-2" in (out / "training_summary.json").read_text()
    assert max_diff(exported_weights(finished), exported_weights(out)) == 0.0


def test_failed_checkpoint_write_keeps_the_last_good_one_and_says_so(mnist_dir, cache_dir, tmp_path, capsys):
    """The write of checkpoint-4 fails for real (its temporary folder's path is taken by a file)."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".tmp-checkpoint-4").write_text("in the way")
    assert train_main(tiny_args(mnist_dir, cache_dir, tmp_path, *RUN)) == 1
    out = capsys.readouterr().out
    assert "could not write checkpoint-4" in out and "checkpoint-2 is kept" in out and "latest" in out
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert checkpoint_problem(tmp_path / "checkpoints" / "checkpoint-2") is None
    assert not (tmp_path / "pipeline").exists()


def test_a_full_disk_during_a_checkpoint_removes_the_partial_one_and_says_how_much_is_needed(
        mnist_dir, cache_dir, small_disk, capsys):
    """A real full disk (1.7 MB): the run's space check passes (two checkpoints and the export of 40k parameters fit),
    checkpoints 2 and 4 are written, and the writers (safetensors', torch's) fail inside checkpoint-6."""
    out = small_disk(1700) / "run"
    keep_all = ["--set", "train.checkpoints_total_limit=null"]  # the space check then counts one kept checkpoint
    run = tiny_args(mnist_dir, cache_dir, out, "--max-steps", "8", "--checkpoint-every", "2", *keep_all)
    assert train_main(run) == 1
    printed = capsys.readouterr().out
    assert f"could not write checkpoint-6: the disk holding {out / 'checkpoints'} is full (" in printed
    needed = float(re.search(r"a checkpoint of this run needs about ([\d.]+) MB", printed).group(1))
    written = sum(p.stat().st_size for p in (out / "checkpoints" / "checkpoint-4").rglob("*") if p.is_file())
    assert needed == pytest.approx(written / 2**20, abs=0.05)  # the size of the last checkpoint
    assert "the partial checkpoint was removed" in printed and "checkpoint-4 is kept" in printed
    assert "Traceback" not in printed
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_non_finite_weights_are_never_checkpointed():
    from diffusers.training_utils import EMAModel

    unet = tiny_unet(channels=1)
    ema = EMAModel(unet.parameters())
    require_finite_weights(unet, ema, step=3)
    ema.shadow_params[0].fill_(float("nan"))
    with pytest.raises(TrainingError, match="EMA weights became non-finite .* by step 3: nothing was saved"):
        require_finite_weights(unet, ema, step=3)
    with torch.no_grad():
        next(unet.parameters())[0] = float("inf")
    with pytest.raises(TrainingError, match="EMA weights and weights became non-finite"):
        require_finite_weights(unet, ema, step=3)
