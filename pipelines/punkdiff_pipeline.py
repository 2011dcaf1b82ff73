"""`PunkDiffPipeline`: unconditional DDPM sampling, reconstruction and RePaint inpainting.

This file is the one source of the class. It imports only torch, diffusers (and its huggingface_hub), numpy,
PIL and the standard library, so punkdiff's export copies it next to a model as `pipeline.py` and a Hub user
without punkdiff can load it with `DiffusionPipeline.from_pretrained(repo, custom_pipeline=repo,
trust_remote_code=True)`. It knows nothing of punkdiff: the model card and punkdiff's checked push live in
`punkdiff.hub`.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    ImagePipelineOutput,
    RePaintScheduler,
    UNet2DModel,
    UniPCMultistepScheduler,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_repaint import RePaintSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import create_repo, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

# diffusers' `custom_pipeline=<folder or repo id>` loads the pipeline class from this file name.
CUSTOM_PIPELINE_FILE = "pipeline.py"
# Pixel-art models keep their training palette here (`{"colors": ["#rrggbb", ...]}`); stock diffusers ignores it.
PALETTE_FILE = "palette.json"
# How the model is meant to be sampled (`SamplingConfig`), beside `scheduler/`, which stays the training schedule.
SAMPLING_FILE = "sampling.json"
# The `save_pretrained(push_to_hub=True, ...)` arguments diffusers takes from its kwargs.
_PUSH_KWARGS = ("repo_id", "private", "token", "commit_message", "create_pr")

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor | list[PIL.Image.Image] | list[np.ndarray]
Generator = torch.Generator | list[torch.Generator] | None
StepCallback = Callable[[DiffusionPipeline, int, torch.Tensor, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def predicted_x0_and_epsilon(
    model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""f_theta(x_t, t) and epsilon_theta(x_t, t): the UNet's output at (x_t, t) read as the target it was trained on.

    With `alpha_prod_t` = alpha_bar_t: epsilon as is, x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t);
    "sample" is x_0 itself; "v_prediction" gives x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v and
    eps = sqrt(alpha_bar_t) v + sqrt(1 - alpha_bar_t) x_t, with no division (alpha_bar_t may be 0 at zero terminal SNR).

    Examples:
        ```py
        >>> x_t, v = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
        >>> x0, eps = predicted_x0_and_epsilon(v, x_t, torch.tensor(0.0), "v_prediction")  # pure noise: x_0 = -v
        >>> torch.equal(x0, -v), torch.equal(eps, x_t)
        (True, True)
        ```
    """
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        return (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5, model_output
    if prediction_type == "sample":
        return model_output, (sample - alpha_prod_t**0.5 * model_output) / beta_prod_t**0.5
    if prediction_type == "v_prediction":
        return (alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output,
                alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample)
    raise ValueError(f"prediction_type {prediction_type!r} must be epsilon, sample or v_prediction")


def nearest_colour(images: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """Every pixel of `images` `[N, C, H, W]` replaced by the nearest of `colours` `[P, C]` (same value scale).

    Examples:
        ```py
        >>> nearest_colour(torch.tensor([[[[0.2]], [[0.9]]]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])).flatten()
        tensor([0., 1.])
        ```
    """
    pixels = images.movedim(1, -1)
    nearest = torch.cdist(pixels.reshape(-1, pixels.shape[-1]), colours).argmin(dim=1)
    return colours[nearest].reshape(pixels.shape).movedim(-1, 1)


def read_palette(path: str | os.PathLike[str]) -> torch.Tensor:
    """A `palette.json` (`{"colors": ["#rrggbb", ...]}`, or `"#gg"`-style one-channel values) -> uint8 `[P, C]`."""
    colours = json.loads(Path(path).read_text())["colors"]
    if not colours or not all(isinstance(c, str) and c.startswith("#") for c in colours):
        raise ValueError(f"{path}: 'colors' must be a non-empty list of '#rrggbb' strings.")
    return torch.tensor([list(bytes.fromhex(c[1:])) for c in colours], dtype=torch.uint8)


def write_palette(path: str | os.PathLike[str], palette: torch.Tensor | np.ndarray) -> None:
    """Write uint8 colours `[P, C]` as `palette.json`, the form `read_palette` reads."""
    colours = ["#" + bytes(int(v) for v in colour).hex() for colour in np.asarray(palette, dtype=np.uint8)]
    Path(path).write_text(json.dumps({"colors": colours}) + "\n")


class _ExactTimesteps:
    """`set_timesteps` with exactly `num_inference_steps` timesteps, computed in exact arithmetic.

    Upstream builds "trailing" and "linspace" timesteps in floating point. "trailing" takes
    `np.round(np.arange(T, 0, -T / n)) - 1`, which for some n (62 of 1..1000 with T = 1000, e.g. n = 61) has n + 1
    values, the last t = -1: the model is then called at t = -1 and `alphas_cumprod[-1]`, the noisiest level, is
    used for an almost clean sample. And where the exact value is a .5 tie, float error picks the side, so a
    timestep can be off by one. Here, as in Lin et al. 2024, Table 2, with T = `num_train_timesteps`:
    "leading" t_i = i * (T // n) + steps_offset, "trailing" t_k = round(T * k / n) - 1, "linspace"
    t_i = round(i * (T - 1) / (n - 1)), for i < n and 1 <= k <= n, each rounded half to even from the exact
    fraction. Custom `timesteps` (DDPM) are kept as given.
    """

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device = None, **kwargs):
        """Upstream's checks and state, then the exact timesteps (see the class docstring).

        Examples:
            ```py
            >>> sched = ExactDDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
            >>> sched.set_timesteps(61)
            >>> len(sched.timesteps), int(sched.timesteps[-1])  # upstream: 62 timesteps, the last -1
            (61, 15)
            ```
        """
        super().set_timesteps(num_inference_steps, device, **kwargs)  # validates, sets num_inference_steps
        if num_inference_steps is None:
            return
        T, n, spacing = self.config.num_train_timesteps, num_inference_steps, self.config.timestep_spacing
        if spacing == "leading":
            steps = [i * (T // n) + self.config.steps_offset for i in range(n)]
        elif spacing == "trailing":
            steps = [round(Fraction(T * k, n)) - 1 for k in range(1, n + 1)]
        else:  # "linspace": upstream has rejected any other spacing
            steps = [round(Fraction(i * (T - 1), max(n - 1, 1))) for i in range(n)]
        if steps[-1] >= T:
            raise ValueError(f"steps_offset={self.config.steps_offset} puts timestep {steps[-1]} outside [0, {T}).")
        self.timesteps = torch.tensor(steps[::-1], device=device)


class ExactDDIMScheduler(_ExactTimesteps, DDIMScheduler):
    r"""`DDIMScheduler` with exact timesteps, whose step lands on the next of them, for every `timestep_spacing`.

    Two deviations of upstream are fixed. `set_timesteps` is `_ExactTimesteps`'s (no extra t = -1 step with
    "trailing", exact rounding). And upstream `DDIMScheduler.step` takes the previous timestep as
    `t - num_train_timesteps // num_inference_steps`, which is only the next scheduled timestep for "leading"
    spacing; with "trailing" or "linspace" it steps to a timestep that is not in the schedule (diffusers issues
    #11347 and #12633). Here the previous timestep is the next entry of `timesteps` (or -1, i.e.
    `final_alpha_cumprod`, after the last), as `DDPMScheduler.previous_timestep` does. The update is upstream's
    equation for equation, the noise is drawn as upstream draws it, and the config stays a stock `DDIMScheduler`
    one. `step` reads the scheduler and never writes to it, so one instance may serve concurrent calls.
    """

    def previous_timestep(self, timestep: int | torch.Tensor) -> int:
        """The scheduled timestep after `timestep`, or -1 after the last (alpha_bar is then `final_alpha_cumprod`)."""
        timesteps = self.timesteps.tolist()
        index = timesteps.index(int(timestep))
        return timesteps[index + 1] if index + 1 < len(timesteps) else -1

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DDIMSchedulerOutput | tuple:
        r"""One reverse step x_t -> x_{t'} from `timestep` t to the next scheduled timestep t' (Song et al. 2021).

        Eq. (12) with sigma_t(eta) from Eq. (16), in the paper's notation (variable -> symbol):
        - `alpha_prod_t`, `alpha_prod_t_prev` -> alpha_t, alpha_{t'} (the paper's alphas are diffusers' alphas_cumprod)
        - `pred_epsilon` -> epsilon_theta(x_t, t)
        - `pred_original_sample` -> f_theta(x_t, t), the "predicted x_0"
        - `std_dev_t` -> sigma_t(eta) = eta * sqrt((1 - alpha_{t'}) / (1 - alpha_t)) * sqrt(1 - alpha_t / alpha_{t'})
        - `pred_sample_direction` -> sqrt(1 - alpha_{t'} - sigma_t^2) * epsilon_theta, "direction pointing to x_t"
        - `prev_sample` -> x_{t'} = sqrt(alpha_{t'}) * f_theta + direction + sigma_t * z, z ~ N(0, I)

        Args:
            model_output: The UNet's output at (x_t, t): epsilon, v or x_0 as `prediction_type` says.
            timestep: t, one of `self.timesteps`.
            sample: x_t.
            eta: Noise weight; 0 is deterministic DDIM, 1 gives DDPM's posterior variance.
            use_clipped_model_output: Re-derive epsilon from the clipped x_0 (as GLIDE does).
            generator: For z (drawn only when eta > 0, exactly as upstream draws it).
            variance_noise: z itself, instead of drawing it.
            return_dict: Return a `DDIMSchedulerOutput` rather than a tuple.

        Examples:
            ```py
            >>> scheduler = ExactDDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
            >>> scheduler.set_timesteps(61)
            >>> x_t = torch.randn(1, 3, 8, 8)
            >>> out = scheduler.step(torch.zeros_like(x_t), scheduler.timesteps[0], x_t)
            >>> out.prev_sample.shape
            torch.Size([1, 3, 8, 8])
            ```
        """
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None'; run 'set_timesteps' before 'step'.")
        # 1. t and the next scheduled timestep t'
        t = int(timestep)
        prev_t = self.previous_timestep(t)

        # 2. alpha_t, alpha_{t'} and 1 - alpha_t
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t

        # 3. f_theta(x_t, t) and epsilon_theta(x_t, t) from the model output
        pred_original_sample, pred_epsilon = predicted_x0_and_epsilon(
            model_output, sample, alpha_prod_t, self.config.prediction_type
        )

        # 4. clip or threshold f_theta
        if self.config.thresholding:
            pred_original_sample = self._threshold_sample(pred_original_sample)
        elif self.config.clip_sample:
            clip = self.config.clip_sample_range
            pred_original_sample = pred_original_sample.clamp(-clip, clip)

        # 5. sigma_t(eta), Eq. (16)
        std_dev_t = eta * self._get_variance(t, prev_t) ** 0.5
        if use_clipped_model_output:
            pred_epsilon = (sample - alpha_prod_t**0.5 * pred_original_sample) / beta_prod_t**0.5

        # 6. the direction pointing to x_t, and x_{t'} without noise, Eq. (12)
        pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * pred_epsilon
        prev_sample = alpha_prod_t_prev**0.5 * pred_original_sample + pred_sample_direction

        # 7. + sigma_t * z
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("Pass either `generator` or `variance_noise`, not both.")
            if variance_noise is None:
                variance_noise = randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
                )
            prev_sample = prev_sample + std_dev_t * variance_noise

        if not return_dict:
            return prev_sample, pred_original_sample
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


class ExactDDPMScheduler(_ExactTimesteps, DDPMScheduler):
    """`DDPMScheduler` with exact timesteps and no noise on its last step, for every `timestep_spacing`.

    Two deviations of upstream are fixed. `set_timesteps` is `_ExactTimesteps`'s (no extra t = -1 step with
    "trailing", exact rounding). And upstream `DDPMScheduler.step` adds noise whenever `t > 0` rather than
    whenever a step remains, so when the last scheduled timestep is above 0 ("trailing", or `steps_offset` > 0)
    the final sample gets noise too: std sqrt(1 - alpha_bar_t) with "fixed_large". Ho et al. 2020, Algorithm 2,
    sets z = 0 at the last step. Here the step whose previous timestep is -1 returns the posterior mean, which
    with alpha_bar_prev = 1 is exactly upstream's `pred_original_sample` (coefficients 1 and 0, as upstream
    computes them). Upstream still draws that step's noise, which is discarded, so a generator ends one draw
    further on than the reference's; the images are the same. The config stays a stock `DDPMScheduler` one.
    """

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ):
        """Upstream's DDPM step (Ho et al. 2020, Algorithm 2), returning the posterior mean at the last step.

        Examples:
            ```py
            >>> sched = ExactDDPMScheduler(timestep_spacing="trailing")
            >>> sched.set_timesteps(10)
            >>> x_t = torch.randn(1, 1, 8, 8)
            >>> last = sched.step(torch.zeros_like(x_t), sched.timesteps[-1], x_t)
            >>> torch.equal(last.prev_sample, last.pred_original_sample)  # z = 0 at the last step
            True
            ```
        """
        output = super().step(model_output, timestep, sample, generator=generator)
        if self.previous_timestep(timestep) < 0:
            output.prev_sample = output.pred_original_sample
        return output if return_dict else output.to_tuple()


class ExactRePaintScheduler(RePaintScheduler):
    r"""`RePaintScheduler` whose walk starts at t = T - 1 for every step count, with steps of any length.

    Upstream spaces its n steps by `T // n` from 0, so unless n divides T the walk never reaches the noisiest
    level it starts from (250 steps on T = 300 start at t = 249, where x_t is not pure noise), and `step` and
    `undo_step` assume that fixed stride. Here the n levels are spaced "trailing" (Lin et al. 2024), t_k =
    round(T * k / n) - 1 for 1 <= k <= n, so the first is T - 1; the walk over them (jumps back of `jump_length`
    levels, `jump_n_sample` times) is upstream's; each step goes to the next lower level and each jump back
    re-noises to the next higher one. With n = T this is upstream step for step (same noise draws, same images).

    Notation (Lugmayr et al. 2022, Algorithm 1, with the DDIM update of Song et al. 2021, Eq. (12)):
    - `alpha_prod_t`, `alpha_prod_t_prev` -> alpha_bar_t, alpha_bar_{t'} (t' is the next lower level, or the clean
      image after the last: alpha_bar = `final_alpha_cumprod`)
    - `pred_original_sample`, `pred_epsilon` -> x_0 and epsilon predicted from the UNet's output at (x_t, t): epsilon
      itself, or v (x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v; eps = sqrt(alpha_bar_t) v +
      sqrt(1 - alpha_bar_t) x_t), for `prediction_type` "epsilon" or "v_prediction"
    - `std_dev_t` -> eta * sigma_t, with
      sigma_t^2 = (1 - alpha_bar_{t'}) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_{t'})
    - `prev_unknown_part` -> x_{t'}^unknown = sqrt(alpha_bar_{t'}) x_0 + sqrt(1 - alpha_bar_{t'} - std^2) eps + std z
    - `prev_known_part` -> x_{t'}^known ~ q(x_{t'} | x_0 = original image)
    - `prev_sample` -> x_{t'} = m * known + (1 - m) * unknown, m = 1 where the original is kept
    """

    prediction_type = "epsilon"

    def use_schedule_of(self, scheduler: SchedulerMixin) -> None:
        """Take the noise levels and the prediction target of the model's own scheduler.

        Upstream's constructor knows neither `prediction_type` nor `rescale_betas_zero_snr`, so built from a
        zero-terminal-SNR v-prediction model's config it would walk a different schedule than the model learned.
        """
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        self.betas = scheduler.betas.clone()
        self.alphas = scheduler.alphas.clone()
        self.alphas_cumprod = scheduler.alphas_cumprod.clone()

    def set_timesteps(
        self, num_inference_steps: int, jump_length: int = 10, jump_n_sample: int = 10, device=None
    ) -> None:
        """The walk over the levels (upstream's, in level indices), each index mapped to its trailing timestep.

        Examples:
            ```py
            >>> sched = ExactRePaintScheduler(num_train_timesteps=300)
            >>> sched.set_timesteps(250, jump_length=10, jump_n_sample=10)
            >>> int(sched.timesteps[0]), int(sched.levels[0])  # upstream starts at 249 and ends at 0
            (299, 0)
            ```
        """
        T = self.config.num_train_timesteps
        n = min(T, num_inference_steps)
        self.num_inference_steps = n
        # the levels t_1 < ... < t_n, t_n = T - 1
        self.levels = torch.tensor([round(Fraction(T * k, n)) - 1 for k in range(1, n + 1)])
        jumps = {k: jump_n_sample - 1 for k in range(0, n - jump_length, jump_length)}
        walk, k = [], n
        while k >= 1:
            k -= 1
            walk.append(k)
            if jumps.get(k, 0) > 0:
                jumps[k] -= 1
                for _ in range(jump_length):
                    k += 1
                    walk.append(k)
        self.timesteps = self.levels[walk].to(device)

    def _alpha_prod_prev(self, t: int) -> torch.Tensor:
        """alpha_bar at the level below t (the clean image's `final_alpha_cumprod` below the lowest)."""
        index = int(torch.searchsorted(self.levels, t))
        return self.alphas_cumprod[self.levels[index - 1]] if index > 0 else self.final_alpha_cumprod

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        original_image: torch.Tensor,
        mask: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ):
        """One reverse step x_t -> x_{t'} to the next lower level, the known region taken from the original.

        Examples:
            ```py
            >>> sched = ExactRePaintScheduler(num_train_timesteps=300)
            >>> sched.set_timesteps(7, jump_length=2, jump_n_sample=2)
            >>> x_t, image, keep = torch.randn(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8)
            >>> sched.step(torch.zeros_like(x_t), sched.timesteps[0], x_t, image, keep).prev_sample.shape
            torch.Size([1, 1, 8, 8])
            ```
        """
        # 1. alpha_bar_t, alpha_bar_{t'}
        t = int(timestep)
        alpha_prod_t, alpha_prod_t_prev = self.alphas_cumprod[t], self._alpha_prod_prev(t)
        beta_prod_t = 1 - alpha_prod_t
        # 2. the predicted x_0 (clipped as configured) and epsilon, from the target the model was trained on
        pred_original_sample, pred_epsilon = predicted_x0_and_epsilon(
            model_output, sample, alpha_prod_t, self.prediction_type
        )
        if self.config.clip_sample:
            pred_original_sample = pred_original_sample.clamp(-1, 1)
        # 3. z ~ N(0, I), drawn as upstream draws it (also used for the known part)
        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                             dtype=model_output.dtype)
        variance = (1 - alpha_prod_t_prev) / beta_prod_t * (1 - alpha_prod_t / alpha_prod_t_prev)
        std_dev_t = self.eta * variance**0.5
        # 4. the unknown region: the DDIM update (noise only where t > 0 and eta > 0, as upstream)
        pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * pred_epsilon
        prev_unknown_part = alpha_prod_t_prev**0.5 * pred_original_sample + pred_sample_direction
        if t > 0 and self.eta > 0:
            prev_unknown_part = prev_unknown_part + std_dev_t * noise
        # 5. the known region: the original image noised to t'
        prev_known_part = alpha_prod_t_prev**0.5 * original_image + (1 - alpha_prod_t_prev) ** 0.5 * noise
        # 6. x_{t'}: known where the mask keeps the original
        prev_sample = mask * prev_known_part + (1.0 - mask) * prev_unknown_part
        if not return_dict:
            return prev_sample, pred_original_sample
        return RePaintSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def undo_step(self, sample: torch.Tensor, timestep: int | torch.Tensor, generator=None) -> torch.Tensor:
        """A jump back: x_{t'} -> x_t ~ q(x_t | x_{t'}), from the level below `timestep` up to it, in one draw.

        Examples:
            ```py
            >>> sched = ExactRePaintScheduler(num_train_timesteps=300)
            >>> sched.set_timesteps(7)
            >>> sched.undo_step(torch.zeros(1, 1, 8, 8), sched.levels[3]).std() > 0
            tensor(True)
            ```
        """
        t = int(timestep)
        alpha = self.alphas_cumprod[t] / self._alpha_prod_prev(t)  # prod of (1 - beta) over the levels crossed
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        return alpha**0.5 * sample + (1 - alpha) ** 0.5 * noise


