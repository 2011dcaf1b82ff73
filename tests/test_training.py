"""The Accelerate loop (`training/train.py`) and its helpers (`punkdiff.training`), on a slice of MNIST.

Runs use a tiny UNet (8/16 channels) on the first 64 images of the MNIST mirror, so an optimizer step
takes tens of milliseconds on CPU; 8 batches of 8 per epoch make 100 steps cross many epoch boundaries.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from fake_hub import fake_hub
from safetensors.torch import load_file
from tiny_models import tiny_unet
from tiny_training import TINY, max_diff, reset_accelerate_state, tiny_args

from punkdiff.precision import cpu_has_native_bf16
from punkdiff.scripts.train import main as train_main
from punkdiff.training.arguments import build_train_parser, resolve_training_config
from punkdiff.training.checkpoints import find_checkpoint, list_checkpoints
from punkdiff.training.loss import diffusion_loss

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def run(mnist_dir: Path, cache_dir: Path, out: Path, *extra: str) -> int:
    return train_main(tiny_args(mnist_dir, cache_dir, out, *extra))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


# --- resume ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accumulation", "dropout"), [(1, 0.0), (2, 0.0), (1, 0.1)], ids=["plain", "accumulation-2", "dropout"]
)
def test_resume_matches_uninterrupted_run(mnist_dir, cache_dir, tmp_path, accumulation, dropout):
    """Stopped at step 50 and resumed to 100 == 100 steps straight: weights, EMA, LR, step counts."""
    args = ["--max-steps", "100", "--checkpoint-every", "50", "--gradient-accumulation-steps", str(accumulation),
            "--lr-warmup-steps", "10", "--set", f"model.dropout={dropout}"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(mnist_dir, cache_dir, straight, *args) == 0
    # what a run killed right after step 50 leaves behind: its checkpoint-50 and nothing else
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "checkpoint-50", resumed / "checkpoints" / "checkpoint-50")
    assert run(mnist_dir, cache_dir, resumed, *args, "--resume-from-checkpoint", "latest") == 0

    a, b = straight / "checkpoints" / "checkpoint-100", resumed / "checkpoints" / "checkpoint-100"
    assert max_diff(weights(a / "model.safetensors"), weights(b / "model.safetensors")) <= 1e-6
    ema = "unet_ema/diffusion_pytorch_model.safetensors"
    assert max_diff(weights(a / ema), weights(b / ema)) <= 1e-6
    assert max_diff(weights(a / "model.safetensors"), weights(a / ema)) > 0  # EMA is a different average

    history_a = json.loads((a / "training_state.json").read_text())["history"]
    history_b = json.loads((b / "training_state.json").read_text())["history"]
    assert [h[0] for h in history_a] == list(range(1, 101)) == [h[0] for h in history_b]
    assert [h[2] for h in history_a] == pytest.approx([h[2] for h in history_b], rel=1e-12)  # LR per step
    assert [h[1] for h in history_a] == pytest.approx([h[1] for h in history_b], rel=1e-5)  # loss per step

    sa = json.loads((straight / "training_summary.json").read_text())
    sb = json.loads((resumed / "training_summary.json").read_text())
    assert sa["steps"] == sb["steps"] == 100
    assert sa["ema_optimization_step"] == sb["ema_optimization_step"] == 100
    assert sa["global_batch_size"] == 8 * accumulation
    assert sa["images_seen"] == sb["images_seen"] == 100 * 8 * accumulation
    assert sb["resumed_from"].endswith("checkpoint-50")
    # cosine schedule over 100 optimizer steps: it reaches zero exactly at the end, not before
    assert history_a[-1][2] == pytest.approx(0.0, abs=1e-12) and history_a[-2][2] > 0


def test_checkpoint_from_before_a_new_setting_resumes_with_its_default(mnist_dir, cache_dir, tmp_path):
    """A setting punkdiff added later (here the noise-schedule remedies) is absent from older checkpoints; the old
    run had its default, so resuming is allowed."""
    assert run(mnist_dir, cache_dir, tmp_path, "--max-steps", "2", "--checkpoint-every", "2") == 0
    state_file = tmp_path / "checkpoints" / "checkpoint-2" / "training_state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["scheduler"]["scale_betas_by_timesteps"], state["config"]["scheduler"]["rescale_betas_zero_snr"]
    state_file.write_text(json.dumps(state))
    (state_file.parent / "checksums.json").unlink()  # as old as that: from before checkpoint checksums too
    reset_accelerate_state()
    assert run(mnist_dir, cache_dir, tmp_path, "--max-steps", "3", "--resume-from-checkpoint", "latest",
               "--extend-schedule") == 0
    reset_accelerate_state()
    code = run(mnist_dir, cache_dir, tmp_path, "--max-steps", "4", "--resume-from-checkpoint", "latest",
               "--set", "scheduler.scale_betas_by_timesteps=true")
    assert code == 2  # a real change of the noise process is still refused


def test_checkpoints_total_limit_keeps_the_last_k(mnist_dir, cache_dir, tmp_path):
    assert run(mnist_dir, cache_dir, tmp_path, "--max-steps", "12", "--checkpoint-every", "3",
               "--checkpoints-total-limit", "2") == 0
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-12"]
    # a half-written checkpoint (a crash during save) is never picked for resume
    (tmp_path / "checkpoints" / ".tmp-checkpoint-15").mkdir()
    (tmp_path / "checkpoints" / "checkpoint-15").mkdir()  # no state file: incomplete
    assert find_checkpoint(tmp_path, "latest").name == "checkpoint-12"


# --- outputs and visibility ------------------------------------------------------------------


def test_run_writes_pipeline_grid_curve_summary_and_logs(mnist_dir, cache_dir, tmp_path):
    out = tmp_path / "run"
    code = train_main([*TINY, "--dataset", str(mnist_dir), "--cache-dir", str(cache_dir), "--output-dir", str(out),
                       "--max-steps", "6", "--sample-every", "3", "--checkpoint-every", "3", "--log-every", "4",
                       "--report-to", "tensorboard", "--eval-every", "3", "--eval-images", "10"])
    assert code == 0
    from diffusers import DDPMPipeline
    from PIL import Image

    pipe = DDPMPipeline.from_pretrained(out / "pipeline")
    assert pipe.unet.config.block_out_channels == [8, 16]
    assert not list((out / "pipeline").rglob("*.bin"))
    # exported weights are the EMA weights of the final step
    ema = weights(out / "checkpoints" / "checkpoint-6" / "unet_ema" / "diffusion_pytorch_model.safetensors")
    exported = weights(out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert max_diff(ema, exported) == 0
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-0000003.png", "step-0000006.png"]
    assert Image.open(out / "samples.png").size == Image.open(out / "samples" / "step-0000006.png").size
    assert Image.open(out / "loss_curve.png").size[0] > 300

    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["preset"] == "mnist-baseline-16"
    assert summary["config"]["model"]["block_out_channels"] == [8, 16]
    assert summary["steps"] == 6 and summary["images_seen"] == 48 and summary["num_processes"] == 1
    assert summary["wall_time_s"] > 0 and summary["final_loss"] > 0
    assert summary["versions"]["diffusers"] and summary["versions"]["torch"]
    quality = summary["eval"]  # --eval-every: an untrained model's SWD is far above the real-vs-real floor
    assert [step for step, _ in quality["history"]] == [3, 6] and quality["floor"] > 0
    assert all(swd > 2 * quality["floor"] for _, swd in quality["history"])
    assert 0 < quality["share_of_wall_time"] < 1
    card = (out / "pipeline" / "README.md").read_text()  # the last score and its floor, in the YAML model-index
    assert "model-index:" in card and f"value: {quality['floor']}" in card

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs" / "punkdiff"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ["loss", "grad_norm", "lr", "ema_decay"]:  # every step, though read back only now and then
        assert tag in tags["scalars"], tag
        assert [e.step for e in events.Scalars(tag)] == list(range(1, 7))
    for tag in ["images_per_sec", "peak_memory_mb"]:  # per read: every 4 steps, and before checkpoints and grids
        assert [e.step for e in events.Scalars(tag)] == [3, 4, 6], tag
    assert "samples" in tags["images"]
    assert [e.step for e in events.Images("samples")] == [3, 6]
    assert [e.step for e in events.Scalars("eval_swd")] == [3, 6]


def test_pixel_art_run_snaps_its_grids_and_exports_its_palette(punks_dir, cache_dir, tmp_path):
    """A punk model's grid holds only training colours, and its export carries the palette its pipeline snaps to."""
    from PIL import Image

    from punkdiff import PunkDiffPipeline

    out = tmp_path / "run"
    code = train_main(["--preset", "punks-24-cpu", "--dataset", str(punks_dir), "--max-train-samples", "64",
                       "--batch-size", "8", "--max-steps", "2", "--report-to", "none", "--cache-dir", str(cache_dir),
                       "--output-dir", str(out), "--set", "model.block_out_channels=[8,16]",
                       "--set", "train.num_sample_images=4", "--set", "train.sample_inference_steps=3"])
    assert code == 0
    pipe = PunkDiffPipeline.from_pretrained(out / "pipeline")
    palette = {tuple(c) for c in pipe.palette.tolist()}
    assert (0x63, 0x85, 0x96) in palette and len(palette) <= 256  # the first 64 punks' colours, background included
    grid = np.asarray(Image.open(out / "samples.png").convert("RGB")).reshape(-1, 3)
    assert {tuple(c) for c in grid.tolist()} <= palette | {(128, 128, 128)}  # and the grey gaps between tiles
    images = pipe(batch_size=2, sampler="ddim", num_inference_steps=3, output_type="np").images
    assert {tuple(c) for c in (images * 255).round().astype(int).reshape(-1, 3).tolist()} <= palette


