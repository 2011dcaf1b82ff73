"""Conditional training (`punkdiff.training.conditioning` and what it wires): tiny runs on slices of the MNIST and
CryptoPunks mirrors, told the digit or the punk's type and accessories."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_training import TINY, max_diff

from punkdiff.conditions import ConditionGroup, ConditionVocabulary
from punkdiff.data import EpochWeightedSampler, to_model_input
from punkdiff.scripts.distill import main as distill_main
from punkdiff.scripts.train import main as train_main
from punkdiff.training.conditioning import TrainingCondition, batch_inputs, grid_requests
from punkdiff.training.loss import diffusion_loss

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

# a tiny punks run: the conditional preset with the tests' tiny UNet on 64 punks, float32
PUNKS = ["--preset", "punks-24-cond-cpu", "--max-train-samples", "64", "--batch-size", "8", "--report-to", "none",
         "--sample-every", "1000", "--set", "model.block_out_channels=[8,16,16]", "--set", "model.norm_num_groups=4",
         "--set", "train.num_sample_images=4", "--set", "train.sample_inference_steps=2", "--mixed-precision", "no",
         "--lr-warmup-steps", "1"]


def mnist_run(mnist_dir: Path, cache_dir: Path, out: Path, *extra: str) -> int:
    return train_main([*TINY, "--dataset", str(mnist_dir), "--cache-dir", str(cache_dir), "--output-dir", str(out),
                       "--condition-on", "label", *extra])


def punks_run(punks_dir: Path, cache_dir: Path, out: Path, *extra: str) -> int:
    return train_main([*PUNKS, "--dataset", str(punks_dir), "--cache-dir", str(cache_dir), "--output-dir", str(out),
                       *extra])


DIGITS = ConditionVocabulary((ConditionGroup("label", "single", tuple("0123456789"), (1,) * 10),))
PUNK_VOCABULARY = ConditionVocabulary((
    ConditionGroup("type", "single", ("Alien", "Ape", "Male"), (1, 2, 9)),
    ConditionGroup("accessories", "multi", ("Cap", "Earring", "Pipe"), (3, 8, 1)),
))


def test_a_digit_model_trains_exports_and_draws_the_requested_labels(mnist_dir, cache_dir, tmp_path, capsys):
    out = tmp_path / "digits"
    assert mnist_run(mnist_dir, cache_dir, out, "--max-steps", "4", "--checkpoint-every", "4") == 0
    from punkdiff.pipelines import PunkDiffPipeline

    pipe = PunkDiffPipeline.from_pretrained(out / "pipeline")
    assert pipe.unet.config.num_class_embeds == 11 and pipe.condition.columns == ("label",)
    assert pipe.condition.num_rows == 64 and sum(pipe.condition.groups[0].counts) == 64
    card = (out / "pipeline" / "README.md").read_text()
    assert "`label`: one of 10" in card
    seeded = [torch.Generator().manual_seed(0) for _ in range(2)]
    three = pipe(labels=[3, 3], generator=seeded, num_inference_steps=2, output_type="np").images
    seeded = [torch.Generator().manual_seed(0) for _ in range(2)]
    seven = pipe(labels=[7, 7], generator=seeded, num_inference_steps=2, output_type="np").images
    assert three.shape == (2, 16, 16, 1) and abs(three - seven).max() > 0  # the label changes what is drawn
    # the preview grid: one row per digit, four columns (16 px tiles, scaled 6x, 1 px gaps)
    assert Image.open(out / "samples.png").size == (4 * (96 + 2), 10 * (96 + 2))
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["config"]["data"]["condition_on"] == ["label"]
    assert distill_main([str(out / "pipeline"), "--output-dir", str(tmp_path / "student")]) == 2
    assert "distilling a conditional model is not supported" in capsys.readouterr().err
    assert not (tmp_path / "student").exists()


def test_an_attribute_model_resumes_bit_identically(punks_dir, cache_dir, tmp_path):
    """Encoder, both EMAs, drops and loss weights: stopped at step 3 and resumed to 6 == 6 steps straight."""
    run = ["--max-steps", "6", "--checkpoint-every", "3", "--balance-conditions", "loss"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert punks_run(punks_dir, cache_dir, straight, *run) == 0
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "checkpoint-3", resumed / "checkpoints" / "checkpoint-3")
    from tiny_training import reset_accelerate_state

    reset_accelerate_state()
    assert punks_run(punks_dir, cache_dir, resumed, *run, "--resume-from-checkpoint", "latest") == 0
    a, b = straight / "checkpoints" / "checkpoint-6", resumed / "checkpoints" / "checkpoint-6"
    for name in ("model.safetensors", "model_1.safetensors", "unet_ema/diffusion_pytorch_model.safetensors",
                 "attribute_encoder_ema/diffusion_pytorch_model.safetensors"):
        assert max_diff(load_file(a / name), load_file(b / name)) == 0, name
    encoder = load_file(a / "model_1.safetensors")
    assert max_diff(encoder, load_file(a / "attribute_encoder_ema/diffusion_pytorch_model.safetensors")) > 0
    # the export carries the encoder's EMA weights and samples what is asked
    exported = load_file(straight / "pipeline" / "attribute_encoder" / "diffusion_pytorch_model.safetensors")
    assert max_diff(exported, load_file(a / "attribute_encoder_ema/diffusion_pytorch_model.safetensors")) == 0
    from punkdiff.pipelines import PunkDiffPipeline

    pipe = PunkDiffPipeline.from_pretrained(straight / "pipeline")
    images = pipe(attributes={"type": "Male", "accessories": ["Earring"]}, batch_size=2, guidance_scale=3.0,
                  num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 24, 24, 3)
    assert pipe.attribute_encoder.config.embedding_dim == 32  # 4 x the first block's 8 channels


@pytest.mark.parametrize(("column", "message"), [
    ("image", "column 'image' holds Image"), ("colour", "the dataset has no column 'colour'")])
def test_a_column_that_cannot_condition_is_refused_before_decoding(mnist_dir, tmp_path, capsys, column, message):
    cache = tmp_path / "cache"
    assert train_main([*TINY, "--dataset", str(mnist_dir), "--cache-dir", str(cache), "--output-dir",
                       str(tmp_path / "out"), "--condition-on", column]) == 2
    err = capsys.readouterr().out
    assert message in err and "its columns are image: Image" in err and "label: ClassLabel" in err
    assert not list(cache.glob("images-*.npy"))  # nothing was decoded


def test_conditional_runs_refuse_streaming(mnist_dir, cache_dir, tmp_path, capsys):
    assert mnist_run(mnist_dir, cache_dir, tmp_path / "s", "--streaming") == 2
    assert "--condition-on keeps every image's condition beside the decoded cache" in capsys.readouterr().out


def test_balance_needs_a_condition(tmp_path, capsys):
    assert train_main([*TINY, "--dataset", "x", "--output-dir", str(tmp_path), "--balance-conditions", "sampler"]) == 2
    assert "balances the classes of a conditional run: add --condition-on" in capsys.readouterr().err


def test_drops_come_from_the_generator_and_leave_the_unconditional_path_alone():
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    condition = PUNK_VOCABULARY.encode_request(attributes=[{"type": "Ape", "accessories": ["Cap"]}] * 64)
    seen = []

    def forward(x, t, class_labels=None):
        seen.append(class_labels)
        return x

    encoder = TrainingCondition(PUNK_VOCABULARY, encoder=lambda c: c)
    batch = {"images": images, "condition": condition}
    runs = []
    for _ in range(2):
        clean, conditioned, _ = batch_inputs(batch, True, torch.Generator().manual_seed(5), forward, diffusion_loss,
                                             encoder)
        conditioned(clean, None)
        runs.append((clean, seen[-1]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    dropped = (runs[0][1] != condition).any(dim=1)
    assert 0 < dropped.sum() < 64 and (runs[0][1][runs[0][1].sum(1) == 0].shape[0] > 0)  # some null rows
    # unconditional: the same flips from the same generator as `to_model_input` alone, the forward untouched
    clean, same, loss = batch_inputs(images, True, torch.Generator().manual_seed(5), forward, diffusion_loss, None)
    assert torch.equal(clean, to_model_input(images, True, torch.Generator().manual_seed(5)))
    assert same is forward and loss is diffusion_loss


def test_loss_weights_weigh_each_image():
    scheduler = __import__("diffusers").DDPMScheduler()
    clean, noise = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    t = torch.tensor([10, 10])

    class Zero(torch.nn.Module):
        def forward(self, x, t):
            return type("Out", (), {"sample": torch.cat([torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)])})()

    # image 0 errs by 1 everywhere, image 1 not at all: weights 2 and 0 double the mean error
    assert diffusion_loss(Zero(), scheduler, clean, noise, t).item() == pytest.approx(0.5)
    assert diffusion_loss(Zero(), scheduler, clean, noise, t, weights=torch.tensor([2.0, 0.0])).item() == 1.0


def test_grid_requests_show_every_class_with_a_few_accessory_combinations():
    labels, columns = grid_requests(DIGITS, 16)
    assert columns == 4 and labels["labels"] == [d for d in "0123456789" for _ in range(4)]
    attributes, columns = grid_requests(PUNK_VOCABULARY, 16)
    assert columns == 6
    rows = [attributes["attributes"][i:i + columns] for i in range(0, 18, columns)]
    assert [r[0]["type"] for r in rows] == ["Alien", "Ape", "Male"]
    assert [r.get("accessories") for r in rows[0]] == [None, [], ["Earring"], ["Cap"], ["Earring", "Cap"], None]
    PUNK_VOCABULARY.encode_request(attributes=attributes["attributes"])  # every request is a valid one


def test_the_weighted_sampler_draws_by_weight_and_repeats_an_epoch_exactly():
    sampler = EpochWeightedSampler(torch.tensor([1.0, 0.0, 9.0]), seed=3)
    sampler.set_epoch(2)
    first = list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) == first and len(first) == 3 and 1 not in first
    draws = []
    for epoch in range(300):
        sampler.set_epoch(epoch)
        draws += list(sampler)
    assert draws.count(2) / len(draws) == pytest.approx(0.9, abs=0.03)


@pytest.mark.slow
def test_two_processes_train_the_encoder_in_step(punks_dir, cache_dir, tmp_path):
    """`--multi_gpu --num_processes 2` on CPU: the encoder is DDP-prepared beside the UNet, its EMA agrees."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(Path(__file__).resolve().parents[1] / "training" / "train.py"), *PUNKS, "--dataset", str(punks_dir),
           "--cache-dir", str(cache_dir), "--output-dir", str(out), "--max-steps", "4", "--checkpoint-every", "4"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["ema_in_sync_across_processes"] is True
    checkpoint = out / "checkpoints" / "checkpoint-4"
    assert {"model_1.safetensors", "noise_rng_1.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    assert (out / "pipeline" / "attribute_encoder" / "diffusion_pytorch_model.safetensors").is_file()