@dataclass(frozen=True)
class NamedSampler:
    """A sampler by name: a scheduler class, and the config keys it sets over the model's saved (training) config.

    The keys go to `from_config` as keywords, because `from_config` drops every key a config lists in
    `_use_default_values` (those an in-memory scheduler never set), so an edited dict would be half ignored.
    """

    scheduler_class: type[SchedulerMixin]
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def from_config(self, config: Mapping[str, Any]) -> SchedulerMixin:
        """A fresh scheduler of this kind for the noise schedule in `config` (a model's saved scheduler config).

        Examples:
            ```py
            >>> sched = SAMPLERS["ddim-trailing"].from_config(DDPMScheduler().config)
            >>> sched.set_timesteps(4)
            >>> sched.timesteps.tolist()
            [999, 749, 499, 249]
            ```
        """
        return self.scheduler_class.from_config(config, **self.overrides)

    @property
    def uses_eta(self) -> bool:
        """Whether the call's `eta` (DDIM's noise weight) changes what this sampler draws."""
        return issubclass(self.scheduler_class, DDIMScheduler)


_DPM_SOLVER_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2, "timestep_spacing": "linspace"}
# The samplers `PunkDiffPipeline` runs by name (`pipe(sampler=...)`, `punkdiff sample --scheduler ...`). DPM-Solver++
# and UniPC always start at t = T - 1 (diffusers' own "linspace" spacing for them, whatever the saved config says).
SAMPLERS: dict[str, NamedSampler] = {
    # ancestral DDPM (Ho et al. 2020); by default every training step
    "ddpm": NamedSampler(ExactDDPMScheduler),
    # DDIM (Song et al. 2021) with the saved config's spacing; eta from 0 (deterministic) to 1 (DDPM-like)
    "ddim": NamedSampler(ExactDDIMScheduler),
    # DDIM from t = T - 1 (Lin et al. 2024): the few-step choice, and a distilled student's sampler
    "ddim-trailing": NamedSampler(ExactDDIMScheduler, {"timestep_spacing": "trailing"}),
    # DPM-Solver++ 2M (Lu et al. 2022), with the noise levels of Karras et al. 2022 or without
    "dpm++": NamedSampler(DPMSolverMultistepScheduler, _DPM_SOLVER_2M),
    "dpm++-karras": NamedSampler(DPMSolverMultistepScheduler, {**_DPM_SOLVER_2M, "use_karras_sigmas": True}),
    # UniPC of order 2 (Zhao et al. 2023), with Karras et al. 2022 noise levels or without
    "unipc": NamedSampler(UniPCMultistepScheduler, {"timestep_spacing": "linspace"}),
    "unipc-karras": NamedSampler(UniPCMultistepScheduler, {"timestep_spacing": "linspace", "use_karras_sigmas": True}),
}
# What `sampler=None` runs for a saved stock scheduler (and no recommendation): the exact version of its class.
_EXACT = {DDPMScheduler: ExactDDPMScheduler, DDIMScheduler: ExactDDIMScheduler}