# --- failure ------------------------------------------------------------------------------------


def test_bad_flag_fails_before_any_data_is_loaded(tmp_path, capsys):
    # the dataset path does not exist: reaching the data stage would fail differently
    code = train_main([*TINY, "--dataset", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "o"),
                       "--set", "model.sample_size=15", "--set", "data.resolution=15"])
    assert code == 2
    err = capsys.readouterr().err
    assert "not divisible by the UNet's downsampling factor 2" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        build_train_parser().parse_args(["--preset", "no-such-preset"])


def test_a_second_run_never_mixes_with_an_earlier_one(mnist_dir, cache_dir, tmp_path, capsys):
    assert run(mnist_dir, cache_dir, tmp_path, "--max-steps", "4", "--checkpoint-every", "2") == 0
    before = sorted(p.name for p in list_checkpoints(tmp_path))
    # same folder, no resume: refused before any data is loaded, nothing touched
    assert run(mnist_dir, cache_dir, tmp_path, "--max-steps", "3", "--checkpoint-every", "3") == 2
    assert "already holds checkpoints" in capsys.readouterr().out
    assert sorted(p.name for p in list_checkpoints(tmp_path)) == before
    # resuming with another model or batch size is refused too, naming what changed
    code = run(mnist_dir, cache_dir, tmp_path, "--max-steps", "8", "--resume-from-checkpoint", "latest",
               "--batch-size", "4", "--set", "model.block_out_channels=[8,8]")
    out = capsys.readouterr().out
    assert code == 2 and "model.block_out_channels: [8, 16] -> [8, 8]" in out and "train.batch_size: 8 -> 4" in out
    # and so is resuming a checkpoint beyond --max-steps
    code = run(mnist_dir, cache_dir, tmp_path, "--max-steps", "3", "--resume-from-checkpoint", "latest",
               "--extend-schedule")
    assert code == 2 and "beyond --max-steps 3" in capsys.readouterr().out
    # --overwrite-output-dir starts over: only the new run's checkpoints remain
    assert run(mnist_dir, cache_dir, tmp_path, "--max-steps", "3", "--checkpoint-every", "3",
               "--overwrite-output-dir") == 0
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3"]
    assert json.loads((tmp_path / "training_summary.json").read_text())["steps"] == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--split", "validation"], "has no split 'validation'; available splits: train, test"),
        (["--image-column", "label"], "label"),
        (["--max-train-samples", "4"], "fewer images than one global batch"),
    ],
)
def test_data_problems_end_with_a_message_not_a_traceback(mnist_dir, cache_dir, tmp_path, capsys, extra, message):
    assert run(mnist_dir, cache_dir, tmp_path, "--max-steps", "2", *extra) == 2
    out = capsys.readouterr().out
    assert out.startswith("error: ") or "\nerror: " in out
    assert message in out and "Traceback" not in out


