"""A smoke of the benchmark harness (`benchmarks/`): tiny configurations, a few steps, no timing asserted.

The benchmarks themselves are not tests (their figures live in `benchmarks/results/` and the README); this only
keeps the scripts runnable and checks what they assert besides speed: the contenders train and sample the same
configuration, punkdiff's DDIM images equal stock `DDIMPipeline`'s from the same noise, and the data paths agree.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def benchmarks():
    sys.path.insert(0, str(BENCHMARKS))
    import bench_data
    import bench_sample
    import bench_train

    yield bench_train, bench_sample, bench_data
    sys.path.remove(str(BENCHMARKS))


@pytest.fixture
def benchlib():
    sys.path.insert(0, str(BENCHMARKS))
    import benchlib

    yield benchlib
    sys.path.remove(str(BENCHMARKS))


def test_a_ratio_is_refused_when_the_load_rose_or_was_high_at_the_start(benchlib):
    quiet = benchlib.LoadWatch(max_load=0.5, timeout_s=0, log=print)
    quiet.start, quiet.samples = 0.3, [1.2, 2.4, 2.9]  # the benchmark's own 2 threads: up to 0.5 + 2 + 0.5
    assert quiet.refusal(own_threads=2) is None
    disturbed = benchlib.LoadWatch(max_load=0.5, timeout_s=0, log=print)
    disturbed.start, disturbed.samples = 0.3, [1.9, 3.4, 2.1]
    assert "rose to 3.40" in disturbed.refusal(own_threads=2)
    busy = benchlib.LoadWatch(max_load=0.5, timeout_s=0, log=print)
    busy.start, busy.samples = 1.7, [1.8]
    assert "1.70 at the start" in busy.refusal(own_threads=2)
    unchecked = benchlib.LoadWatch(max_load=0.5, timeout_s=0, log=print, checked=False)
    assert "--skip-load-wait" in unchecked.refusal(own_threads=1)


def test_bench_train_runs_every_contender_on_the_same_config(benchmarks, mnist_dir, tmp_path):
    bench_train, _, _ = benchmarks
    out = tmp_path / "train.json"
    assert bench_train.main(["--presets", "mnist-32-tiny", "--contenders", "punkdiff", "recipe", "bare",
                             "--warmup-steps", "1", "--steps", "2", "--repeats", "1", "--threads", "0",
                             "--max-load", "1000", "--datasets-root", str(mnist_dir.parent), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (result,) = report["results"]
    assert result["config"] == "mnist-32-tiny" and result["batch_size"] == 16 and result["images"] == 256
    contenders = result["contenders"]
    assert set(contenders) == {"punkdiff", "recipe", "bare"}
    assert all(c["images_per_s"]["median"] > 0 for c in contenders.values())
    assert len({c["gflop_per_image_fwd_bwd"] for c in contenders.values()}) == 1  # one UNet for all three
    assert "ratio_over_bare" in contenders["punkdiff"] and "ratio_over_recipe" in contenders["punkdiff"]
    assert {"date", "platform", "versions", "loadavg_start"} <= set(report["machine"])


def test_bench_train_refuses_its_ratios_when_another_job_loads_the_machine(benchmarks, benchlib, mnist_dir, tmp_path,
                                                                           monkeypatch, capsys):
    bench_train, _, _ = benchmarks
    loads = itertools.chain([0.2], itertools.repeat(6.0))  # quiet at the start, then another job
    monkeypatch.setattr(benchlib.os, "getloadavg", lambda: (next(loads), 0.0, 0.0))
    out = tmp_path / "train.json"
    assert bench_train.main(["--presets", "mnist-32-tiny", "--contenders", "punkdiff", "bare", "--warmup-steps", "1",
                             "--steps", "20", "--repeats", "3", "--threads", "1", "--wait-s", "0",
                             "--datasets-root", str(mnist_dir.parent), "--out", str(out)]) == 3
    report = json.loads(out.read_text())
    assert "rose to 6.00" in report["ratios_refused"] and report["machine"]["loadavg_start"] == 0.2
    printed = capsys.readouterr().out
    assert "ratios refused: the load rose to 6.00" in printed and "punkdiff/bare per repeat" not in printed


def test_a_smoke_run_neither_waits_for_the_load_nor_reports_a_checked_ratio(benchmarks, benchlib, mnist_dir,
                                                                           tmp_path, monkeypatch, capsys):
    bench_train, _, _ = benchmarks
    monkeypatch.setattr(benchlib.os, "getloadavg", lambda: (9.0, 9.0, 9.0))  # a busy machine: no wait all the same
    out = tmp_path / "train.json"
    assert bench_train.main(["--presets", "mnist-32-tiny", "--contenders", "punkdiff", "bare", "--warmup-steps", "1",
                             "--steps", "2", "--repeats", "1", "--threads", "1", "--datasets-root",
                             str(mnist_dir.parent), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "a smoke run" in report["ratios_refused"] and report["machine"]["load_checked"] is False
    assert "ratios not checked" in capsys.readouterr().out


def test_profile_step_finds_no_per_step_accelerate_wrappers_in_punkdiffs_loop(mnist_dir, tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import profile_step
    finally:
        sys.path.remove(str(BENCHMARKS))
    out = tmp_path / "profile.json"
    assert profile_step.main(["--preset", "mnist-32-tiny", "--threads", "1", "--warmup-steps", "1", "--steps", "3",
                              "--max-load", "1000", "--wait-s", "0", "--datasets-root", str(mnist_dir.parent),
                              "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    punkdiff, bare = row["punkdiff"]["costs_ms"], row["bare"]["costs_ms"]
    for cost in ("forward (UNet)", "backward", "optimizer step (AdamW)", "EMA", "grad norm + clip"):
        assert punkdiff[cost] > 0 and bare[cost] > 0, cost  # both loops' work is found where it is done
    # the loop clips, steps AdamW and updates the EMA on the parameter list taken once, not through Accelerate's
    # wrappers (one process, no fp16 scaler: they would only call through)
    assert punkdiff["clip wrapper (Accelerate)"] == 0 and punkdiff["unwrap_model (Accelerate)"] == 0
    assert punkdiff["optimizer wrapper (Accelerate)"] == 0
    assert punkdiff["noise + timesteps"] > 0 and bare["step log (on device; read every N steps)"] == 0


def test_bench_settings_times_two_processes_at_the_same_global_batch(mnist_dir, tmp_path):
    import subprocess

    out = tmp_path / "settings.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_settings.py"), "--presets", "mnist-16",
                           "--settings", "2x1", "--warmup-steps", "1", "--steps", "2", "--skip-load-wait",
                           "--datasets-root", str(mnist_dir.parent), "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    (result,) = json.loads(out.read_text())["results"]
    assert (result["processes"], result["threads_per_process"], result["batch_per_process"]) == (2, 1, 16)
    assert result["global_batch"] == 32 and result["timed_steps"] == 2 and result["images_per_s"]["median"] > 0
    assert "mnist-16       2x1" in done.stdout


def test_bench_sample_punkdiff_gives_stock_ddim_images(benchmarks, tmp_path):
    _, bench_sample, _ = benchmarks
    out = tmp_path / "sample.json"
    assert bench_sample.main(["--presets", "mnist-32-tiny", "--batch-sizes", "2", "--steps", "3", "--repeats", "1",
                              "--contenders", "punkdiff", "bare", "stock", "--threads", "0", "--max-load", "1000",
                              "--count", "5", "--out", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert result["max_abs_diff_punkdiff_vs_stock"] < 1e-5  # same noise, same model: the same images
    assert set(result["contenders"]) == {"punkdiff", "bare", "stock"}
    assert result["count"]["images"] == 6  # whole batches of 2 until 5 exist


def test_bench_sample_runs_stock_ddim_with_a_bf16_unet(benchmarks, tmp_path):
    _, bench_sample, _ = benchmarks
    out = tmp_path / "sample.json"
    assert bench_sample.main(["--presets", "mnist-32-tiny", "--batch-sizes", "2", "--steps", "2", "--repeats", "1",
                              "--contenders", "punkdiff", "stock", "--bf16", "--threads", "0", "--max-load", "1000",
                              "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (result,) = report["results"]
    assert report["options"]["bf16"] and result["max_abs_diff_punkdiff_vs_stock"] is None  # compared in fp32 only
    assert result["contenders"]["stock"]["images_per_s"]["median"] > 0


def test_bench_data_paths_agree_and_decode_memory_is_measured(benchmarks, mnist_dir, tmp_path):
    _, _, bench_data = benchmarks
    out = tmp_path / "data.json"
    assert bench_data.main(["--quick", "--presets", "mnist-baseline-16", "--repeats", "1", "--batches", "2",
                            "--datasets-root", str(mnist_dir.parent), "--out", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert result["tensor_shape"] == [500, 1, 16, 16]
    assert result["check"]["first_batch_mean_abs_diff"] < 0.05  # MNIST: both resize bilinearly
    assert result["punkdiff_prep_peak_pss_bytes"] >= result["punkdiff_prep_peak_anon_bytes"] > 0
    assert result["punkdiff_prep_images_per_s"] > 0


def test_bench_guidance_sweeps_the_scale_with_the_eval_code(mnist_dir, metrics_cache, tmp_path, digit_classifier):
    """A 16 px digit model (untrained) at w = 0, 1, 3: the same requests and seeds at every scale, so w = 0 (the
    unconditional model) and w = 1 (the conditional one) differ only by the condition, and the plot is written."""
    import PIL.Image
    import torch
    from diffusers import DDPMScheduler
    from tiny_models import DIGITS, tiny_unet

    from punkdiff.hub import export_pipeline

    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_guidance
    finally:
        sys.path.remove(str(BENCHMARKS))
    unet = tiny_unet(channels=1, sample_size=16, num_class_embeds=11)
    with torch.no_grad():
        unet.class_embedding.weight.mul_(4.0)  # so the condition visibly changes the output
    model = export_pipeline(unet, DDPMScheduler(), tmp_path / "digits", condition=DIGITS)
    out = tmp_path / "guidance.json"
    assert bench_guidance.main([str(model), "--reference", str(mnist_dir), "--preset", "mnist-baseline-16",
                                "--scales", "0", "1", "3", "--num-samples", "12", "--steps", "2", "--per-class", "1",
                                "--cache-dir", str(metrics_cache), "--work-dir", str(tmp_path / "work"),
                                "--out", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    points = report["points"]
    assert [p["guidance_scale"] for p in points] == [0.0, 1.0, 3.0] and report["machine"]["versions"]["torch"]
    assert len({p["fd_classifier_floor"] for p in points}) == 1 and len({p["fd_classifier"] for p in points}) == 3
    assert all(p["accuracy_floor"] >= 0.95 and 0 <= p["accuracy"] <= 1 for p in points)
    assert points[0]["label_recall"] is None and len(points[0]["balanced_per_class_accuracy"]) == 10
    assert (tmp_path / "work" / "guidance-3" / "report.md").is_file()
    assert PIL.Image.open(out.with_suffix(".png")).size == (1100, 440)


def test_bench_inference_times_teacher_and_student_per_setting_in_the_precision_it_says(tmp_path):
    import subprocess

    from punkdiff.precision import cpu_has_native_bf16

    out = tmp_path / "inference.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_inference.py"), "--presets", "mnist-32-tiny",
                           "--teacher-steps", "2", "--settings", "fp32", "bf16", "auto", "--batch-sizes", "2",
                           "--num-images", "2", "--skip-load-wait", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = {(r["role"], r["setting"]): r for r in report["results"]}
    native = cpu_has_native_bf16()
    assert set(rows) == {(role, s) for role in ("teacher", "student") for s in ("fp32", "auto", *(["bf16"] * native))}
    assert rows["student", "fp32"]["sampling"] == "ddim-trailing-4, eta 0"  # a student's sampler and steps
    assert rows["teacher", "fp32"]["sampling"] == "ddim-2, eta 1"
    assert rows["teacher", "fp32"]["computed_in"] == "float32"
    assert rows["teacher", "auto"]["computed_in"] == ("bfloat16" if native else "float32")
    assert not rows["teacher", "fp32"]["trained_weights"] and report["machine"]["native_bf16"] == native
    assert "student  ddim-trailing-4, eta 0" in done.stdout and "figures not checked" in done.stdout


def test_bench_distill_times_the_teachers_training_and_each_stage_and_projects_them(mnist_dir, tmp_path):
    import subprocess

    from tiny_training import train_tiny

    cache = tmp_path / "cache"
    assert train_tiny(mnist_dir, cache, tmp_path / "teacher", "--max-steps", "3") == 0
    out = tmp_path / "distill.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_distill.py"), str(tmp_path / "teacher" / "pipeline"),
                           "--teacher-steps", "4", "--steps", "2", "--stage-steps", "10", "--dmd-steps", "5",
                           "--measure-steps", "2",
                           "--repeats", "1", "--threads", "1", "--skip-load-wait", "--cache-dir", str(cache),
                           "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    teacher, student, dmd, total = json.loads(out.read_text())["results"]
    assert teacher["steps"] == 3 and teacher["seconds_per_step"]["median"] > 0
    assert teacher["projected_s"] == pytest.approx(3 * teacher["seconds_per_step"]["median"])
    assert student["stages"] == [4, 2] and student["teacher_solver"] == "dpm-solver-2m" and student["steps"] == 10
    assert student["vs_teacher"] == pytest.approx(student["projected_s"] / teacher["projected_s"])
    assert dmd["run"] == "distribution matching" and dmd["steps"] == 5 and dmd["seconds_per_step"]["median"] > 0
    assert dmd["projected_s"] == pytest.approx(5 * dmd["seconds_per_step"]["median"])
    assert total["steps"] == 15 and total["projected_s"] == pytest.approx(student["projected_s"] + dmd["projected_s"])
    assert total["vs_teacher"] == pytest.approx(total["projected_s"] / teacher["projected_s"])
    assert json.loads(out.with_name("distill-teacher-config.json").read_text())["model"]["block_out_channels"] == [
        8, 16]  # the teacher's own UNet, not its preset's
    assert "the ratio not checked" in done.stdout


def test_bench_steps_scores_every_sampler_and_the_student_beside_the_floor(mnist_dir, metrics_cache, tmp_path):
    import PIL.Image
    from diffusers import DDPMScheduler
    from tiny_models import tiny_unet

    from punkdiff.hub import export_pipeline
    from punkdiff.pipelines.punkdiff_pipeline import SamplingConfig

    teacher = export_pipeline(tiny_unet(channels=1, sample_size=16), DDPMScheduler(), tmp_path / "teacher")
    student = export_pipeline(tiny_unet(channels=1, sample_size=16, seed=1),
                              DDPMScheduler(prediction_type="v_prediction", timestep_spacing="trailing"),
                              tmp_path / "student", sampling=SamplingConfig("ddim-trailing", 2, 0.0, 2))
    out = tmp_path / "steps.json"
    done = subprocess_run([str(BENCHMARKS / "bench_steps.py"), str(teacher), "--student", str(student),
                           "--reference", str(mnist_dir), "--preset", "mnist-16", "--max-reference", "300",
                           "--samplers", "ddim", "dpm++", "--nfe", "1", "2", "--num-samples", "12",
                           "--cache-dir", str(metrics_cache), "--out", str(out)])
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    points = {(p["role"], p["sampler"], p["nfe"]): p for p in report["results"]}
    assert set(points) == {("teacher", s, n) for s in ("ddim", "dpm++") for n in (1, 2)} | {
        ("student", "ddim-trailing", n) for n in (1, 2)}
    assert [p["distilled"] for k, p in points.items() if k[0] == "student"] == [False, True]
    for p in points.values():
        fd = p["metrics"]["fd_classifier"]
        assert p["num_images"] == 12 and fd["floor"] > 0 and fd["ratio"] == pytest.approx(fd["model"] / fd["floor"])
        assert p["metrics"]["swd"]["floor"] > 0
    assert points["teacher", "ddim", 1]["metrics"] != points["teacher", "ddim", 2]["metrics"]  # really sampled anew
    plot = PIL.Image.open(tmp_path / "steps.png")
    assert plot.size[0] > 400 and len(set(plot.convert("L").getdata())) > 20  # a drawn figure, not a blank page
    assert "student  ddim-trailing     2" in done.stdout

    # --resume keeps what --out holds for the same models and options, and measures only the points it lacks
    again = subprocess_run([str(BENCHMARKS / "bench_steps.py"), str(teacher), "--student", str(student),
                            "--reference", str(mnist_dir), "--preset", "mnist-16", "--max-reference", "300",
                            "--samplers", "ddim", "--nfe", "1", "4", "--num-samples", "12", "--resume",
                            "--cache-dir", str(metrics_cache), "--out", str(out)])
    assert again.returncode == 0, again.stderr[-2000:]
    resumed = {(p["role"], p["sampler"], p["nfe"]): p for p in json.loads(out.read_text())["results"]}
    assert set(resumed) == {("teacher", "ddim", 1), ("teacher", "ddim", 4), ("student", "ddim-trailing", 1),
                            ("student", "ddim-trailing", 4)}
    assert resumed["teacher", "ddim", 1] == points["teacher", "ddim", 1]  # kept, not sampled again
    assert resumed["student", "ddim-trailing", 1] == points["student", "ddim-trailing", 1]
    assert resumed["teacher", "ddim", 4]["num_images"] == 12 and not resumed["student", "ddim-trailing", 4]["distilled"]


def subprocess_run(args: list[str]):
    import subprocess

    return subprocess.run([sys.executable, *args], capture_output=True, text=True)
