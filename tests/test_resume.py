"""Resume tells the truth: a resumed run is the interrupted one or is refused with the differences named; a longer
run is an explicit choice; a finished checkpoint is exported, not refused; --overwrite-output-dir leaves nothing of
the earlier run."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from tiny_training import exported_weights, max_diff, tiny_args, train_tiny

from punkdiff.hub import validate_model_folder
from punkdiff.scripts.train import main as train_main
from punkdiff.training import TrainingError
from punkdiff.training.arguments import build_train_parser, resolve_training_config
from punkdiff.training.resume import check_resume, remove_previous_run

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
RUN = ["--max-steps", "4", "--checkpoint-every", "2", "--lr-warmup-steps", "1"]


@pytest.fixture(scope="module")
def finished(mnist_dir, cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train_tiny(mnist_dir, cache_dir, out, *RUN) == 0
    return out


def _check(finished: Path, mnist_dir: Path, *extra: str):
    args = build_train_parser().parse_args(tiny_args(mnist_dir, finished, finished, *RUN, *extra))
    return check_resume(finished, "latest", resolve_training_config(args), 1, seed=args.seed,
                        extend_schedule=args.extend_schedule)


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--learning-rate", "1e-3"], r"train.learning_rate: 0.0003 -> 0.001"),
        (["--seed", "1"], r"seed \(the data order and noise\): 0 -> 1"),
        (["--set", "train.ema_decay=0.99"], r"train.ema_decay: 0.9999 -> 0.99"),
        (["--set", "train.ema_power=0.5"], r"train.ema_power: 0.75 -> 0.5"),
        (["--no-ema"], r"train.use_ema: true -> false"),
        (["--lr-warmup-steps", "3"], r"train.lr_warmup_steps: 1 -> 3"),
        (["--mixed-precision", "bf16"], r'train.mixed_precision: "no" -> "bf16"'),
        (["--max-steps", "8"], r"planned as train.max_steps 4 .*--extend-schedule"),
    ],
)
def test_changed_settings_are_refused_with_the_difference_named(finished, mnist_dir, extra, named):
    with pytest.raises(TrainingError, match=named):
        _check(finished, mnist_dir, *extra)


def test_where_and_how_often_things_are_saved_may_change(finished, mnist_dir):
    checkpoint, state = _check(finished, mnist_dir, "--checkpoint-every", "7", "--sample-every", "3",
                               "--checkpoints-total-limit", "1", "--set", "train.num_sample_images=9")
    assert checkpoint.name == "checkpoint-4" and state["global_step"] == 4 and state["seed"] == 0


def test_extend_schedule_continues_with_the_schedule_replanned(finished, mnist_dir, cache_dir, tmp_path, capsys):
    out = Path(shutil.copytree(finished, tmp_path / "run"))
    assert train_main(tiny_args(mnist_dir, cache_dir, out, *RUN, "--max-steps", "8", "--resume-from-checkpoint",
                                "latest")) == 2
    assert "--extend-schedule" in capsys.readouterr().out
    assert train_main(tiny_args(mnist_dir, cache_dir, out, *RUN, "--max-steps", "8", "--resume-from-checkpoint",
                                "latest", "--extend-schedule")) == 0
    printed = capsys.readouterr().out
    history = json.loads((out / "checkpoints" / "checkpoint-8" / "training_state.json").read_text())["history"]
    assert [h[0] for h in history] == list(range(1, 9))
    # cosine with 1 warmup step: 0 at the old end (step 4); re-planned over 8 steps, step 5 is 4/7 of the way down
    assert history[3][2] == pytest.approx(0.0, abs=1e-12)
    assert history[4][2] == pytest.approx(3e-4 * 0.5 * (1 + math.cos(math.pi * 4 / 7)), rel=1e-9)
    assert f"the LR goes from {history[3][2]:.3e}" in printed and "re-planned over 8 steps" in printed
    assert json.loads((out / "training_summary.json").read_text())["steps"] == 8


def test_resuming_a_finished_checkpoint_exports_the_same_model(finished, mnist_dir, cache_dir, tmp_path, capfd):
    """A kill after the last checkpoint (during the final grid or the export) leaves a run that can be finished."""
    out = tmp_path / "run"
    shutil.copytree(finished / "checkpoints", out / "checkpoints")
    (out / ".pipeline.staging-deadbeef" / "unet").mkdir(parents=True)  # a half-written export from the kill
    assert train_main(tiny_args(mnist_dir, cache_dir, out, *RUN, "--resume-from-checkpoint", "latest")) == 0
    assert "were passed to UNet2DModel" not in capfd.readouterr().err  # no spurious EMA-config warning on resume
    validate_model_folder(out / "pipeline")
    assert max_diff(exported_weights(finished), exported_weights(out)) == 0.0
    for name in ("pipeline/unet/diffusion_pytorch_model.safetensors", "samples.png"):
        assert (out / name).read_bytes() == (finished / name).read_bytes(), name
    assert not list(out.glob(".pipeline.*"))


def test_overwrite_removes_the_earlier_export_and_summary(finished, tmp_path):
    out = Path(shutil.copytree(finished, tmp_path / "run"))
    (out / "notes.txt").write_text("mine")
    remove_previous_run(out)
    # the run-folder lock is the overwriting run's own (it holds it while it clears the folder): it stays
    assert sorted(p.name for p in out.iterdir()) == [".punkdiff-train.lock", ".punkdiff-train.lock.json", "notes.txt"]
    # a `pipeline` folder that is not an export is not ours to delete
    (out / "pipeline").mkdir()
    (out / "pipeline" / "data.csv").write_text("1,2")
    remove_previous_run(out)
    assert (out / "pipeline" / "data.csv").is_file()
