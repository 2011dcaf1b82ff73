"""The `punkdiff` command line: `sample` and `push` on a tiny exported model, and the `demo` main job."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from diffusers import DDPMScheduler
from fake_hub import fake_hub
from tiny_models import tiny_unet

from punkdiff.cli import main
from punkdiff.hub import export_pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return export_pipeline(tiny_unet(channels=3), DDPMScheduler(), tmp_path_factory.mktemp("cli") / "model")


def sample(model_dir: Path, out: Path, *extra: str) -> int:
    args = ["sample", str(model_dir), "--scheduler", "ddim", "--steps", "3", "--seed", "7", "--device", "cpu"]
    return main([*args, "--out", str(out), *extra])


def test_sample_writes_a_grid_and_single_images_stable_per_seed(model_dir, tmp_path, capsys):
    assert sample(model_dir, tmp_path / "grid.png", "--num-images", "4", "--out-dir", str(tmp_path / "four")) == 0
    assert str((tmp_path / "grid.png").resolve()) in capsys.readouterr().out
    grid = PIL.Image.open(tmp_path / "grid.png")
    assert grid.size == (16, 16) and grid.mode == "RGB"  # 2x2 grid of 8x8 images
    four = sorted((tmp_path / "four").glob("*.png"))
    assert [p.name for p in four] == ["0000.png", "0001.png", "0002.png", "0003.png"]
    np.testing.assert_array_equal(np.asarray(grid)[8:, :8], np.asarray(PIL.Image.open(four[2])))

    assert sample(model_dir, tmp_path / "g3.png", "--num-images", "3", "--out-dir", str(tmp_path / "three")) == 0
    assert PIL.Image.open(tmp_path / "g3.png").size == (24, 8)  # 1x3
    for name in ("0000.png", "0002.png"):  # image i comes from seed + i, whatever --num-images is
        a = np.asarray(PIL.Image.open(tmp_path / "four" / name), dtype=int)
        b = np.asarray(PIL.Image.open(tmp_path / "three" / name), dtype=int)
        assert np.abs(a - b).max() <= 1


def test_sample_reports_a_bad_folder_without_a_traceback(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert sample(tmp_path / "empty", tmp_path / "grid.png") == 2
    assert "punkdiff sample: Missing" in capsys.readouterr().err
    assert not (tmp_path / "grid.png").exists()


def test_sample_points_a_training_output_folder_to_its_pipeline(model_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "pipeline")
    assert sample(run, tmp_path / "grid.png") == 2
    assert f"did you mean {run / 'pipeline'}?" in capsys.readouterr().err
    assert not (tmp_path / "grid.png").exists()


@pytest.mark.parametrize(
    ("flag", "value"), [("--num-images", "0"), ("--num-images", "-3"), ("--steps", "0"), ("--steps", "x")]
)
def test_sample_rejects_non_positive_counts(model_dir, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        sample(model_dir, tmp_path / "grid.png", flag, value)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"argument {flag}" in err
    assert ("must be at least 1" if value != "x" else "expected a positive integer") in err
    assert not (tmp_path / "grid.png").exists()


def test_push_uploads_the_folder(model_dir, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with fake_hub() as hub:
        assert main(["push", str(model_dir), "--repo-id", "someone/tiny", "--private"]) == 0
    assert capsys.readouterr().out.strip() == f"pushed {model_dir} to https://huggingface.co/someone/tiny"
    assert set(hub.uploaded) == {
        "README.md",
        "model_index.json",
        "pipeline.py",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    }


def test_push_needs_a_repo_id_and_a_valid_folder(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["push", str(model_dir)])
    assert exit_info.value.code == 2 and "--repo-id" in capsys.readouterr().err
    with fake_hub() as hub:
        assert main(["push", str(tmp_path), "--repo-id", "someone/tiny"]) == 2
    assert "punkdiff push: Missing" in capsys.readouterr().err and hub.requests == []


@pytest.mark.slow
def test_demo_trains_exports_and_animates(tmp_path, capsys):
    """`punkdiff demo` (the README's main command) on its embedded default data, shortened to a few steps."""
    import json

    from diffusers import DDPMPipeline

    out = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(out), "--max-steps", "6", "--batch-size", "16"]) == 0
    printed = capsys.readouterr().out
    for name in ["pipeline", "samples.png", "denoising.gif", "noising.gif", "loss_curve.png", "training_summary.json"]:
        assert str((out / name).resolve()) in printed, name
        assert (out / name).exists(), name
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["preset"] == "mnist-baseline-16" and summary["steps"] == 6
    assert summary["config"]["data"]["dataset"] == "sklearn-digits"
    images = DDPMPipeline.from_pretrained(out / "pipeline")(batch_size=1, num_inference_steps=2).images
    assert images[0].size == (16, 16)
    gif = PIL.Image.open(out / "denoising.gif")
    assert gif.n_frames == 25  # 50 DDIM steps, subsampled; x_t beside the predicted x_0
    assert gif.size[0] > 2 * gif.size[1]
