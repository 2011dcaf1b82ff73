"""punkdiff.sampling: many images in batches, with the sampler, steps and eta the model recommends by default."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from tiny_models import digit_pipeline, punk_pipeline, tiny_pipeline

from punkdiff.pipelines.punkdiff_pipeline import SamplingConfig
from punkdiff.precision import cpu_has_native_bf16
from punkdiff.presets import DDIM_ETA, RECOMMENDED_SAMPLING
from punkdiff.sampling import (
    generate,
    prepare_for_sampling,
    recommended_sampling,
    sampling_precision,
    to_uint8,
    write_array,
    write_pngs,
)


def _sample(pipe, count: int, batch_size: int, **kwargs) -> np.ndarray:
    return generate(pipe, count, seed=3, batch_size=batch_size, sampler="ddim", num_inference_steps=4,
                    output_type="np", progress=False, **kwargs)


def test_default_ddim_is_ancestral_as_measured():
    pipe = tiny_pipeline(channels=1)
    default = _sample(pipe, 3, 3)
    assert DDIM_ETA == 1.0  # the weight the README's sampler study measured best on every preset model
    np.testing.assert_allclose(default, _sample(pipe, 3, 3, eta=DDIM_ETA), atol=1e-6)
    assert np.abs(default - _sample(pipe, 3, 3, eta=0.0)).max() > 1e-2  # the noise really is drawn


def test_image_i_depends_only_on_its_seed_even_with_fresh_noise():
    pipe = tiny_pipeline(channels=1)
    whole = _sample(pipe, 5, 5)
    np.testing.assert_allclose(_sample(pipe, 5, 2), whole, atol=1e-5)  # batches of 2, 2, 1
    np.testing.assert_allclose(_sample(pipe, 2, 2), whole[:2], atol=1e-5)


def test_a_conditional_model_gets_its_requests_per_image_across_batches():
    digits = digit_pipeline()
    per_image = [3, 7, 1, 1, 9]
    whole = _sample(digits, 5, 5, labels=per_image, guidance_scale=3.0)
    np.testing.assert_allclose(_sample(digits, 5, 2, labels=per_image, guidance_scale=3.0), whole, atol=1e-5)
    ones = _sample(digits, 5, 2, labels=1, guidance_scale=3.0)  # one label for every image
    np.testing.assert_allclose(ones[2:4], whole[2:4], atol=1e-5)
    assert np.abs(ones[0] - whole[0]).max() > 1e-3
    punks = punk_pipeline()
    request = {"type": "Ape", "accessories": ["Cap"]}
    apes = _sample(punks, 3, 2, attributes=request, guidance_scale=2.0)
    np.testing.assert_allclose(apes, _sample(punks, 3, 3, attributes=[request] * 3, guidance_scale=2.0), atol=1e-4)
    with pytest.raises(ValueError, match="got 2 requests for 5 images; give one per image, or one for all"):
        _sample(digits, 5, 2, labels=[3, 7])


def test_the_model_recommendation_fills_what_a_call_leaves_out():
    pipe = tiny_pipeline(channels=1)
    assert recommended_sampling(pipe) == SamplingConfig.from_dict(RECOMMENDED_SAMPLING)  # saved without one
    pipe.sampling_config = SamplingConfig("ddim-trailing", 3, 0.0)
    assert recommended_sampling(pipe) is pipe.sampling_config

    def run(**kwargs) -> np.ndarray:
        return generate(pipe, 2, seed=1, output_type="np", progress=False, **kwargs)

    default = run()
    np.testing.assert_array_equal(default, run(sampler="ddim-trailing", num_inference_steps=3, eta=0.0))
    assert np.abs(default - run(eta=1.0)).max() > 1e-2  # an explicit argument wins
    assert np.abs(default - run(num_inference_steps=2)).max() > 1e-2


def test_bf16_autocast_where_the_cpu_has_it_and_its_images_agree_with_float32():
    pipe = tiny_pipeline(channels=1)
    computed_in, why = sampling_precision(pipe, "auto")
    fp32 = _sample(pipe, 4, 4, precision="float32")
    for asked in ("auto", "bfloat16"):
        images = _sample(pipe, 4, 4, precision=asked)
        assert images.dtype == np.float32  # the sampler's arithmetic and the output stay float32
        difference = np.abs(images - fp32)
        if cpu_has_native_bf16():
            assert computed_in == "bfloat16" and "has native bf16" in why
            assert 0 < difference.mean() < 0.005 and difference.max() < 0.1  # bf16 really ran, and agrees
        else:  # emulated bf16 is slower than float32: the same check training uses keeps float32
            assert computed_in == "float32" and "no native bf16" in why
            np.testing.assert_array_equal(images, fp32)
    assert sampling_precision(pipe, "float32") == ("float32", "asked for")
    with pytest.raises(ValueError, match="precision must be one of auto, float32, bfloat16, got 'fp8'"):
        _sample(pipe, 1, 1, precision="fp8")


def test_weights_loaded_in_half_precision_compute_in_it_whatever_is_asked():
    pipe = tiny_pipeline(channels=1).to(dtype=torch.bfloat16)
    assert sampling_precision(pipe, "auto") == ("bfloat16", "the weights are bfloat16")
    assert sampling_precision(pipe, "float32") == ("bfloat16", "the weights are bfloat16")


def test_channels_last_and_compile_keep_the_images_and_the_saved_weights(tmp_path):
    pipe = tiny_pipeline(channels=1)
    expected = _sample(pipe, 3, 3)
    keys = set(pipe.unet.state_dict())
    prepare_for_sampling(pipe, channels_last=True, compile=True)
    assert type(pipe.unet).__name__ == "UNet2DModel" and set(pipe.unet.state_dict()) == keys
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(_sample(pipe, 3, 2), expected, atol=1e-4)  # compiled, with a smaller last batch
    pipe.save_pretrained(tmp_path / "saved")  # still saves as a pipeline
    assert (tmp_path / "saved" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_images_go_to_pngs_and_one_array_alike(tmp_path):
    images = _sample(tiny_pipeline(channels=3), 3, 3)
    array = to_uint8(images)
    assert array.shape == (3, 3, 8, 8) and array.dtype == np.uint8
    folder = write_pngs([PIL.Image.fromarray(a.transpose(1, 2, 0)) for a in array], tmp_path / "pngs", workers=2)
    assert sorted(p.name for p in folder.iterdir()) == ["0000.png", "0001.png", "0002.png"]
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(folder / "0002.png")).transpose(2, 0, 1), array[2])
    saved = write_array(array, tmp_path / "deep" / "samples.npy")
    np.testing.assert_array_equal(np.load(saved, allow_pickle=False), array)
    assert [p.name for p in saved.parent.iterdir()] == ["samples.npy"]  # written atomically: no temporary left
