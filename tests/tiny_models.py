"""Tiny models shared by the tests: randomly initialised UNets and pipelines, and the exact Gaussian denoiser."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel

from punkdiff import PunkDiffPipeline
from punkdiff.pipelines.punkdiff_pipeline import AttributeEncoder, ConditionGroup, ConditionVocabulary


def tiny_unet(channels: int = 3, sample_size: int = 8, seed: int = 0, **overrides) -> UNet2DModel:
    """An 8/16-channel UNet2DModel, seeded; `overrides` go to its config (e.g. `dropout=0.5`)."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        **overrides,
    )


def tiny_pipeline(channels: int = 3, sample_size: int = 8) -> PunkDiffPipeline:
    pipe = PunkDiffPipeline(tiny_unet(channels, sample_size), DDPMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_inception_weights(path, seed: int = 0):
    """The FID InceptionV3's state dict, randomly initialised, as safetensors at `path` (no real weights offline).

    Convolutions get He-normal weights, so activations keep their scale through the 94 layers and the features
    are not all ~0 (PyTorch's default initialisation shrinks them by orders of magnitude).
    """
    from safetensors.torch import save_file

    from punkdiff.metrics.inception import InceptionFeatures

    class Unloaded(InceptionFeatures):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random initialisation
            return None

    state = Unloaded({}).state_dict()
    generator = torch.Generator().manual_seed(seed)
    for tensor in state.values():
        if tensor.ndim == 4:
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * (2 / tensor[0].numel()) ** 0.5)
    save_file(state, path)
    return path


def tiny_dinov2(folder, seed: int = 0):
    """A 2-layer, 32-wide random `Dinov2Model` saved with `save_pretrained` (safetensors) into `folder`."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=28, patch_size=14)
    Dinov2Model(config).save_pretrained(folder)
    return folder


def gaussian_denoiser(
    ac: torch.Tensor, prediction_type: str = "epsilon", data_std: float = 0.5
) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """The exact optimal model for data x_0 ~ N(0, data_std^2 I): E[x_0 | x_t] = sqrt(ab) s^2 x_t / (ab s^2 + 1 - ab),
    returned as the requested parameterisation. A cheap, well-conditioned stand-in for a trained network."""
    s2 = data_std**2

    def model(x: torch.Tensor, t: Any) -> torch.Tensor:
        ab = ac[int(t)]
        x0 = ab.sqrt() * s2 / (ab * s2 + 1 - ab) * x
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        if prediction_type == "epsilon":
            return eps
        if prediction_type == "sample":
            return x0
        return ab.sqrt() * eps - (1 - ab).sqrt() * x0

    return model


def tiny_identity_unet() -> UNet2DModel:
    """A small UNet whose class embedding is added as given (`class_embed_type="identity"`); time embedding 64 wide."""
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, class_embed_type="identity")


def trained_looking_encoder(num_attributes: int = 12, embedding_dim: int = 64) -> AttributeEncoder:
    """An encoder whose weights are far from their initialisation, as after training."""
    torch.manual_seed(1)
    encoder = AttributeEncoder(num_attributes=num_attributes, embedding_dim=embedding_dim)
    with torch.no_grad():
        for p in encoder.parameters():
            p.normal_(0.0, 2.0)
    return encoder


DIGITS = ConditionVocabulary((ConditionGroup("label", "single", tuple("0123456789"), (500,) * 10),), 5000)
PUNK_TYPES = ("Alien", "Ape", "Zombie", "Female", "Male")
PUNK_ACCESSORIES = ("3D Glasses", "Cap", "Earring", "Hoodie", "Mohawk", "Pipe")
# 5 types + 6 accessories + the "nothing" slot: 12 wide, as `trained_looking_encoder` takes
PUNKS = ConditionVocabulary((ConditionGroup("type", "single", PUNK_TYPES, (9, 24, 88, 3840, 6039)),
                             ConditionGroup("accessories", "multi", PUNK_ACCESSORIES, (10, 20, 30, 40, 50, 60))), 10000)


def digit_pipeline(output_scale: float = 1.0) -> PunkDiffPipeline:
    """A grayscale 8x8 single-label pipeline: the UNet's own class embedding of 10 digits + the null class."""
    unet = tiny_unet(channels=1, num_class_embeds=11).eval()
    with torch.no_grad():
        unet.class_embedding.weight.mul_(4.0)  # so that the condition visibly changes the output
        unet.conv_out.weight.mul_(output_scale)
        unet.conv_out.bias.mul_(output_scale)
    pipe = PunkDiffPipeline(unet, DDPMScheduler(num_train_timesteps=1000), condition=DIGITS)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def punk_pipeline(output_scale: float = 1.0) -> PunkDiffPipeline:
    """An RGB 8x8 attribute pipeline: type + accessories, multi-hot through the attribute encoder."""
    unet = tiny_identity_unet().eval()
    with torch.no_grad():
        unet.conv_out.weight.mul_(output_scale)
        unet.conv_out.bias.mul_(output_scale)
    pipe = PunkDiffPipeline(unet, DDPMScheduler(num_train_timesteps=1000), trained_looking_encoder(), PUNKS)
    pipe.set_progress_bar_config(disable=True)
    return pipe
