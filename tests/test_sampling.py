"""punkdiff.sampling: many images in batches, with the sampler, steps and eta the model recommends by default."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import digit_pipeline, punk_pipeline, tiny_pipeline

from punkdiff.pipelines.punkdiff_pipeline import SamplingConfig
from punkdiff.presets import DDIM_ETA, RECOMMENDED_SAMPLING
from punkdiff.sampling import generate, recommended_sampling


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
