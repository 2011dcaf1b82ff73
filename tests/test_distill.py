"""`training/distill.py` / `punkdiff distill`: stages, the distribution-matching stage, the student export, stock
loading, exact resume, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDPMPipeline
from safetensors.torch import load_file
from tiny_training import exported_weights, max_diff, reset_accelerate_state, train_tiny

from punkdiff import PunkDiffPipeline
from punkdiff.hub import ModelFolderError, validate_model_folder
from punkdiff.scripts.distill import main as distill_main


def distill(teacher: Path, cache_dir: Path, out: Path, *extra: str) -> int:
    """A tiny distillation (8 -> 4 -> 2 steps, then distribution matching; 2 optimizer steps a stage) in this
    process."""
    reset_accelerate_state()
    try:
        return distill_main([str(teacher), "--teacher-steps", "8", "--steps", "2", "--stage-factor", "2",
                             "--teacher-solver", "ddim", "--max-steps", "2",
                             "--checkpoint-every", "1", "--report-to", "none", "--cache-dir", str(cache_dir),
                             "--output-dir", str(out), *extra])
    finally:
        reset_accelerate_state()


@pytest.fixture(scope="module")
def teacher(mnist_dir, cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    assert train_tiny(mnist_dir, cache_dir, out, "--max-steps", "3") == 0
    return out / "pipeline"


@pytest.fixture(scope="module")
def student(teacher, cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("student")
    assert distill(teacher, cache_dir, out) == 0
    return out


def test_each_stage_halves_the_steps_then_distribution_matching_and_the_student_is_a_normal_export(student, teacher):
    assert sorted(p.name for p in student.glob("stage-*")) == ["stage-2", "stage-2-dmd", "stage-4"]
    for stage in ("stage-4", "stage-2", "stage-2-dmd"):
        summary = json.loads((student / stage / "training_summary.json").read_text())
        assert summary["steps"] == 2 and summary["config"]["scheduler"]["prediction_type"] == "v_prediction"
        assert summary["config"]["data"]["max_samples"] == 64  # the teacher's own data pipeline
    dmd = json.loads((student / "stage-2-dmd" / "training_summary.json").read_text())["config"]["train"]
    assert (dmd["learning_rate"], dmd["lr_scheduler"], dmd["lr_warmup_steps"]) == (1e-5, "constant", 0)
    # its checkpoints hold the fake denoiser, in safetensors
    checkpoint = student / "stage-2-dmd" / "checkpoints" / "checkpoint-1"
    weights = load_file(checkpoint / "fake_denoiser" / "weights.safetensors")
    assert any(k.startswith("discriminator.") for k in weights) and "conv_in.weight" in weights  # GAN on by default
    validate_model_folder(student / "pipeline")
    run = json.loads((student / "training_summary.json").read_text())  # what eval reads for the preprocessing
    assert run["config"]["data"]["max_samples"] == 64 and run["distillation"]["stages"] == [8, 4, 2]
    assert run["distillation"]["dmd_steps"] == 2 and run["steps"] == 2 and run["distillation"]["gan_weight"] > 0
    assert max_diff(exported_weights(student), exported_weights(student / "stage-2")) > 0  # the last stage's
    config = json.loads((student / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert (config["timestep_spacing"], config["prediction_type"], config["clip_sample"]) == (
        "trailing", "v_prediction", False)
    card = (student / "pipeline" / "README.md").read_text()
    assert f"distilled from `{teacher}`" in card and "8 -> 4 -> 2" in card and "num_inference_steps=2" in card
    assert "then 2 steps of distribution matching" in card and "a GAN term that also sees the" in card
    # the student moved away from its teacher's weights
    teacher_weights = exported_weights(teacher.parent)
    assert max_diff(exported_weights(student), teacher_weights) > 0


def test_stock_ddim_samples_the_student_exactly_as_punkdiff_does(student):
    ours = PunkDiffPipeline.from_pretrained(student / "pipeline")
    stock = DDIMPipeline.from_pretrained(student / "pipeline")
    stock.set_progress_bar_config(disable=True)
    ours.set_progress_bar_config(disable=True)
    a = ours(batch_size=3, generator=torch.Generator().manual_seed(0), sampler="ddim", num_inference_steps=2,
             eta=0.0, output_type="np").images
    b = stock(batch_size=3, generator=torch.Generator().manual_seed(0), num_inference_steps=2, eta=0.0,
              output_type="np").images
    assert np.array_equal(a, b)
    # the student says how it is sampled: a call that leaves the sampler out gets the same images
    assert json.loads((student / "pipeline" / "sampling.json").read_text()) == {
        "sampler": "ddim-trailing", "num_inference_steps": 2, "eta": 0.0, "distilled_steps": 2}
    assert np.array_equal(ours(batch_size=3, generator=torch.Generator().manual_seed(0), output_type="np").images, b)
    assert DDPMPipeline.from_pretrained(student / "pipeline").unet.config.sample_size == 16  # every route loads it


@pytest.mark.parametrize("killed_in", ["stage-2", "stage-2-dmd"])
def test_an_interrupted_distillation_resumes_to_the_same_student(student, teacher, cache_dir, tmp_path, killed_in):
    out = Path(shutil.copytree(student, tmp_path / "run"))
    finished_stage = (out / "stage-4" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    # killed after the stage's first step: its later checkpoint, its export, later stages and the student are not
    # there yet (the distribution-matching stage resumes with its fake denoiser)
    if killed_in == "stage-2":
        shutil.rmtree(out / "stage-2-dmd")
    for path in (f"{killed_in}/checkpoints/checkpoint-2", f"{killed_in}/pipeline", "pipeline"):
        shutil.rmtree(out / path)
    (out / killed_in / "training_summary.json").unlink()
    assert distill(teacher, cache_dir, out, "--resume-from-checkpoint", "latest") == 0
    assert max_diff(exported_weights(out), exported_weights(student)) == 0.0
    stage_weights = out / "stage-4" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
    assert stage_weights.stat().st_mtime_ns == finished_stage  # the finished stage was not run again


def test_bad_requests_are_refused_before_any_work(teacher, cache_dir, tmp_path, capsys):
    assert distill(teacher, cache_dir, tmp_path / "a", "--steps", "3") == 2
    assert "not reachable by halving the teacher's 8 steps: choose one of 4, 2, 1" in capsys.readouterr().err
    assert distill(tmp_path / "nowhere", cache_dir, tmp_path / "b") == 2
    assert "nowhere" in capsys.readouterr().err
    x0_teacher = Path(shutil.copytree(teacher, tmp_path / "x0-teacher"))
    config_path = x0_teacher / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "prediction_type": "sample"}))
    assert distill(x0_teacher, cache_dir, tmp_path / "c", "--preset", "mnist-baseline-16") == 2
    assert "needs an epsilon- or v-prediction teacher" in capsys.readouterr().err
    assert distill(teacher, cache_dir, tmp_path / "d", "--teacher-steps", "9", "--steps", "3", "--stage-factor", "3",
                   "--teacher-solver", "dpm-solver-2") == 2
    assert "dpm-solver-2 with an even factor" in capsys.readouterr().err
    assert distill(teacher, cache_dir, tmp_path / "e", "--dmd-steps", "-1") == 2
    assert "--dmd-steps -1 must be 0 (no distribution-matching stage) or more" in capsys.readouterr().err
    assert distill(teacher, cache_dir, tmp_path / "f", "--gan-weight", "-0.5") == 2
    assert "--gan-weight -0.5 must be 0 (no GAN term) or more" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "c" / "stage-4").exists()
    assert not (tmp_path / "e" / "stage-4").exists() and not (tmp_path / "f" / "stage-4").exists()
    assert not (tmp_path / "d" / "stage-3").exists()


def test_by_default_one_stage_with_a_second_order_teacher_walk(teacher, cache_dir, tmp_path):
    """The defaults (--stage-factor 0, --teacher-solver dpm-solver-2m): 8 -> 2 in one stage, in the run's summary."""
    out = tmp_path / "one-stage"
    assert distill(teacher, cache_dir, out, "--stage-factor", "0", "--teacher-solver", "dpm-solver-2m") == 0
    assert sorted(p.name for p in out.glob("stage-*")) == ["stage-2", "stage-2-dmd"]
    run = json.loads((out / "training_summary.json").read_text())
    assert run["distillation"]["stages"] == [8, 2] and run["distillation"]["teacher_solver"] == "dpm-solver-2m"
    stage = json.loads((out / "stage-2" / "training_summary.json").read_text())
    assert stage["config"]["train"]["learning_rate"] == 3e-4  # distillation's own default, not the teacher's 1e-3
    assert "8 -> 2" in (out / "pipeline" / "README.md").read_text()
    assert max_diff(exported_weights(out), exported_weights(teacher.parent)) > 0