def test_epochs_no_ema_v_prediction_and_partial_accumulation(mnist_dir, cache_dir, tmp_path):
    """--epochs sets the length; the raw weights are exported without EMA; images are counted as used."""
    code = run(mnist_dir, cache_dir, tmp_path, "--epochs", "2", "--gradient-accumulation-steps", "3", "--no-ema",
               "--prediction-type", "v_prediction", "--snr-gamma", "5", "--checkpoint-every", "100")
    assert code == 0
    summary = json.loads((tmp_path / "training_summary.json").read_text())
    # 8 batches of 8 per epoch, accumulated 3 + 3 + 2: 3 optimizer steps per epoch, every image used once
    assert summary["steps_per_epoch"] == 3 and summary["steps"] == 6
    assert summary["images_seen"] == 2 * 64
    assert summary["ema_optimization_step"] is None
    exported = weights(tmp_path / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert max_diff(exported, weights(tmp_path / "checkpoints" / "checkpoint-6" / "model.safetensors")) == 0
    scheduler = json.loads((tmp_path / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"


def test_sample_grid_uses_eval_mode_and_restores_training_mode():
    from diffusers.training_utils import EMAModel

    from punkdiff.training.previews import ema_sample_grid

    unet = tiny_unet(channels=1, dropout=0.5).train()
    ema = EMAModel(unet.parameters())
    first, second = (ema_sample_grid(unet, ema, DDPMScheduler(), 4, 5, seed=3) for _ in range(2))
    assert np.array_equal(np.asarray(first), np.asarray(second))  # dropout would make these differ
    assert unet.training


def test_resume_path_must_exist_before_training(tmp_path, capsys):
    code = train_main([*TINY, "--dataset", str(tmp_path), "--output-dir", str(tmp_path / "o"),
                       "--resume-from-checkpoint", str(tmp_path / "nope")])
    assert code == 2 and "no such checkpoint folder" in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(mnist_dir, cache_dir, tmp_path, capsys):
    # AdamW moves every weight by ~lr on step 1, so lr=1e30 overflows the next forward pass
    code = run(mnist_dir, cache_dir, tmp_path, "--max-steps", "20", "--checkpoint-every", "1",
               "--learning-rate", "1e30", "--lr-warmup-steps", "0")
    assert code == 1
    assert "non-finite loss" in capsys.readouterr().out
    checkpoints = list_checkpoints(tmp_path)
    assert [p.name for p in checkpoints] == ["checkpoint-1"]
    kept = weights(checkpoints[0] / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in kept.values())
    assert not (tmp_path / "pipeline").exists() and not (tmp_path / "training_summary.json").exists()
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


# --- several processes ---------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_on_cpu(mnist_dir, cache_dir, tmp_path):
    """`--multi_gpu --num_processes 2` on a machine without GPU: one gloo job, not two independent runs."""
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        str(REPO / "training" / "train.py"), *TINY, "--dataset", str(mnist_dir), "--cache-dir", str(cache_dir),
        "--output-dir", str(out), "--max-steps", "12", "--checkpoint-every", "1", "--checkpoints-total-limit", "12",
        "--lr-warmup-steps", "0", "--set", "train.lr_scheduler=linear", "--report-to", "tensorboard",
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["num_processes"] == 2
    assert summary["global_batch_size"] == 16
    assert summary["images_seen"] == 12 * 16
    assert summary["steps_per_epoch"] == 4  # 64 images / (8 per process x 2): each process gets half
    assert summary["ema_optimization_step"] == 12  # once per optimizer step, not per process
    assert summary["ema_in_sync_across_processes"] is True
    # the LR schedule counts optimizer steps: linear decay reaches 0 at step 12, not at step 6
    history = json.loads((out / "checkpoints" / "checkpoint-12" / "training_state.json").read_text())["history"]
    lr0 = summary["config"]["train"]["learning_rate"]
    assert [h[2] for h in history] == pytest.approx([lr0 * (1 - k / 12) for k in range(1, 13)], rel=1e-9)
    # per-process state in each checkpoint, files written once
    names = sorted(p.name for p in (out / "checkpoints" / "checkpoint-12").iterdir())
    per_process = {"noise_rng_0.safetensors", "noise_rng_1.safetensors", "random_states_0.pkl", "random_states_1.pkl"}
    assert per_process <= set(names)
    assert len(list((out / "logs").rglob("events.out.tfevents.*"))) == 2  # scalars + hparams, one writer
    # EMA, step by step from the saved weights: ema_k = d_k * ema_(k-1) + (1 - d_k) * w_k, with EMAModel's
    # warmup decay d_k = 1 - (1 + k - 1) ** -0.75 (d_1 = 0): one update per optimizer step, all-reduced weights
    ema_file = "unet_ema/diffusion_pytorch_model.safetensors"
    ema_prev = weights(out / "checkpoints" / "checkpoint-1" / ema_file)
    assert max_diff(ema_prev, weights(out / "checkpoints" / "checkpoint-1" / "model.safetensors")) <= 1e-7
    for k in range(2, 13):
        decay = 1 - (1 + (k - 1)) ** -0.75
        w_k = weights(out / "checkpoints" / f"checkpoint-{k}" / "model.safetensors")
        ema_k = weights(out / "checkpoints" / f"checkpoint-{k}" / ema_file)
        expected = {name: decay * ema_prev[name] + (1 - decay) * w_k[name] for name in w_k}
        assert max_diff(ema_k, expected) <= 1e-6, k
        ema_prev = ema_k


# --- loss ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_diffusion_loss_matches_its_definition(prediction_type, snr_gamma):
    unet = tiny_unet(channels=1)
    sched = DDPMScheduler(prediction_type=prediction_type)
    x0, noise = torch.rand(4, 1, 8, 8) * 2 - 1, torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    loss = diffusion_loss(unet, sched, x0, noise, t, snr_gamma)

    ab = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    target = {"epsilon": noise, "v_prediction": ab.sqrt() * noise - (1 - ab).sqrt() * x0, "sample": x0}[prediction_type]
    per_image = ((unet(x_t, t).sample - target) ** 2).mean(dim=(1, 2, 3))
    if snr_gamma is None:
        expected = per_image.mean()
    else:
        snr = (ab / (1 - ab)).flatten()
        # min-SNR-gamma: weight min(snr, gamma) on the x_0 error, expressed for each target
        to_x0 = {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}[prediction_type]
        expected = (per_image * torch.minimum(snr, torch.tensor(snr_gamma)) / to_x0).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)


def test_flags_override_preset_fields():
    args = build_train_parser().parse_args([
        "--preset", "mnist-fast-16", "--dataset", "x", "--batch-size", "3", "--learning-rate", "0.01",
        "--gradient-accumulation-steps", "4", "--prediction-type", "v_prediction", "--snr-gamma", "5", "--no-ema",
        "--max-train-samples", "10", "--mixed-precision", "bf16",
    ])
    preset = resolve_training_config(args)
    assert preset.scheduler.num_train_timesteps == 300
    train = preset.train
    assert (train.batch_size, train.learning_rate, train.gradient_accumulation_steps) == (3, 0.01, 4)
    assert preset.scheduler.prediction_type == "v_prediction" and preset.train.snr_gamma == 5.0
    assert preset.train.use_ema is False and preset.data.max_samples == 10 and preset.data.dataset == "x"
    assert preset.train.mixed_precision == "bf16"


# --- what train.py feeds the model ----------------------------------------------------------------


def record_loss_calls(monkeypatch) -> list[tuple[torch.Tensor, dict[str, torch.Tensor] | None]]:
    """Each call of train.py's loss: the clean batch, and the model's weights at the first call (the start)."""
    import punkdiff.scripts.train as train_script

    calls: list[tuple[torch.Tensor, dict[str, torch.Tensor] | None]] = []
    loss = train_script.diffusion_loss

    def recording(model, scheduler, clean, *rest):
        start = None if calls else {k: v.detach().clone() for k, v in model.state_dict().items()}
        calls.append((clean.detach().clone(), start))
        return loss(model, scheduler, clean, *rest)

    monkeypatch.setattr(train_script, "diffusion_loss", recording)
    return calls


def test_data_order_is_seeded_and_each_epoch_is_a_permutation(mnist_dir, cache_dir, tmp_path, monkeypatch):
    """The loader train.py builds (Accelerate's seedable sampler, set_epoch) decides the order, not global state."""

    def epochs(seed: str, name: str) -> list[list[bytes]]:
        calls = record_loss_calls(monkeypatch)
        assert run(mnist_dir, cache_dir, tmp_path / name, "--max-steps", "16", "--seed", seed) == 0
        images = [bytes(img.numpy()) for clean, _ in calls for img in clean]
        return [images[:64], images[64:]]  # 8 batches of 8 per epoch

    first, again, other = epochs("0", "a"), epochs("0", "b"), epochs("1", "c")
    assert len(set(first[0])) == 64 and set(first[0]) == set(first[1])  # every image once per epoch
    assert first[0] != first[1]  # reshuffled each epoch
    assert first == again  # same seed, same order
    assert other != first and set(other[0]) == set(first[0])


def test_bf16_mixed_precision_tracks_the_fp32_run(mnist_dir, cache_dir, tmp_path, capsys):
    """Same seed and data: bf16 autocast follows the fp32 losses closely and moves the weights the same way."""

    def losses_and_delta(precision: str) -> tuple[list[float], torch.Tensor]:
        out = tmp_path / precision
        assert run(mnist_dir, cache_dir, out, "--max-steps", "4", "--checkpoint-every", "1",
                   "--checkpoints-total-limit", "4", "--no-ema", "--lr-warmup-steps", "0", "--learning-rate", "1e-3",
                   "--mixed-precision", precision) == 0
        state = json.loads((out / "checkpoints" / "checkpoint-4" / "training_state.json").read_text())
        first = weights(out / "checkpoints" / "checkpoint-1" / "model.safetensors")
        last = weights(out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
        assert {t.dtype for t in last.values()} == {torch.float32}  # autocast computes in bf16, weights stay fp32
        return [h[1] for h in state["history"]], torch.cat([(last[k] - first[k]).flatten() for k in last])

    fp32_losses, fp32_delta = losses_and_delta("no")
    reset_accelerate_state()
    bf16_losses, bf16_delta = losses_and_delta("bf16")
    summary = json.loads((tmp_path / "bf16" / "training_summary.json").read_text())
    if not cpu_has_native_bf16():  # the loop's own capability check: float32 here, and the summary says why
        assert summary["mixed_precision"] == "no" and "this CPU has no native bf16" in capsys.readouterr().out
        assert bf16_losses == fp32_losses
        return
    assert summary["mixed_precision"] == "bf16"
    assert bf16_losses == pytest.approx(fp32_losses, rel=0.03)
    assert bf16_losses != fp32_losses  # bf16 really was used
    assert torch.nn.functional.cosine_similarity(bf16_delta, fp32_delta, dim=0) > 0.9


# --- fine-tuning and the Hub ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(mnist_dir, cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrained")
    reset_accelerate_state()
    assert run(mnist_dir, cache_dir, out, "--max-steps", "3", "--checkpoint-every", "3") == 0
    reset_accelerate_state()
    return out / "pipeline"


@pytest.mark.parametrize("source", ["folder", "hub id"])
def test_init_from_starts_from_the_exported_weights(mnist_dir, cache_dir, pretrained, tmp_path, monkeypatch, source):
    calls = record_loss_calls(monkeypatch)
    with fake_hub(monkeypatch, models={"someone/mnist-tiny": pretrained}) as hub:
        model = str(pretrained) if source == "folder" else "someone/mnist-tiny"
        assert run(mnist_dir, cache_dir, tmp_path, "--max-steps", "2", "--init-from", model) == 0
    assert bool(hub.requests) == (source == "hub id")
    exported = weights(pretrained / "unet" / "diffusion_pytorch_model.safetensors")
    assert max_diff(calls[0][1], exported) == 0
    assert json.loads((tmp_path / "training_summary.json").read_text())["initialized_from"] == model


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("model.block_out_channels=[8,8]", "unet block_out_channels: preset [8, 8], model [8, 16]"),
        ("scheduler.num_train_timesteps=500", "scheduler num_train_timesteps: preset 500, model 1000"),
    ],
)
def test_init_from_refuses_another_model_before_any_data(pretrained, tmp_path, capsys, change, message):
    code = train_main([*TINY, "--dataset", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "o"),
                       "--init-from", str(pretrained), "--set", change])
    out = capsys.readouterr().out
    assert code == 2 and "is not the preset's model" in out and message in out


