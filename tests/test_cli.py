"""The `punkdiff` command line: `sample` and `push` on a tiny exported model, and the `demo` main job."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from diffusers import DDPMScheduler
from fake_hub import fake_hub
from huggingface_hub import ModelCard
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tiny_models import digit_pipeline, punk_pipeline, tiny_unet

from punkdiff.cli import main
from punkdiff.hub import export_pipeline
from punkdiff.presets import RECOMMENDED_SAMPLING


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return export_pipeline(tiny_unet(channels=3), DDPMScheduler(), tmp_path_factory.mktemp("cli") / "model")


def sample(model_dir: Path, out: Path, *extra: str) -> int:
    """`punkdiff sample` in float32, so its images match `generate`'s default to the bit on any CPU."""
    args = ["sample", str(model_dir), "--scheduler", "ddim", "--steps", "3", "--seed", "7", "--device", "cpu",
            "--precision", "float32"]
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


@pytest.mark.parametrize("command", ["sample", "eval"])
@pytest.mark.parametrize("seed", [str(-1), str(2**63), str(-(2**63) - 1), "1.5"])
def test_seeds_outside_the_generators_range_are_refused_before_any_work(model_dir, tmp_path, capsys, command, seed):
    with pytest.raises(SystemExit) as exit_info:
        main([command, str(model_dir), "--seed", seed, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "argument --seed" in err and "from 0 to 2**63 - 1" in err
    assert not (tmp_path / "out").exists()


def test_the_largest_seed_samples_images_that_still_follow_seed_plus_i(model_dir, tmp_path):
    top = 2**63 - 1
    assert sample(model_dir, tmp_path / "a.png", "--seed", str(top - 1), "--num-images", "2",
                  "--out-dir", str(tmp_path / "a")) == 0
    assert sample(model_dir, tmp_path / "b.png", "--seed", str(top), "--num-images", "1",
                  "--out-dir", str(tmp_path / "b")) == 0
    second = np.asarray(PIL.Image.open(tmp_path / "a" / "0001.png"), dtype=int)  # seed top - 1 + 1
    only = np.asarray(PIL.Image.open(tmp_path / "b" / "0000.png"), dtype=int)  # seed top
    assert np.abs(second - only).max() <= 1


def test_sample_batches_bound_memory_without_changing_images(model_dir, tmp_path):
    assert sample(model_dir, tmp_path / "one.png", "--num-images", "5", "--batch-size", "5",
                  "--out-dir", str(tmp_path / "one")) == 0
    assert sample(model_dir, tmp_path / "two.png", "--num-images", "5", "--batch-size", "2",
                  "--out-dir", str(tmp_path / "two")) == 0
    for name in [f"{i:04d}.png" for i in range(5)]:
        a = np.asarray(PIL.Image.open(tmp_path / "one" / name), dtype=int)
        b = np.asarray(PIL.Image.open(tmp_path / "two" / name), dtype=int)
        assert np.abs(a - b).max() <= 1, name


def test_sample_dtype_and_gif(model_dir, tmp_path):
    assert sample(model_dir, tmp_path / "bf16.png", "--num-images", "4", "--dtype", "bfloat16",
                  "--gif", str(tmp_path / "denoise.gif")) == 0
    assert sample(model_dir, tmp_path / "fp32.png", "--num-images", "4") == 0
    bf16 = np.asarray(PIL.Image.open(tmp_path / "bf16.png"), dtype=int)
    fp32 = np.asarray(PIL.Image.open(tmp_path / "fp32.png"), dtype=int)
    assert bf16.shape == fp32.shape and 0 < np.abs(bf16 - fp32).mean() < 20  # same images, coarser arithmetic
    gif = PIL.Image.open(tmp_path / "denoise.gif")
    assert gif.n_frames == 3 and gif.size[0] > 2 * gif.size[1]  # one frame per step: x_t | predicted x_0


def test_sample_precision_follows_the_cpu_says_which_and_writes_one_array(model_dir, tmp_path, capsys):
    from punkdiff.precision import cpu_has_native_bf16

    args = ["sample", str(model_dir), "--scheduler", "ddim", "--steps", "3", "--seed", "7", "--num-images", "5",
            "--batch-size", "2", "--out", str(tmp_path / "grid.png"), "--out-dir", str(tmp_path / "pngs"),
            "--out-array", str(tmp_path / "arrays" / "samples.npy")]
    assert main(args) == 0  # --precision auto, the default
    out = capsys.readouterr().out
    auto = "bfloat16" if cpu_has_native_bf16() else "float32"
    assert f"precision: {auto} (" in out and "native bf16" in out
    array = np.load(tmp_path / "arrays" / "samples.npy", allow_pickle=False)
    assert array.dtype == np.uint8 and array.shape == (5, 3, 8, 8)  # [N, C, H, W], as `punkdiff eval` saves samples
    for i in range(5):  # the array holds exactly the images the PNGs hold
        np.testing.assert_array_equal(array[i].transpose(1, 2, 0), np.asarray(PIL.Image.open(tmp_path / "pngs" /
                                                                                               f"{i:04d}.png")))
    assert sample(model_dir, tmp_path / "fp32.png", "--num-images", "5", "--out-array", str(tmp_path / "fp32.npy")) == 0
    fp32 = np.load(tmp_path / "fp32.npy").astype(int)
    assert "precision: float32 (asked for)" in capsys.readouterr().out
    difference = np.abs(array.astype(int) - fp32)
    assert difference.mean() < 2 and (difference.max() > 0) == (auto == "bfloat16")  # bf16 really ran, and agrees


def test_sample_takes_a_hub_model_id(model_dir, tmp_path, monkeypatch):
    with fake_hub(monkeypatch, models={"someone/tiny": model_dir}):
        assert main(["sample", "someone/tiny", "--steps", "3", "--seed", "7", "--num-images", "4", "--device", "cpu",
                     "--precision", "float32", "--out", str(tmp_path / "hub.png")]) == 0
    assert sample(model_dir, tmp_path / "local.png", "--num-images", "4") == 0
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(tmp_path / "hub.png")),
                                  np.asarray(PIL.Image.open(tmp_path / "local.png")))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--device", "bogus"], "--device 'bogus' is not a device"),
        (["--steps", "5000", "--scheduler", "ddpm"], "--steps 5000 is more than the model's 1000 training timesteps"),
        (["--out-dir", "{file}"], "is a file; give a folder"),
        (["--gif", "{tmp}/anim.txt"], "has no image extension"),
        (["--out-array", "{tmp}/samples.png"], "give a file name ending in .npy"),
    ],
)
def test_sample_checks_its_input_before_sampling(model_dir, tmp_path, capsys, extra, message):
    (tmp_path / "file").write_text("x")
    extra = [e.format(file=tmp_path / "file", tmp=tmp_path) for e in extra]
    assert main(["sample", str(model_dir), "--out", str(tmp_path / "grid.png"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "grid.png").exists()


@pytest.mark.parametrize(("flag", "value"), [("--eta", "nan"), ("--eta", "1.5"), ("--eta", "-0.1")])
def test_sample_eta_must_be_a_weight(model_dir, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit):
        sample(model_dir, tmp_path / "grid.png", flag, value)
    assert "must be in [0, 1]" in capsys.readouterr().err


def test_sample_defaults_to_the_model_recommendation_and_flags_win(tmp_path):
    def grid(model: Path, name: str, *flags: str) -> np.ndarray:
        args = ["sample", str(model), "--seed", "7", "--num-images", "4", "--device", "cpu"]
        assert main([*args, "--out", str(tmp_path / name), *flags]) == 0
        return np.asarray(PIL.Image.open(tmp_path / name), dtype=int)

    student = export_pipeline(tiny_unet(channels=3), DDPMScheduler(), tmp_path / "student",
                              sampling={"sampler": "ddim-trailing", "num_inference_steps": 2, "eta": 1.0})
    default = grid(student, "default.png")
    np.testing.assert_array_equal(default, grid(student, "explicit.png", "--scheduler", "ddim-trailing",
                                                "--steps", "2", "--eta", "1"))
    assert np.abs(default - grid(student, "eta0.png", "--eta", "0")).max() > 0

    (student / "sampling.json").unlink()  # a model saved without one: punkdiff's defaults, DDIM-50 with eta 1
    assert RECOMMENDED_SAMPLING == {"sampler": "ddim", "num_inference_steps": 50, "eta": 1.0}
    old = grid(student, "old.png")
    np.testing.assert_array_equal(old, grid(student, "old-explicit.png", "--scheduler", "ddim", "--steps", "50",
                                            "--eta", "1"))


def test_sample_scheduler_choices_are_the_pipeline_samplers(model_dir, tmp_path, capsys):
    from punkdiff.pipelines.punkdiff_pipeline import SAMPLERS

    with pytest.raises(SystemExit):
        sample(model_dir, tmp_path / "grid.png", "--scheduler", "euler")
    err = capsys.readouterr().err
    assert "invalid choice: 'euler'" in err and all(repr(name) in err for name in SAMPLERS)
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"the sampler: {', '.join(SAMPLERS)} (default: the model's recommendation" in help_text
    assert sample(model_dir, tmp_path / "unipc.png", "--scheduler", "unipc-karras", "--num-images", "2") == 0


def test_reconstruct_returns_lightly_noised_images_and_checks_t(model_dir, tmp_path, capsys):
    source = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    source.save(tmp_path / "in.png")
    args = ["reconstruct", str(model_dir), str(tmp_path / "in.png"), str(tmp_path / "in.png"), "--device", "cpu",
            "--steps", "5"]
    assert main([*args, "--t-start", "0", "--out", str(tmp_path / "recon.png")]) == 0
    grid = np.asarray(PIL.Image.open(tmp_path / "recon.png"), dtype=int)
    assert grid.shape == (16, 16, 3)  # two rows of original | reconstruction
    original, reconstructed = grid[:8, :8], grid[:8, 8:]
    assert np.abs(original - np.asarray(source, dtype=int)).max() == 0
    assert np.abs(reconstructed - original).mean() < 8  # t=0 barely noises: the image comes back
    assert main([*args, "--t-start", "1000", "--out", str(tmp_path / "bad.png")]) == 2
    assert "--t-start must be in [0, 1000)" in capsys.readouterr().err


def test_inpaint_keeps_the_black_part_of_the_mask(model_dir, tmp_path):
    source = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    source.save(tmp_path / "in.png")  # twice the model's size: resized with nearest
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:4] = 255  # regenerate the top half
    PIL.Image.fromarray(mask).save(tmp_path / "mask.png")
    assert main(["inpaint", str(model_dir), str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                 "--device", "cpu", "--steps", "10", "--jump-length", "2", "--jump-n-sample", "2",
                 "--num-images", "2", "--resize-filter", "nearest", "--out", str(tmp_path / "filled.png")]) == 0
    grid = np.asarray(PIL.Image.open(tmp_path / "filled.png"), dtype=int)
    expected = np.asarray(source.resize((8, 8), PIL.Image.Resampling.NEAREST), dtype=int)
    for tile in (grid[:8, 8:], grid[8:, :8]):  # the two fillings beside the masked input
        assert np.abs(tile[4:] - expected[4:]).max() <= 1  # kept
        assert np.abs(tile[:4] - expected[:4]).mean() > 10  # generated


def test_help_and_presets_start_without_torch():
    import subprocess
    import sys

    code = (
        "import sys, contextlib, io\n"
        "from punkdiff.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['presets'])\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'accelerate', 'datasets') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_no_module_imports_a_unix_only_module_at_import_time():
    """punkdiff's own modules import on Windows: Unix-only modules only inside functions, where a fallback exists."""
    import ast

    unix_only = {"resource", "fcntl", "termios", "pwd", "grp", "posix", "tty", "pty", "syslog", "crypt"}
    repo = Path(__file__).resolve().parents[1]
    files = [*repo.glob("src/punkdiff/**/*.py"), *repo.glob("training/*.py"), *repo.glob("pipelines/*.py")]
    assert len(files) >= 15
    for file in files:
        tree = ast.parse(file.read_text())
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inside = {id(n) for f in functions for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in inside:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not {n.split(".")[0] for n in names} & unix_only, f"{file.name}:{node.lineno}"


def test_push_uploads_the_folder(model_dir, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with fake_hub() as hub:
        assert main(["push", str(model_dir), "--repo-id", "someone/tiny", "--private"]) == 0
    assert capsys.readouterr().out.strip() == f"pushed {model_dir} to https://huggingface.co/someone/tiny"
    assert set(hub.uploaded) == {
        "README.md",
        "model_index.json",
        "pipeline.py",
        "sampling.json",
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
    assert summary["preset"] == "mnist-16" and summary["steps"] == 6
    assert summary["config"]["data"]["dataset"] == "sklearn-digits"
    assert summary["config"]["train"]["use_ema"] is False  # the demo exports its annealed raw weights
    images = DDPMPipeline.from_pretrained(out / "pipeline")(batch_size=1, num_inference_steps=2).images
    assert images[0].size == (16, 16)
    gif = PIL.Image.open(out / "denoising.gif")
    assert gif.n_frames == 25  # 50 DDIM steps, subsampled; x_t beside the predicted x_0
    assert gif.size[0] > 2 * gif.size[1]


# --- hostile flags: a one-line message before any sampling, never a traceback ------------------------------------


def test_out_under_a_file_is_refused_before_sampling(model_dir, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert sample(model_dir, tmp_path / "afile" / "grid.png") == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "sampling" not in err


def _unreachable_hub(status: int | None):
    """The Hub's HTTP boundary answering `status` to everything, or (None) unreachable, as offline."""
    import httpx2
    import huggingface_hub

    def handle(request):
        if status is None:
            raise httpx2.ConnectError("Name or service not known", request=request)
        return httpx2.Response(status, json={"error": "Invalid credentials in Authorization header"})

    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(handle)))


@pytest.mark.parametrize("status", [None, 401, 403], ids=["offline", "rejected-token", "no-write-access"])
def test_push_failures_say_what_to_check_and_never_show_the_token(model_dir, tmp_path, monkeypatch, capsys, status):
    from huggingface_hub.utils._http import default_client_factory

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_TOKEN", "hf_secretsecretsecret")
    _unreachable_hub(status)
    try:
        assert main(["push", str(model_dir), "--repo-id", "someone/tiny"]) == 2
    finally:
        import huggingface_hub

        huggingface_hub.set_client_factory(default_client_factory)
    err = capsys.readouterr().err
    assert "the push to someone/tiny failed" in err and "hf auth login" in err and "Traceback" not in err
    assert "hf_secret" not in err
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and b"hf_secret" in p.read_bytes()]


_FLAG_VALUES = st.one_of(
    st.integers(-3, 6).map(str), st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["nan", "inf", "-0", "1e3", ""]),
    st.text(max_size=8), st.sampled_from(["cpu", "cuda", "cuda:7", "mps", "bogus", "float16", "ddpm", "dpm++"]),
)
_SAMPLE_FLAGS = ["--steps", "--num-images", "--batch-size", "--eta", "--seed", "--device", "--dtype", "--scheduler",
                 "--out", "--out-dir"]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flags=st.lists(st.tuples(st.sampled_from(_SAMPLE_FLAGS), _FLAG_VALUES), max_size=4))
def test_fuzzed_sample_flags_sample_or_say_what_is_wrong(model_dir, tmp_path, flags):
    """Any values for any `sample` flags: images (small runs only), or exit 2 with a message; never a traceback."""
    argv = ["sample", str(model_dir), "--out", str(tmp_path / "grid.png"), "--steps", "2", "--num-images", "2"]
    for flag, value in flags:
        if flag in ("--steps", "--num-images") and value.lstrip("-").isdecimal() and int(value) > 6:
            value = "6"  # keep the runs that are valid short
        argv += [flag, value if flag not in ("--out", "--out-dir") else str(tmp_path / value.replace("/", "_"))]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    except SystemExit as exit_info:  # argparse: the usage line and the bad flag
        assert exit_info.code == 2 and "error: argument" in err.getvalue()
        return
    assert code == 0 or (code == 2 and err.getvalue().startswith("punkdiff sample: ")), err.getvalue()
def test_eval_samples_then_scores_with_floors_and_a_report(tmp_path, mnist_dir, mnist16, digit_classifier,
                                                           metrics_cache, capsys, monkeypatch):
    monkeypatch.delenv("PUNKDIFF_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.delenv("PUNKDIFF_DINOV2", raising=False)
    model = export_pipeline(tiny_unet(channels=1, sample_size=16), DDPMScheduler(), tmp_path / "digits")
    common = ["--reference", str(mnist_dir), "--preset", "mnist-baseline-16", "--cache-dir", str(metrics_cache)]
    code = main(["eval", str(model), *common, "--num-samples", "40", "--steps", "3", "--batch-size", "20",
                 "--reconstruction-images", "4", "--out", str(tmp_path / "eval"), "--device", "cpu",
                 "--update-card"])
    assert code == 0
    out = capsys.readouterr().out
    assert "fd_classifier" in out and str((tmp_path / "eval" / "report.md").resolve()) in out
    assert f"model card updated: {(model / 'README.md').resolve()}" in out
    card_values = {r.metric_name: r.metric_value for r in ModelCard.load(model / "README.md").data.eval_results}
    import json

    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_images"] == 40 and metrics["preprocessing"] == "preset 'mnist-baseline-16'"
    # an untrained model's noise is far from digits; the floor (real vs real) is not
    fd = metrics["metrics"]["fd_classifier"]
    assert fd["model"] > 10 * fd["floor"] and card_values["fd_classifier (40 samples, ddim-3, eta 1)"] == fd["model"]
    assert len(metrics["reconstruction"]["t"]) >= 2
    assert metrics["not_computed"] == {name: "not computed: weights unavailable"
                                       for name in ("fid", "kid_inception", "inception_score", "fd_dinov2")}

    # a peer's samples, scored by the same code: real test digits as a uint8 .npy, no model
    np.save(tmp_path / "peer.npy", mnist16.heldout[:40])
    assert main(["eval", "--samples", str(tmp_path / "peer.npy"), *common, "--out", str(tmp_path / "peer")]) == 0
    peer = json.loads((tmp_path / "peer" / "metrics.json").read_text())["metrics"]["fd_classifier"]
    assert peer["model"] < fd["model"] / 10


def test_eval_with_inception_and_dinov2_weights(tmp_path, mnist_dir, mnist16, digit_classifier, metrics_cache,
                                               inception_weights, dinov2_folder, monkeypatch, capsys):
    """The Inception weights from the flag, DINOv2 from the environment: FID, KID, IS and FD-DINOv2 beside their
    floors (random networks, so only their presence and sanity are asserted, not their values)."""
    monkeypatch.setenv("PUNKDIFF_DINOV2", str(dinov2_folder))
    np.save(tmp_path / "samples.npy", mnist16.heldout[-10:])
    assert main(["eval", "--samples", str(tmp_path / "samples.npy"), "--preset", "mnist-baseline-16", "--reference",
                 str(mnist_dir), "--cache-dir", str(metrics_cache), "--inception-weights", str(inception_weights),
                 "--out", str(tmp_path / "eval")]) == 0
    import json

    data = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert data["not_computed"] == {} and data["num_images"] == 10
    m = data["metrics"]
    for name in ("fid", "kid_inception", "fd_dinov2"):
        assert m[name]["better"] == "lower" and m[name]["model"] > 0 and m[name]["floor"] > 0
    assert m["inception_score"]["better"] == "higher" and m["inception_score"]["model"] > 1
    report = (tmp_path / "eval" / "report.md").read_text()
    assert f"| fid | {m['fid']['model']:.4g} | {m['fid']['floor']:.4g} | lower |" in report
    assert "not computed" not in report and "fd_dinov2" in capsys.readouterr().out


def test_eval_weights_errors_are_usage_errors(tmp_path, mnist_dir, capsys):
    (tmp_path / "weights-inception.pth").write_bytes(b"\x80\x04not really")
    common = ["eval", "--samples", str(tmp_path), "--preset", "mnist-baseline-16", "--reference", str(mnist_dir)]
    assert main([*common, "--inception-weights", str(tmp_path / "weights-inception.pth")]) == 2
    assert "never unpickles" in capsys.readouterr().err
    assert main([*common, "--dinov2", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "nowhere (given) does not exist" in err and "Traceback" not in err


def test_eval_without_model_or_samples_is_a_usage_error(tmp_path, capsys):
    assert main(["eval", "--reference", "x", "--out", str(tmp_path / "e")]) == 2
    assert "give a MODEL" in capsys.readouterr().err


def test_eval_input_accidents_are_usage_errors_before_sampling(tmp_path, mnist_dir, capsys):
    """A pickled .npy, a corrupt PNG, an --out under a file, a linked card: each `punkdiff eval: ...`, exit 2."""
    model = export_pipeline(tiny_unet(channels=1, sample_size=16), DDPMScheduler(), tmp_path / "digits")
    common = ["--reference", str(mnist_dir), "--preset", "mnist-baseline-16"]
    np.save(tmp_path / "pickled.npy", np.array([None] * 12, dtype=object), allow_pickle=True)
    (tmp_path / "pngs").mkdir()
    (tmp_path / "pngs" / "0.png").write_bytes(b"not a png")
    (tmp_path / "a-file").write_text("kept")
    target = tmp_path / "elsewhere.md"
    target.write_text("precious")
    (model / "README.md").unlink()
    (model / "README.md").symlink_to(target)
    for argv, message in [
        (["--samples", str(tmp_path / "pickled.npy")], "pickled.npy is not readable as a uint8 array"),
        (["--samples", str(tmp_path / "pngs")], "0.png is not a readable image"),
        ([str(model), "--out", str(tmp_path / "a-file" / "eval")], "a-file/eval cannot be written"),
        ([str(model), "--update-card", "--out", str(tmp_path / "e")], "README.md is a symbolic link"),
    ]:
        assert main(["eval", *common, *argv]) == 2
        err = capsys.readouterr().err
        last = err.splitlines()[-1]  # after the loading progress bar
        assert last.startswith("punkdiff eval: ") and message in last and "Traceback" not in err, err
    assert target.read_text() == "precious" and not (tmp_path / "e").exists()


_SHAPES = [(12, 16, 16), (12, 1, 16, 16), (12, 16, 16, 1), (10, 16, 16), (12, 3, 16, 16), (12, 16, 16, 3),
           (9, 16, 16), (0, 16, 16), (12, 16), (12, 8, 8), (12, 1, 16, 16, 1), (16,)]
_GOOD_SHAPES = {(12, 16, 16), (12, 1, 16, 16), (12, 16, 16, 1), (10, 16, 16)}
_ENTRIES = ["good", "good", "wrong size", "corrupt", "truncated", "folder named .png", "notes.txt"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["npy", "folder"]), shape=st.sampled_from(_SHAPES),
       dtype=st.sampled_from(["uint8", "uint8", "float32", "int16", "object"]),
       keep=st.none() | st.floats(0, 0.99), entries=st.lists(st.sampled_from(_ENTRIES), max_size=14))
def test_generated_eval_samples_are_scored_or_refused_naming_them(tmp_path_factory, kind, shape, dtype, keep,
                                                                   entries):
    """Any .npy (dtype, shape, truncation, pickled) or folder of good, wrong, corrupt and odd entries: exit 2 with a
    message about the samples when they are unusable, else the samples pass and the (missing) reference is what is
    reported, so bad samples are always found before the reference loads."""
    root = tmp_path_factory.mktemp("eval-fuzz")
    if kind == "npy":
        samples = root / "s.npy"
        array = np.empty(shape, dtype=object) if dtype == "object" else np.full(shape, 7, dtype=dtype)
        np.save(samples, array, allow_pickle=True)
        if keep is not None:
            samples.write_bytes(samples.read_bytes()[: int(len(samples.read_bytes()) * keep)])
        usable = dtype == "uint8" and shape in _GOOD_SHAPES and keep is None
    else:
        samples = root / "pngs"
        samples.mkdir()
        for i, entry in enumerate(entries):
            name = samples / (f"{i:03d}.png" if entry != "notes.txt" else "notes.txt")
            if entry == "folder named .png":
                name.mkdir()
            elif entry in ("good", "wrong size"):
                PIL.Image.new("L", (16, 16) if entry == "good" else (17, 16), 9).save(name)
            elif entry == "truncated":
                PIL.Image.new("L", (16, 16), 9).save(name)
                name.write_bytes(name.read_bytes()[:40])
            else:
                name.write_bytes(b"corrupt" if entry == "corrupt" else b"a note")
        images = [e for e in entries if e != "notes.txt"]
        usable = len(images) >= 10 and all(e == "good" for e in images)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["eval", "--samples", str(samples), "--preset", "mnist-baseline-16", "--reference",
                     str(root / "no-such-reference"), "--out", str(root / "out")])
    message = err.getvalue()
    assert code == 2 and message.startswith("punkdiff eval: ") and "Traceback" not in message, message
    if usable:
        assert "could not find dataset" in message and "no-such-reference" in message, message
        event("samples accepted")
    else:
        assert str(samples) in message and "no-such-reference" not in message, message
        event(f"{kind} refused")
    assert not (root / "out").exists()


def test_gif_writes_noise_sampling_and_grid(tmp_path, mnist_dir, metrics_cache, capsys):
    model = export_pipeline(tiny_unet(channels=1, sample_size=16), DDPMScheduler(), tmp_path / "digits")
    args = ["gif", str(model), "--dataset", str(mnist_dir), "--preset", "mnist-baseline-16", "--num-images", "4",
            "--steps", "3", "--out", str(tmp_path / "gifs"), "--device", "cpu"]
    assert main(args) == 0
    with PIL.Image.open(tmp_path / "gifs" / "sampling.gif") as gif:
        assert gif.n_frames == 3
    with PIL.Image.open(tmp_path / "gifs" / "noise.gif") as gif:
        first = np.asarray(gif.convert("L"))
        gif.seek(gif.n_frames - 1)
        last = np.asarray(gif.convert("L"))
    assert first.std() > 50 and np.abs(first.astype(int) - last).mean() > 30  # digits, then noise
    assert PIL.Image.open(tmp_path / "gifs" / "grid.png").size[0] > 16
    assert "noise GIF (forward process on 4 real images)" in capsys.readouterr().out


# ---- conditional models: --label, --type, --accessory, --attribute, --guidance --------------------------------


@pytest.fixture(scope="module")
def conditional_dirs(tmp_path_factory) -> dict[str, Path]:
    """A digit and a punk model exported as training would: condition.json, and the punks' attribute encoder."""
    folder = tmp_path_factory.mktemp("conditional")
    digits, punks = digit_pipeline(), punk_pipeline()
    return {
        "digits": export_pipeline(digits.unet, digits.scheduler, folder / "digits", condition=digits.condition),
        "punks": export_pipeline(punks.unet, punks.scheduler, folder / "punks", condition=punks.condition,
                                 attribute_encoder=punks.attribute_encoder),
    }


def test_sample_asks_a_digit_model_for_labels_one_grid_row_each(conditional_dirs, tmp_path):
    from punkdiff.hub import load_pipeline
    from punkdiff.sampling import generate

    out_dir = tmp_path / "singles"
    assert sample(conditional_dirs["digits"], tmp_path / "grid.png", "--num-images", "4", "--label", "3", "--label",
                  "7", "--guidance", "3", "--out-dir", str(out_dir)) == 0
    assert PIL.Image.open(tmp_path / "grid.png").size == (16, 16)  # a row of 3s, a row of 7s
    pipe = load_pipeline(conditional_dirs["digits"])
    expected = generate(pipe, 4, seed=7, sampler="ddim", num_inference_steps=3, labels=[3, 3, 7, 7],
                        guidance_scale=3.0, progress=False)
    for i, image in enumerate(expected):
        assert np.abs(np.asarray(PIL.Image.open(out_dir / f"{i:04d}.png"), dtype=int)
                      - np.asarray(image, dtype=int)).max() <= 1


def test_sample_asks_a_punk_model_for_a_type_and_accessories(conditional_dirs, tmp_path):
    from punkdiff.hub import load_pipeline
    from punkdiff.sampling import generate

    args = ["--num-images", "2", "--type", "Ape", "--accessory", "Cap", "--accessory", "3D Glasses", "--guidance",
            "3", "--out-dir", str(tmp_path / "apes")]
    assert sample(conditional_dirs["punks"], tmp_path / "grid.png", *args) == 0
    pipe = load_pipeline(conditional_dirs["punks"])
    expected = generate(pipe, 2, seed=7, sampler="ddim", num_inference_steps=3, guidance_scale=3.0, progress=False,
                        attributes={"type": "Ape", "accessories": ["Cap", "3D Glasses"]})
    for i, image in enumerate(expected):
        assert np.abs(np.asarray(PIL.Image.open(tmp_path / "apes" / f"{i:04d}.png"), dtype=int)
                      - np.asarray(image, dtype=int)).max() <= 1
    generic = ["--num-images", "2", "--attribute", "type=Ape", "--attribute", "accessories=Cap", "--attribute",
               "accessories=3D Glasses", "--guidance", "3", "--out-dir", str(tmp_path / "generic")]
    assert sample(conditional_dirs["punks"], tmp_path / "generic.png", *generic) == 0
    for i in range(2):
        assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "generic" / f"{i:04d}.png")),
                              np.asarray(PIL.Image.open(tmp_path / "apes" / f"{i:04d}.png")))