def test_dmd_steps_0_leaves_out_distribution_matching(teacher, cache_dir, tmp_path):
    out = tmp_path / "no-dmd"
    assert distill(teacher, cache_dir, out, "--stage-factor", "0", "--dmd-steps", "0") == 0
    assert sorted(p.name for p in out.glob("stage-*")) == ["stage-2"]
    assert json.loads((out / "training_summary.json").read_text())["distillation"]["dmd_steps"] == 0
    assert "distribution matching" not in (out / "pipeline" / "README.md").read_text()
    assert max_diff(exported_weights(out), exported_weights(out / "stage-2")) == 0.0


def test_by_default_a_student_copies_the_teachers_32_step_path_for_two_fifths_of_its_steps(mnist_dir, cache_dir,
                                                                                              tmp_path):
    """The defaults: one stage 32 -> 4 (the teacher walking 8 steps per student step) for 2/5 of the teacher's
    optimizer steps; such a step costs about 3 training steps, so about 1.2x the teacher's training time."""
    assert train_tiny(mnist_dir, cache_dir, tmp_path / "t", "--max-steps", "10") == 0
    reset_accelerate_state()
    try:
        assert distill_main([str(tmp_path / "t" / "pipeline"), "--report-to", "none", "--cache-dir", str(cache_dir),
                             "--output-dir", str(tmp_path / "s")]) == 0
    finally:
        reset_accelerate_state()
    assert json.loads((tmp_path / "s" / "stage-4" / "training_summary.json").read_text())["steps"] == 4
    run = json.loads((tmp_path / "s" / "training_summary.json").read_text())["distillation"]
    assert run["stages"] == [32, 4] and run["dmd_steps"] == 1  # 1/13 of the teacher's 10 steps, at least 1