def test_push_to_hub_at_the_end_uploads_the_export_with_its_card(mnist_dir, cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    with fake_hub(monkeypatch) as hub:
        assert run(mnist_dir, cache_dir, tmp_path / "run", "--max-steps", "2", "--push-to-hub",
                   "--hub-model-id", "someone/mnist-tiny", "--private") == 0
    [created] = hub.created
    assert created["name"] == "mnist-tiny"
    assert created.get("private") is True or created.get("visibility") == "private"
    exported = {p.relative_to(tmp_path / "run" / "pipeline").as_posix()
                for p in (tmp_path / "run" / "pipeline").rglob("*") if p.is_file()}
    assert set(hub.uploaded) == exported and "README.md" in exported
    assert 'DDPMPipeline.from_pretrained("someone/mnist-tiny")' in hub.uploaded["README.md"].decode()
    # every call on the repo carries the login's token (huggingface_hub's own anonymous calls carry none)
    repo_calls = [r for r in hub.requests if "someone/mnist-tiny" in r.url.path or r.url.path == "/api/repos/create"]
    assert len(repo_calls) >= 3 and {r.headers.get("authorization") for r in repo_calls} == {"Bearer hf_test_token"}
    assert {r.headers.get("authorization") for r in hub.requests} <= {"Bearer hf_test_token", None}
    assert not any(b"hf_test_token" in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())


def test_push_to_hub_without_a_login_is_refused_before_training(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    code = train_main([*TINY, "--dataset", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "o"),
                       "--push-to-hub"])
    assert code == 2 and "needs a Hugging Face login" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_data_on_device_trains_exactly_like_host_data(mnist_dir, cache_dir, tmp_path):
    """`--data-on-device yes` (the GPU default for small sets) moves the whole set once; batches, and so the
    weights, are unchanged. On this CPU-only machine it is the same device, so this checks the path, not speed."""
    for where in ("yes", "no"):
        reset_accelerate_state()
        assert run(mnist_dir, cache_dir, tmp_path / where, "--max-steps", "3", "--data-on-device", where) == 0
    on_device, on_host = (weights(tmp_path / w / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
                          for w in ("yes", "no"))
    assert max_diff(on_device, on_host) == 0


# --- speed: deferred reads, compile, channels_last, fused AdamW -----------------------------------------


def test_step_log_reads_every_step_in_one_go_and_stops_on_a_non_finite_loss():
    from accelerate import Accelerator

    from punkdiff.training import TrainingError
    from punkdiff.training.step_log import StepLog

    reset_accelerate_state()
    log = StepLog(Accelerator(cpu=True), every=2)
    for step, micro_losses in enumerate([[1.0, 3.0], [5.0, 7.0]], start=1):
        for loss in micro_losses:  # two accumulated micro-batches per optimizer step
            log.add_loss(torch.tensor(loss))
        log.end_step(step, torch.tensor(0.5 * step), lr=1e-3, images=16, ema_decay=0.9)
    assert [log.due(s) for s in (1, 2, 3, 4)] == [False, True, False, True]
    rows = log.read()
    assert [(r["step"], r["loss"], r["grad_norm"], r["ema_decay"]) for r in rows] == [(1, 2.0, 0.5, 0.9),
                                                                                      (2, 6.0, 1.0, 0.9)]
    assert "images_per_sec" not in rows[0] and rows[1]["images_per_sec"] > 0  # one rate per read
    assert log.read() == []  # nothing pending
    log.add_loss(torch.tensor(1.0))
    log.end_step(3, 1.0, lr=1e-3, images=16)
    log.add_loss(torch.tensor(float("nan")))
    log.end_step(4, 1.0, lr=1e-3, images=16)
    with pytest.raises(TrainingError, match="non-finite loss nan at step 4"):
        log.read()


def test_compiled_channels_last_run_exports_the_eager_weights(mnist_dir, cache_dir, tmp_path):
    """`--compile` wraps the training forward only: checkpoints and the export keep plain UNet keys and match."""
    plain, fast = tmp_path / "plain", tmp_path / "fast"
    reset_accelerate_state()
    assert run(mnist_dir, cache_dir, plain, "--max-steps", "2", "--checkpoint-every", "2") == 0
    reset_accelerate_state()
    assert run(mnist_dir, cache_dir, fast, "--max-steps", "2", "--checkpoint-every", "2", "--compile", "eager",
               "--channels-last") == 0
    unet = "pipeline/unet/diffusion_pytorch_model.safetensors"
    a, b = weights(plain / unet), weights(fast / unet)
    assert not any("_orig_mod" in k for k in b)
    assert max_diff(a, b) < 1e-4  # same steps, same data; channels_last only reorders the arithmetic
    assert not any("_orig_mod" in k for k in weights(fast / "checkpoints" / "checkpoint-2" / "model.safetensors"))


# --- streaming ----------------------------------------------------------------------------------------------------


def test_a_streamed_run_trains_on_every_image_each_epoch_and_writes_no_cache(mnist_dir, tmp_path, monkeypatch,
                                                                               capsys):
    """--cache-budget 0: the 64 digits stream (the budget decides), decoded on the fly by the cache's transform."""
    from punkdiff.data import load_training_images
    from punkdiff.presets import get_preset

    calls = record_loss_calls(monkeypatch)
    cache = tmp_path / "cache"
    assert run(mnist_dir, cache, tmp_path / "run", "--max-steps", "16", "--cache-budget", "0") == 0
    assert "more than the cache budget of 0 MiB" in capsys.readouterr().out
    assert not cache.exists() or not list(cache.iterdir())  # nothing decoded to disk
    images = [bytes(img.numpy()) for clean, _ in calls for img in ((clean + 1) * 127.5).round().byte()]
    spec = dataclasses.replace(get_preset("mnist-baseline-16").data, max_samples=64)
    cached = {bytes(img.numpy()) for img in load_training_images(mnist_dir, spec, cache_dir=tmp_path / "c").images}
    assert set(images[:64]) == set(images[64:]) == cached and len(set(images[:64])) == 64  # each once per epoch
    assert images[:64] != images[64:]  # reshuffled
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()


def test_a_streamed_run_resumes_from_its_stream_position(mnist_dir, cache_dir, tmp_path, capsys):
    """Stopped at step 4 (mid-epoch) and resumed: it finishes, each process's stream position saved as JSON. The
    shuffle buffer is refilled on resume, so the weights are not the uninterrupted run's (documented); switching
    between streaming and the cache on resume is refused."""
    args = ["--max-steps", "12", "--checkpoint-every", "4", "--streaming"]
    assert run(mnist_dir, cache_dir, tmp_path / "run", *args) == 0
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-4" / "training_state.json").read_text())
    assert state["batches_in_epoch"] == 4 and state["stream"][0]["batches_done"] == 4
    assert state["stream"][0]["stream"]["epoch"] == 0
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "run" / "checkpoints" / "checkpoint-4", resumed / "checkpoints" / "checkpoint-4")
    assert run(mnist_dir, cache_dir, resumed, *args, "--resume-from-checkpoint", "latest") == 0
    summary = json.loads((resumed / "training_summary.json").read_text())
    assert summary["steps"] == 12 and summary["resumed_from"].endswith("checkpoint-4")
    capsys.readouterr()
    assert run(mnist_dir, cache_dir, resumed, "--max-steps", "12", "--checkpoint-every", "4",
               "--resume-from-checkpoint", "latest") == 2
    assert "data: streamed -> cached (--streaming, --cache-budget)" in capsys.readouterr().out


def test_eval_every_needs_the_cached_images(mnist_dir, cache_dir, tmp_path, capsys):
    assert run(mnist_dir, cache_dir, tmp_path / "run", "--max-steps", "2", "--streaming", "--eval-every", "1") == 2
    assert "--eval-every scores samples against the training images held in the cache" in capsys.readouterr().out


def test_two_processes_stream_their_own_shards(mnist_dir, tmp_path):
    """`--multi_gpu --num_processes 2 --streaming` on CPU: each process reads its half of the stream, both take the
    same number of batches (no process waits at a collective), and each checkpoint keeps both stream positions."""
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        str(REPO / "training" / "train.py"), *TINY, "--dataset", str(mnist_dir), "--cache-dir", str(tmp_path / "c"),
        "--output-dir", str(out), "--max-steps", "6", "--checkpoint-every", "3", "--streaming",
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps_per_epoch"] == 4 and summary["images_seen"] == 6 * 16  # 64 images / (8 x 2 processes)
    assert summary["ema_in_sync_across_processes"] is True
    state = json.loads((out / "checkpoints" / "checkpoint-3" / "training_state.json").read_text())
    assert [s["batches_done"] for s in state["stream"]] == [3, 3]
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())
