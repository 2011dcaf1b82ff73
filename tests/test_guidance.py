"""Classifier-free guidance: the combination, its validation, and one batched forward equal to two."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import UNet2DModel
from tiny_models import tiny_identity_unet, trained_looking_encoder

from punkdiff.pipelines.punkdiff_pipeline import (
    check_guidance_scale,
    doubled_batch,
    guided_output,
    guided_prediction,
    split_doubled,
)


def test_guidance_extrapolates_from_the_unconditional_towards_the_conditional_prediction():
    cond, uncond = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])
    assert torch.equal(guided_output(cond, uncond, 1.0), cond)  # w = 1: the conditional model alone
    assert torch.equal(guided_output(cond, uncond, 0.0), uncond)
    assert torch.equal(guided_output(cond, uncond, 3.0), torch.tensor([4.0, -5.0]))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -0.5, "strong", None])
def test_a_guidance_scale_that_is_not_finite_and_non_negative_is_refused(bad):
    with pytest.raises(ValueError, match="guidance scale must be a"):
        check_guidance_scale(bad)


def test_the_doubled_batch_splits_back_into_its_halves():
    sample = torch.randn(3, 1, 4, 4)
    samples, conditions = doubled_batch(sample, torch.tensor([1, 2, 3]), torch.tensor([10, 10, 10]))
    assert torch.equal(samples[:3], sample) and torch.equal(samples[3:], sample)
    assert conditions.tolist() == [1, 2, 3, 10, 10, 10]
    cond, uncond = split_doubled(samples * 2)
    assert torch.equal(cond, sample * 2) and torch.equal(uncond, sample * 2)
    with pytest.raises(ValueError, match="must match each other and the batch of 3 samples"):
        doubled_batch(sample, torch.tensor([1, 2]), torch.tensor([10, 10]))


def test_one_batched_forward_equals_two_with_attributes():
    unet, encoder = tiny_identity_unet().eval(), trained_looking_encoder()
    sample = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    condition, null = torch.zeros(2, 12), torch.zeros(2, 12)
    condition[0, 1] = condition[1, 4] = condition[1, 9] = 1.0
    with torch.no_grad():
        cond = unet(sample, 500, class_labels=encoder(condition)).sample
        uncond = unet(sample, 500, class_labels=encoder(null)).sample
        guided = guided_prediction(unet, sample, torch.tensor([500, 500]), condition, null, 4.0, encode=encoder)
        alone = guided_prediction(unet, sample, 500, condition, null, 1.0, encode=encoder)
    torch.testing.assert_close(guided, uncond + 4.0 * (cond - uncond), atol=1e-5, rtol=1e-5)
    assert torch.equal(alone, cond)
    assert (guided - cond).abs().max() > 1e-3


def test_one_batched_forward_equals_two_with_class_indices():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, num_class_embeds=11).eval()
    sample = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels, null = torch.tensor([3, 7]), torch.tensor([10, 10])
    with torch.no_grad():
        cond = unet(sample, 20, class_labels=labels).sample
        uncond = unet(sample, 20, class_labels=null).sample
        guided = guided_prediction(unet, sample, 20, labels, null, 2.5)
        unconditional = guided_prediction(unet, sample, 20, labels, null, 0.0)
    torch.testing.assert_close(guided, uncond + 2.5 * (cond - uncond), atol=1e-5, rtol=1e-5)
    assert torch.equal(unconditional, uncond)