def test_a_finished_student_is_not_overwritten(student, teacher, cache_dir, capsys):
    before = exported_weights(student)
    assert distill(teacher, cache_dir, student) == 2
    assert "already holds a student" in capsys.readouterr().err
    assert max_diff(exported_weights(student), before) == 0.0


def test_distill_runs_the_teachers_data_pipeline_from_its_summary(mnist_dir, cache_dir, tmp_path):
    """The stages train on what the teacher trained on, without --preset or --dataset on the command line."""
    out = tmp_path / "t"
    assert train_tiny(mnist_dir, cache_dir, out, "--max-steps", "1", "--max-train-samples", "16") == 0
    assert distill(out / "pipeline", cache_dir, tmp_path / "s", "--steps", "4") == 0
    summary = json.loads((tmp_path / "s" / "stage-4" / "training_summary.json").read_text())
    assert summary["config"]["data"]["max_samples"] == 16
    assert summary["config"]["data"]["dataset"] == str(mnist_dir)


@pytest.mark.slow
def test_two_cpu_processes_distil_one_student_with_the_ema_in_sync(teacher, cache_dir, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` without a GPU: one gloo job whose stages keep one EMA,
    the distribution-matching stage included (its fake denoiser's gradients are averaged over the processes)."""
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(repo / "training" / "distill.py"), str(teacher), "--teacher-steps", "8", "--steps", "4",
           "--max-steps", "2", "--report-to", "none", "--cache-dir", str(cache_dir), "--output-dir", str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stage in ("stage-4", "stage-4-dmd"):  # distillation, then distribution matching (one fake denoiser)
        summary = json.loads((out / stage / "training_summary.json").read_text())
        assert summary["num_processes"] == 2 and summary["steps"] == 2
        assert summary["ema_in_sync_across_processes"] is True  # both processes hold the same EMA weights
    validate_model_folder(out / "pipeline")
    student = PunkDiffPipeline.from_pretrained(out / "pipeline")
    assert student.sampling_config.distilled_steps == 4
    assert max_diff(exported_weights(out), exported_weights(teacher.parent)) > 0  # trained, and exported once


def test_a_broken_teacher_folder_is_refused_before_any_work(teacher, cache_dir, tmp_path, capsys):
    broken = Path(shutil.copytree(teacher, tmp_path / "broken"))
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelFolderError):
        validate_model_folder(broken)  # the model-folder check itself refuses it ...
    assert distill(broken, cache_dir, tmp_path / "out") == 2  # ... and distillation says so before any work
    err = capsys.readouterr().err
    assert str(broken) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