@dataclass(frozen=True)
class SamplingConfig:
    """How a model is meant to be sampled, saved beside it as `sampling.json` and used by calls that leave it out.

    Args:
        sampler: A name in `SAMPLERS`.
        num_inference_steps: Steps (network evaluations) per image.
        eta: DDIM's noise weight, in [0, 1] (0 deterministic, 1 DDPM-like).
        distilled_steps: For a distilled student, the step count it was trained to sample in; other counts warn.

    Examples:
        ```py
        >>> SamplingConfig.from_dict({"sampler": "ddim", "num_inference_steps": 50, "eta": 1.0})
        SamplingConfig(sampler='ddim', num_inference_steps=50, eta=1.0, distilled_steps=None)
        >>> SamplingConfig("ddim", 50, 1.0).fill("dpm++", None, None)  # another sampler keeps its own defaults
        ('dpm++', None, None)
        ```
    """

    sampler: str
    num_inference_steps: int
    eta: float = 0.0
    distilled_steps: int | None = None

    @classmethod
    def from_dict(cls, data: object) -> SamplingConfig:
        """Check a `sampling.json` object; `ValueError` names each wrong field and what it must be."""
        if not isinstance(data, dict):
            raise ValueError('must hold a JSON object, e.g. {"sampler": "ddim", "num_inference_steps": 50, "eta": 1}')

        def count(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        known = {"sampler", "num_inference_steps", "eta", "distilled_steps"}
        problems = [f"unknown key {key!r} (known: {', '.join(sorted(known))})" for key in sorted(set(data) - known)]
        if not (isinstance(data.get("sampler"), str) and data["sampler"] in SAMPLERS):
            problems.append(f"sampler must be one of {', '.join(SAMPLERS)}, got {data.get('sampler')!r}")
        if not count(data.get("num_inference_steps")):
            problems.append(f"num_inference_steps must be a positive integer, got {data.get('num_inference_steps')!r}")
        eta = data.get("eta", 0.0)
        if not (isinstance(eta, (int, float)) and not isinstance(eta, bool) and math.isfinite(eta) and 0 <= eta <= 1):
            problems.append(f"eta must be a number in [0, 1], got {eta!r}")
        if data.get("distilled_steps") is not None and not count(data["distilled_steps"]):
            problems.append(f"distilled_steps must be a positive integer, got {data['distilled_steps']!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return cls(data["sampler"], data["num_inference_steps"], float(eta), data.get("distilled_steps"))

    def fill(
        self, sampler: str | SchedulerMixin | None, num_inference_steps: int | None, eta: float | None
    ) -> tuple[str | SchedulerMixin, int | None, float | None]:
        """A call's sampler, steps and eta, with those left `None` taken from this recommendation.

        Steps and eta were chosen with the sampler, so they are filled only when the call samples with the
        recommended sampler (or leaves it out); another sampler keeps its own defaults.
        """
        if sampler is not None and not (isinstance(sampler, str) and sampler.lower() == self.sampler):
            return sampler, num_inference_steps, eta
        return (
            self.sampler,
            self.num_inference_steps if num_inference_steps is None else num_inference_steps,
            self.eta if eta is None else eta,
        )


def read_sampling_config(path: str | os.PathLike[str]) -> SamplingConfig:
    """A `sampling.json` -> `SamplingConfig`; `ValueError` (with the path) if it is not one."""
    try:
        return SamplingConfig.from_dict(json.loads(Path(path).read_text()))
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: {err}") from err


def write_sampling_config(path: str | os.PathLike[str], config: SamplingConfig) -> None:
    """Write `config` as `sampling.json`, the form `read_sampling_config` reads (no `distilled_steps` if None)."""
    data = {k: v for k, v in asdict(config).items() if v is not None}
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


@dataclass
class PunkDiffPipelineOutput(ImagePipelineOutput):
    """Images, plus, with `return_trajectory=True`, x_t and the predicted x_0 after every step (for GIFs).

    Args:
        images: The final images as PIL images, a `(B, H, W, C)` array or a `(B, C, H, W)` tensor in [0, 1].
        trajectory: One entry per denoising step, each a batch of x_t in the same `output_type` as `images`.
        pred_original_samples: One entry per step, each a batch of the predicted x_0 at that step.
    """

    trajectory: list[Any] | None = None
    pred_original_samples: list[Any] | None = None


class PunkDiffPipeline(DiffusionPipeline):
    r"""Pipeline for unconditional image generation, reconstruction and inpainting with one DDPM-trained UNet.

    The sampler is chosen per call (a name in `SAMPLERS`: `"ddpm"`, `"ddim"`, `"ddim-trailing"`, `"dpm++"`,
    `"dpm++-karras"`, `"unipc"`, `"unipc-karras"`; or a scheduler instance) and built with `from_config` from the
    saved scheduler, so a call never changes `self.scheduler` or its config. DDPM and DDIM use
    [`ExactDDPMScheduler`] and [`ExactDDIMScheduler`], which give the reference result for every
    `timestep_spacing`; a saved stock `DDPMScheduler`/`DDIMScheduler` runs as its exact version too.

    A model saved with a `sampling.json` (`SamplingConfig`, in `self.sampling_config`) says how it is meant to be
    sampled: a call that leaves out the sampler, steps or eta takes them from it. A distilled student records
    the step count it was distilled for, and sampling it at another count warns.

    Pixel art (CryptoPunks) is drawn from a small palette, which a denoiser only approximates: a pipeline with a
    `palette` (uint8 `[P, C]`, the training images' colours, saved beside the model as `palette.json`) snaps
    every pixel of its final images to the nearest palette colour, unless a call passes `snap_to_palette=False`.

    Args:
        unet ([`UNet2DModel`]): The denoiser, trained in [-1, 1] pixel space with 1 (grayscale) or 3 channels.
        scheduler ([`SchedulerMixin`]): The training noise schedule, usually a [`DDPMScheduler`].

    Examples:
        ```py
        >>> from diffusers import DDPMScheduler, UNet2DModel
        >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        ...                    norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
        ...                    up_block_types=("UpBlock2D",) * 2)
        >>> pipe = PunkDiffPipeline(unet=unet, scheduler=DDPMScheduler())
        >>> pipe(batch_size=2, sampler="ddim", num_inference_steps=5).images[0].size
        (8, 8)
        ```
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents", "pred_original_sample"]

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        grayscale = unet is not None and unet.config.in_channels == 1
        # No resizing: the model works at its own resolution, and a wrong-sized input is an error, not a guess.
        self.image_processor = VaeImageProcessor(
            vae_scale_factor=1, do_resize=False, do_convert_rgb=not grayscale, do_convert_grayscale=grayscale
        )
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=1, do_resize=False, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )
        self.palette: torch.Tensor | None = None
        self.sampling_config: SamplingConfig | None = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], **kwargs: Any) -> PunkDiffPipeline:
        """diffusers' `from_pretrained`, plus the folder's `palette.json` (pixel art) and `sampling.json`, if any."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        path = _optional_file(pretrained_model_name_or_path, PALETTE_FILE, kwargs.get("revision"))
        if path is not None:
            pipe.palette = read_palette(path)
        path = _optional_file(pretrained_model_name_or_path, SAMPLING_FILE, kwargs.get("revision"))
        if path is not None:
            pipe.sampling_config = read_sampling_config(path)
        return pipe

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: Generator = None,
        num_inference_steps: int | None = None,
        eta: float | None = None,
        sampler: str | SchedulerMixin | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        return_trajectory: bool = False,
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        snap_to_palette: bool = True,
    ) -> PunkDiffPipelineOutput | tuple:
        r"""Sample images from pure noise.

        Args:
            batch_size: Number of images.
            generator: One `torch.Generator`, or a list with one per image; with a list, image i depends only on
                `generator[i]`, so it is the same whatever the batch size.
            num_inference_steps: Denoising steps (network evaluations); `None` means the model's recommended
                count (`sampling_config`) when sampling with its recommended sampler, else every training step for
                DDPM and 50 otherwise.
            eta: DDIM noise weight (0 is deterministic DDIM, 1 is DDPM-like); ignored by other samplers. `None`
                means the recommended eta with the recommended sampler, else 0.
            sampler: A name in `SAMPLERS` (`"ddpm"`, `"ddim"`, `"ddim-trailing"`, `"dpm++"`, `"dpm++-karras"`,
                `"unipc"`, `"unipc-karras"`), a scheduler instance, or `None` for the model's recommended sampler
                (`sampling_config`), else the saved scheduler's class. It is built from the saved scheduler's
                config for this call only.
            output_type: `"pil"`, `"np"` or `"pt"`; arrays and tensors are in [0, 1].
            return_dict: Return a [`PunkDiffPipelineOutput`] rather than a tuple.
            return_trajectory: Also return x_t and the predicted x_0 after each step.
            callback_on_step_end: Called as `callback(pipe, step_index, timestep, callback_kwargs)` after each
                step, like other diffusers pipelines; a `"latents"` entry in the returned dict replaces x_t.
            callback_on_step_end_tensor_inputs: Which of `"latents"` and `"pred_original_sample"` go into
                `callback_kwargs` (default `["latents"]`).
            snap_to_palette: Snap the final images to `self.palette` when the pipeline has one (pixel art).

        Examples:
            ```py
            >>> pipe = PunkDiffPipeline.from_pretrained("path/to/export")
            >>> generator = [torch.Generator().manual_seed(i) for i in range(4)]
            >>> images = pipe(batch_size=4, generator=generator, sampler="ddim", num_inference_steps=50).images
            >>> images = pipe(batch_size=4, generator=generator).images  # as the model's sampling.json says
            >>> images = pipe(batch_size=4, sampler="dpm++-karras", num_inference_steps=10).images
            ```
        """
        # 1. check the inputs, and build this call's sampler from the saved config
        self._check_generator(generator, batch_size)
        sampler, num_inference_steps, eta = self._recommended(sampler, num_inference_steps, eta)
        sched = self._make_sampler(sampler)
        sched.set_timesteps(self._default_steps(sched, num_inference_steps))
        # 2. x_T ~ N(0, I), scaled as the sampler expects
        latents = randn_tensor(
            self._image_shape(batch_size), generator=generator, device=self._execution_device, dtype=self.unet.dtype
        )
        latents = latents * sched.init_noise_sigma
        # 3. denoise from x_T to x_0
        return self._denoise(
            sched, sched.timesteps, latents, generator=generator, eta=eta, output_type=output_type,
            return_dict=return_dict, return_trajectory=return_trajectory, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, snap_to_palette=snap_to_palette,
        )

    @torch.no_grad()
    def reconstruct(
        self,
        image: ImageInput,
        t_start: int,
        generator: Generator = None,
        num_inference_steps: int | None = None,
        eta: float = 0.0,
        sampler: str | SchedulerMixin | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        return_trajectory: bool = False,
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        snap_to_palette: bool = True,
    ) -> PunkDiffPipelineOutput | tuple:
        r"""Noise `image` to timestep `t_start` with the forward process, then denoise it back to t = 0.

        Comparing the result with the input (MSE, SSIM) as a function of `t_start` shows how much of an image the
        model can recover from a given noise level. The image is noised to the largest scheduled timestep that is
        not above `t_start` (exactly `t_start` for full-length DDPM). Unlike `__call__`, it does not use the
        model's recommended sampling: `sampler=None` is the saved scheduler's class, and eta is 0 unless given.

        Args:
            image: Images in [0, 1] at the model's resolution (PIL, `(B, H, W, C)` array or `(B, C, H, W)` tensor).
            t_start: Training timestep to noise to, in `[0, num_train_timesteps)`.
            generator: As in `__call__`; draws the forward noise first, then the sampler's noise.
            Other arguments: As in `__call__`.

        Examples:
            ```py
            >>> digit = PIL.Image.open("digit.png")  # at the model's resolution
            >>> pipe.reconstruct(digit, t_start=300, sampler="ddim", num_inference_steps=50).images[0]
            ```
        """
        # 1. check the inputs
        original = self._preprocess(image)
        self._check_generator(generator, original.shape[0])
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        if not 0 <= t_start < num_train_timesteps:
            raise ValueError(f"`t_start` must be in [0, {num_train_timesteps}), got {t_start}.")
        # 2. the sampler's timesteps from the largest one <= t_start
        sched = self._make_sampler(sampler)
        sched.set_timesteps(self._default_steps(sched, num_inference_steps))
        begin = int((sched.timesteps > t_start).sum())
        if begin == len(sched.timesteps):
            raise ValueError(f"No scheduled timestep is <= t_start={t_start}; use more inference steps.")
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(begin)
        timesteps = sched.timesteps[begin:]
        # 3. x_t ~ q(x_t | x_0), the forward process
        noise = randn_tensor(original.shape, generator=generator, device=original.device, dtype=original.dtype)
        latents = sched.add_noise(original, noise, timesteps[:1])
        # 4. denoise from x_t to x_0
        return self._denoise(
            sched, timesteps, latents, generator=generator, eta=eta, output_type=output_type,
            return_dict=return_dict, return_trajectory=return_trajectory, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, snap_to_palette=snap_to_palette,
        )

    @torch.no_grad()
    def inpaint(
        self,
        image: ImageInput,
        mask: ImageInput,
        num_inference_steps: int = 250,
        jump_length: int = 10,
        jump_n_sample: int = 10,
        eta: float = 0.0,
        generator: Generator = None,
        output_type: str = "pil",
        return_dict: bool = True,
        snap_to_palette: bool = True,
    ) -> PunkDiffPipelineOutput | tuple:
        r"""Fill the masked region of `image` with the unconditional model (RePaint, Lugmayr et al. 2022).

        Uses [`ExactRePaintScheduler`] (diffusers' RePaint, starting at t = T - 1 for any step count): at each step
        the known region is the forward-noised original and the masked region comes from the model; jumping back
        `jump_length` steps `jump_n_sample` times lets the two harmonise. At the last step the known region is the
        original image exactly. Unlike diffusers' `RePaintPipeline`, a list of generators is used per image
        throughout, not just for the initial noise.

        Args:
            image: Images in [0, 1] at the model's resolution.
            mask: Same size; 1 (white) marks the pixels to generate, 0 (black) those to keep, as in diffusers'
                inpainting pipelines. Binarised at 0.5; one mask may serve a whole batch.
            num_inference_steps: Denoising steps before resampling jumps.
            jump_length: Steps to go back in time per jump ("j" in the paper).
            jump_n_sample: How many times each jump is repeated ("r" in the paper).
            eta: DDIM-style noise weight of the RePaint step (0 deterministic, 1 DDPM-like).
            generator, output_type, return_dict, snap_to_palette: As in `__call__`.

        Examples:
            ```py
            >>> punk = PIL.Image.open("punk.png")  # 24x24, composited on the training background
            >>> hat = PIL.Image.new("L", punk.size, 0)
            >>> hat.paste(255, (4, 0, 20, 8))  # white: regenerate the top rows
            >>> pipe.inpaint(punk, hat, num_inference_steps=100, generator=torch.Generator().manual_seed(0)).images[0]
            ```
        """
        # 1. check the inputs; the mask becomes "known" = 1 where the original is kept
        prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"RePaint inpainting needs an epsilon- or v-prediction model, not {prediction_type!r}.")
        original = self._preprocess(image)
        self._check_generator(generator, original.shape[0])
        known = 1.0 - self.mask_processor.preprocess(mask).to(original.device, original.dtype)
        # 2. the RePaint schedule from t = T - 1, with its jumps back in time
        sched = ExactRePaintScheduler.from_config(self.scheduler.config, eta=eta)
        sched.use_schedule_of(self.scheduler)
        sched.set_timesteps(num_inference_steps, jump_length, jump_n_sample)
        # 3. x_T ~ N(0, I)
        latents = randn_tensor(original.shape, generator=generator, device=original.device, dtype=original.dtype)
        # 4. walk the schedule: a lower t denoises (known region re-noised from the original), a higher t
        #    re-noises the sample (a jump back)
        t_last = sched.timesteps[0] + 1
        for t in self.progress_bar(sched.timesteps):
            if t < t_last:
                model_output = self.unet(latents, t).sample
                latents = sched.step(model_output, t, latents, original, known, generator).prev_sample
            else:
                latents = sched.undo_step(latents, t_last, generator)
            t_last = t
        # 5. to images
        images = self._postprocess(latents, output_type, snap_to_palette)
        self.maybe_free_model_hooks()
        return PunkDiffPipelineOutput(images=images) if return_dict else (images,)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        safe_serialization: bool = True,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        """Save like any diffusers pipeline (safetensors by default), loadable by stock diffusers.

        `model_index.json` names the stock `DDPMPipeline`, so `DiffusionPipeline.from_pretrained(folder)` works
        without running code shipped with the model, and this file is saved beside it as `pipeline.py`, so
        `DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)` gives a
        `PunkDiffPipeline` to a user without punkdiff installed. A pixel-art model's palette is saved as
        `palette.json`, and a recommended sampling (`sampling_config`) as `sampling.json`. `push_to_hub=True`
        (with diffusers' `repo_id`, `private`, `token`, `commit_message`, `create_pr`) uploads the finished folder
        with diffusers' own Hub code and model card.

        Examples:
            ```py
            >>> pipe.save_pretrained("my-model")
            >>> DDPMPipeline.from_pretrained("my-model")  # stock diffusers, no remote code
            ```
        """
        if "model_card" in kwargs:  # diffusers would drop it silently
            raise TypeError(
                "save_pretrained writes no model card; add punkdiff's to the saved folder with "
                "`punkdiff.hub.write_model_card(folder, info)`, or export with `punkdiff.hub.export_pipeline`."
            )
        push_kwargs = {k: kwargs.pop(k) for k in _PUSH_KWARGS if k in kwargs}
        # 1. diffusers' own save; its push would upload before steps 2 and 3, so it comes last
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, **kwargs)
        # 2. stock metadata: any diffusers install loads the folder as a DDPMPipeline
        index = Path(save_directory) / "model_index.json"
        config = json.loads(index.read_text())
        config["_class_name"] = "DDPMPipeline"
        index.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        # 3. this file, for the opt-in custom-pipeline route, a pixel-art model's palette, the recommended sampling
        shutil.copyfile(__file__, Path(save_directory) / CUSTOM_PIPELINE_FILE)
        if self.palette is not None:
            write_palette(Path(save_directory) / PALETTE_FILE, self.palette)
        if self.sampling_config is not None:
            write_sampling_config(Path(save_directory) / SAMPLING_FILE, self.sampling_config)
        # 4. diffusers' push, as its `save_pretrained(push_to_hub=True)` does it, of the finished folder
        if push_to_hub:
            self._push_folder(save_directory, **push_kwargs)

    def _denoise(
        self,
        sched: SchedulerMixin,
        timesteps: torch.Tensor,
        latents: torch.Tensor,
        *,
        generator: Generator,
        eta: float,
        output_type: str,
        return_dict: bool,
        return_trajectory: bool,
        callback_on_step_end: StepCallback | None,
        callback_on_step_end_tensor_inputs: list[str] | None,
        snap_to_palette: bool,
    ) -> PunkDiffPipelineOutput | tuple:
        """The reverse process shared by sampling and reconstruction: x_t at `timesteps[0]` -> images."""
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        unknown = set(tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs must be in {self._callback_tensor_inputs}.")
        step_kwargs = _extra_step_kwargs(sched, generator=generator, eta=eta)
        need_x0 = return_trajectory or "pred_original_sample" in tensor_inputs
        trajectory, pred_x0s = [], []
        # the UNet's timesteps copied to the device once, not once per step (CUDA graphs also need device inputs);
        # the sampler keeps the host ones, so it never reads a device value back
        unet_timesteps = timesteps.to(latents.device)
        for i, t in enumerate(self.progress_bar(timesteps)):
            # 1. the model's output at (x_t, t)
            model_input = sched.scale_model_input(latents, t)
            model_output = self.unet(model_input, unet_timesteps[i]).sample
            # 2. x_t -> x_{t'}: one sampler step
            out = sched.step(model_output, t, latents, **step_kwargs)
            latents = out.prev_sample
            # 3. the predicted x_0, where someone looks at it
            pred_original_sample = None
            if need_x0:
                pred_original_sample = getattr(out, "pred_original_sample", None)
                if pred_original_sample is None:  # e.g. DPM-Solver does not report x_0
                    pred_original_sample = _predict_x0(sched, model_output, t, model_input)
            # 4. the step callback, which may replace x_{t'}
            if callback_on_step_end is not None:
                local = {"latents": latents, "pred_original_sample": pred_original_sample}
                callback_outputs = callback_on_step_end(self, i, t, {k: local[k] for k in tensor_inputs})
                latents = callback_outputs.pop("latents", latents)
            if return_trajectory:
                trajectory.append(self.image_processor.postprocess(latents, output_type))
                pred_x0s.append(self.image_processor.postprocess(pred_original_sample, output_type))
        images = self._postprocess(latents, output_type, snap_to_palette)
        self.maybe_free_model_hooks()
        output = PunkDiffPipelineOutput(
            images=images,
            trajectory=trajectory if return_trajectory else None,
            pred_original_samples=pred_x0s if return_trajectory else None,
        )
        return output if return_dict else output.to_tuple()

    def _postprocess(self, latents: torch.Tensor, output_type: str, snap: bool) -> Any:
        """Model-space images in [-1, 1] -> `output_type`, snapped to the palette first where there is one."""
        if snap and self.palette is not None:
            colours = self.palette.to(latents.device, latents.dtype) / 127.5 - 1
            latents = nearest_colour(latents, colours)
        return self.image_processor.postprocess(latents, output_type)

    def _make_sampler(self, sampler: str | SchedulerMixin | None) -> SchedulerMixin:
        """A fresh scheduler for one call, so `self.scheduler` (what gets saved) is never mutated."""
        if isinstance(sampler, SchedulerMixin):
            return sampler
        if sampler is None:
            cls = _EXACT.get(type(self.scheduler), type(self.scheduler))
            return cls.from_config(self.scheduler.config)
        if sampler.lower() not in SAMPLERS:
            raise ValueError(f"Unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")
        return SAMPLERS[sampler.lower()].from_config(self.scheduler.config)

    def _default_steps(self, sched: SchedulerMixin, num_inference_steps: int | None) -> int:
        """The call's step count (every training step for DDPM, else 50), warning when a student is sampled at
        another count than it was distilled for."""
        if num_inference_steps is None:
            num_inference_steps = sched.config.num_train_timesteps if isinstance(sched, DDPMScheduler) else 50
        distilled = self.sampling_config.distilled_steps if self.sampling_config is not None else None
        if distilled is not None and num_inference_steps != distilled:
            warnings.warn(
                f"This model was distilled to sample in {distilled} steps ({self.sampling_config.sampler}); its "
                f"quality is only guaranteed there, and this call asks for {num_inference_steps}.",
                UserWarning,
                stacklevel=2,
            )
        return num_inference_steps

    def _recommended(
        self, sampler: str | SchedulerMixin | None, num_inference_steps: int | None, eta: float | None
    ) -> tuple[str | SchedulerMixin | None, int | None, float]:
        """A call's sampler, steps and eta, those left `None` taken from `sampling_config` (eta 0 without one)."""
        if self.sampling_config is not None:
            sampler, num_inference_steps, eta = self.sampling_config.fill(sampler, num_inference_steps, eta)
        return sampler, num_inference_steps, 0.0 if eta is None else eta

    def _image_shape(self, batch_size: int) -> tuple[int, ...]:
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, self.unet.config.in_channels, *size)

    def _preprocess(self, image: ImageInput) -> torch.Tensor:
        """Images in [0, 1] (any diffusers format) -> model-space tensor in [-1, 1], checked against the UNet."""
        x = self.image_processor.preprocess(image).to(self._execution_device, self.unet.dtype)
        expected = self._image_shape(x.shape[0])
        if tuple(x.shape) != expected:
            raise ValueError(f"Expected images of shape {expected[1:]} (C, H, W), got {tuple(x.shape[1:])}.")
        return x

    @staticmethod
    def _check_generator(generator: Generator, batch_size: int) -> None:
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for a batch of {batch_size}; pass one per image.")

    def _push_folder(
        self,
        folder: str | os.PathLike[str],
        repo_id: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
    ) -> None:
        """diffusers' `save_pretrained(push_to_hub=True)` upload: the repo, diffusers' model card, one commit."""
        repo_id = create_repo(repo_id or Path(folder).name, exist_ok=True, private=private, token=token).repo_id
        model_card = populate_model_card(load_or_create_model_card(repo_id, token=token, is_pipeline=True))
        model_card.save(Path(folder) / "README.md")
        self._upload_folder(folder, repo_id, token=token, commit_message=commit_message, create_pr=create_pr)


def _optional_file(model: str | os.PathLike[str], name: str, revision: str | None) -> Path | None:
    """The model's file `name` (e.g. `palette.json`): in a local folder, or fetched from a Hub repo (None if absent)."""
    if Path(model).is_dir():
        path = Path(model) / name
        return path if path.is_file() else None
    try:
        return Path(hf_hub_download(str(model), name, revision=revision))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None


def _extra_step_kwargs(sched: SchedulerMixin, **kwargs: Any) -> dict[str, Any]:
    """Those of `kwargs` (`generator`, `eta`) that `sched.step` takes: UniPC takes neither, only DDIM takes eta.

    diffusers' pipelines do the same in `prepare_extra_step_kwargs`.
    """
    accepted = inspect.signature(sched.step).parameters
    return {name: value for name, value in kwargs.items() if name in accepted}


def _predict_x0(sched: SchedulerMixin, model_output: torch.Tensor, t: torch.Tensor, sample: torch.Tensor):
    """x_0 implied by the model output at timestep t, for schedulers whose step does not return it."""
    alpha_prod_t = sched.alphas_cumprod[int(t)].to(sample.device, sample.dtype)
    return predicted_x0_and_epsilon(model_output, sample, alpha_prod_t, sched.config.prediction_type)[0]
