"""The attribute encoder: zero in, zero out; a UNet2DModel component that saves and loads as safetensors."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMScheduler
from tiny_models import tiny_identity_unet, trained_looking_encoder

from punkdiff.pipelines.punkdiff_pipeline import AttributeEncoder, ConditionGroup, ConditionVocabulary, PunkDiffPipeline


def test_the_null_condition_encodes_to_exactly_zero_and_a_real_one_does_not():
    encoder = trained_looking_encoder()
    assert torch.equal(encoder(torch.zeros(3, 12)), torch.zeros(3, 64))
    condition = torch.zeros(3, 12)
    condition[0, 2] = condition[1, 5] = condition[1, 7] = 1.0
    out = encoder(condition)
    assert out[0].abs().sum() > 0 and out[1].abs().sum() > 0 and torch.equal(out[2], torch.zeros(64))
    assert not torch.allclose(out[0], out[1])
    assert not any(name.endswith("bias") for name, _ in encoder.named_parameters())


def test_the_encoder_saves_as_safetensors_and_loads_with_from_pretrained(tmp_path):
    encoder = trained_looking_encoder(num_attributes=93, embedding_dim=64)
    encoder.save_pretrained(tmp_path / "attribute_encoder")
    files = sorted(p.name for p in (tmp_path / "attribute_encoder").iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = AttributeEncoder.from_pretrained(tmp_path / "attribute_encoder", use_safetensors=True)
    assert loaded.config.num_attributes == 93 and loaded.config.embedding_dim == 64
    x = (torch.rand(4, 93, generator=torch.Generator().manual_seed(0)) > 0.9).float()
    assert torch.equal(loaded(x), encoder(x))


def test_the_encoder_loads_back_as_a_pipeline_component_in_safetensors(tmp_path):
    encoder = trained_looking_encoder()
    vocabulary = ConditionVocabulary((ConditionGroup("type", "single", tuple("ABCDE")),
                                      ConditionGroup("accessories", "multi", tuple("abcdef"))))
    PunkDiffPipeline(tiny_identity_unet(), DDPMScheduler(), encoder, vocabulary).save_pretrained(tmp_path / "model")
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert index["attribute_encoder"] == ["punkdiff.pipelines.punkdiff_pipeline", "AttributeEncoder"]
    assert (tmp_path / "model" / "attribute_encoder" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = PunkDiffPipeline.from_pretrained(tmp_path / "model", use_safetensors=True)
    assert isinstance(loaded.attribute_encoder, AttributeEncoder)
    x = torch.eye(12)
    assert torch.equal(loaded.attribute_encoder(x), encoder(x))


def test_an_identity_unet_takes_the_encoding_and_the_null_condition_is_class_labels_of_zeros():
    unet, encoder = tiny_identity_unet().eval(), trained_looking_encoder()
    sample = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        null = unet(sample, 10, class_labels=encoder(torch.zeros(2, 12))).sample
        zeros = unet(sample, 10, class_labels=torch.zeros(2, unet.config.block_out_channels[0] * 4)).sample
        condition = torch.zeros(2, 12)
        condition[:, 3] = 1.0
        conditioned = unet(sample, 10, class_labels=encoder(condition)).sample
    assert null.shape == (2, 3, 8, 8)
    assert torch.equal(null, zeros)
    assert (conditioned - null).abs().max() > 1e-3  # the condition reaches the output


def test_a_condition_of_the_wrong_width_is_refused_clearly():
    encoder = AttributeEncoder(num_attributes=12, embedding_dim=64)
    with pytest.raises(ValueError, match=r"expects attributes of shape \[batch, 12\], got \[2, 11\]"):
        encoder(torch.zeros(2, 11))
    with pytest.raises(ValueError, match="positive widths"):
        AttributeEncoder(num_attributes=0, embedding_dim=64)