@pytest.mark.parametrize(
    ("model", "extra", "message"),
    [
        ("punks", ["--type", "Apex"], "unknown type 'Apex'; closest: 'Ape'; known type values (5): Alien, Ape"),
        ("punks", ["--accessory", "Cap", "--accessory", "Hat"], "unknown accessories 'Hat'"),
        ("punks", ["--attribute", "hat=Cap"], "unknown attribute 'hat'; this model is conditioned on type"),
        ("punks", ["--attribute", "typeApe"], "--attribute 'typeApe': give COLUMN=NAME"),
        ("punks", ["--attribute", "type=Ape", "--attribute", "type=Male"], "type takes one name; got Ape, Male"),
        ("digits", ["--label", "12"], "label 12 is out of range: give an index in 0..9"),
        ("digits", ["--label", "3", "--type", "Ape"], "give --label, or --type/--accessory/--attribute, not both"),
        ("digits", ["--label", "1", "--label", "2", "--num-images", "3"], "cannot be split evenly between 2 --label"),
        ("digits", ["--guidance", "3"], "--guidance 3 needs a condition to guide towards"),
        ("digits", ["--label", "3", "--gif", "{tmp}/a.gif"], "--gif animates the model without a condition"),
        ("plain", ["--label", "3"], "is an unconditional model: it takes no --label"),
        ("plain", ["--guidance", "2"], "--guidance needs a conditional model"),
    ],
)
def test_a_condition_the_model_cannot_take_is_refused_before_sampling(conditional_dirs, model_dir, tmp_path, capsys,
                                                                       model, extra, message):
    folder = model_dir if model == "plain" else conditional_dirs[model]
    assert sample(folder, tmp_path / "grid.png", *[e.format(tmp=tmp_path) for e in extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "grid.png").exists()


@pytest.mark.parametrize("value", ["nan", "-1", "inf", "strong"])
def test_guidance_must_be_finite_and_non_negative(conditional_dirs, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_:
        sample(conditional_dirs["digits"], tmp_path / "grid.png", "--label", "3", "--guidance", value)
    assert exit_.value.code == 2
    assert "guidance scale must be a" in capsys.readouterr().err


def test_reconstruct_and_inpaint_take_the_condition(conditional_dirs, tmp_path):
    source = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    source.save(tmp_path / "in.png")
    recon = ["reconstruct", str(conditional_dirs["digits"]), str(tmp_path / "in.png"), str(tmp_path / "in.png"),
             "--device", "cpu", "--steps", "3", "--t-start", "500"]
    assert main([*recon, "--label", "3", "--label", "7", "--guidance", "3", "--out", str(tmp_path / "r.png")]) == 0
    assert main([*recon, "--out", str(tmp_path / "plain.png")]) == 0
    guided = np.asarray(PIL.Image.open(tmp_path / "r.png"), dtype=int)
    assert guided.shape[:2] == (16, 16)  # original | reconstruction, one row per image
    assert np.abs(guided - np.asarray(PIL.Image.open(tmp_path / "plain.png"))).max() > 0
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:3] = 255  # regenerate the top rows: "give this punk a cap"
    PIL.Image.fromarray(mask).save(tmp_path / "mask.png")
    inpaint = ["inpaint", str(conditional_dirs["punks"]), str(tmp_path / "in.png"), "--mask",
               str(tmp_path / "mask.png"), "--device", "cpu", "--steps", "6", "--jump-length", "2",
               "--jump-n-sample", "2", "--num-images", "1"]
    assert main([*inpaint, "--type", "Male", "--accessory", "Cap", "--guidance", "3",
                 "--out", str(tmp_path / "capped.png")]) == 0
    capped = np.asarray(PIL.Image.open(tmp_path / "capped.png"), dtype=int)
    assert np.abs(capped[3:, 8:] - np.asarray(source, dtype=int)[3:]).max() <= 1  # the kept rows
    assert main([*inpaint, "--type", "Bear", "--out", str(tmp_path / "bear.png")]) == 2
    assert not (tmp_path / "bear.png").exists()


def test_eval_of_a_distilled_student_samples_as_its_sampling_json_says(tmp_path, mnist_dir, digit_classifier,
                                                                       metrics_cache, monkeypatch):
    import json
    import warnings

    monkeypatch.delenv("PUNKDIFF_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.delenv("PUNKDIFF_DINOV2", raising=False)
    student = export_pipeline(tiny_unet(channels=1, sample_size=16), DDPMScheduler(prediction_type="v_prediction"),
                              tmp_path / "student", sampling={"sampler": "ddim-trailing", "num_inference_steps": 2,
                                                              "eta": 0.0, "distilled_steps": 2})
    common = ["eval", str(student), "--reference", str(mnist_dir), "--preset", "mnist-baseline-16", "--cache-dir",
              str(metrics_cache), "--num-samples", "10", "--reconstruction-images", "2", "--device", "cpu"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*common, "--out", str(tmp_path / "eval")]) == 0
    assert not [w for w in caught if "distilled" in str(w.message)]  # sampled at its distilled count
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["sampler"] == "ddim-trailing-2, eta 0"
    with pytest.warns(UserWarning, match="distilled to sample in 2 steps"):  # an explicit flag still wins
        assert main([*common, "--steps", "3", "--reconstruction-images", "0", "--out", str(tmp_path / "e3")]) == 0
    assert json.loads((tmp_path / "e3" / "metrics.json").read_text())["sampler"] == "ddim-trailing-3, eta 0"


@pytest.mark.parametrize(("extra", "message"), [(["--guidance", "nan"], "guidance scale must be a finite number"),
                                                (["--guidance", "-2"], "guidance scale must be a finite number"),
                                                (["--per-class", "-1"], "must be at least 0")])
def test_eval_guidance_and_per_class_flags_are_checked_by_the_parser(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "model", "--reference", "data", "--out", str(tmp_path / "e"), *extra])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_eval_refuses_guidance_for_an_unconditional_model_before_sampling(model_dir, tmp_path, mnist_dir, capsys):
    argv = ["eval", str(model_dir), "--reference", str(mnist_dir), "--guidance", "3", "--out", str(tmp_path / "e")]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("punkdiff eval: --guidance apply to sampling a conditional model;") and "unconditional" in err
    assert not (tmp_path / "e").exists()


def test_eval_of_a_conditional_model_prints_asked_against_drawn(conditional_dirs, tmp_path, mnist_dir, metrics_cache,
                                                               capsys):
    """The 8 px digit model, scored against MNIST at 8 px: the conditional table follows the usual metrics."""
    import json

    argv = ["eval", str(conditional_dirs["digits"]), "--reference", str(mnist_dir), "--preset", "mnist-baseline-16",
            "--cache-dir", str(metrics_cache), "--num-samples", "10", "--steps", "2", "--per-class", "1",
            "--guidance", "1.5", "--reconstruction-images", "0", "--out", str(tmp_path / "e"), "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "asked vs drawn (guidance 1.5)" in out and "requested class drawn (accuracy)" in out
    saved = json.loads((tmp_path / "e" / "metrics.json").read_text())["conditional"]
    assert saved["guidance_scale"] == 1.5 and saved["balanced"]["num_images"] == 10
