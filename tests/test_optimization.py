"""What the loop optimizes (`punkdiff.training.optimization`): prepared by Accelerate, stepped plainly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from punkdiff.presets import apply_overrides, get_preset
from punkdiff.training.optimization import build_trainables, wrappers_only_call_through

TINY = {"model": {"block_out_channels": (8, 16), "norm_num_groups": 4}, "train": {"max_steps": 3, "batch_size": 4}}


def _steps(plain: bool, gradient_accumulation_steps: int) -> dict[str, torch.Tensor]:
    """Three optimizer steps of the tiny preset, stepped through the plain parts or through Accelerate's wrappers."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=gradient_accumulation_steps)
    torch.manual_seed(0)
    preset = apply_overrides(get_preset("mnist-baseline-16"), TINY).validate()
    parts = build_trainables(preset, accelerator, updates_per_epoch=10)
    optimizer = parts.optimizer if plain else accelerator._optimizers[0]
    clip = parts.clip_grad_norm_ if plain else accelerator.clip_grad_norm_
    generator = torch.Generator().manual_seed(1)
    for _ in range(3 * gradient_accumulation_steps):
        x = torch.randn(4, 1, 16, 16, generator=generator)
        t = torch.randint(0, 1000, (4,), generator=generator)
        with accelerator.accumulate(parts.model):
            loss = F.mse_loss(parts.train_forward(x, t).sample, x)
            accelerator.backward(loss)
            if plain:
                if accelerator.sync_gradients:
                    clip(parts.parameters, 1.0)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            else:  # the diffusers example's order: every call every micro-batch, Accelerate decides
                if accelerator.sync_gradients:
                    clip(parts.model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            parts.lr_scheduler.step()
        if accelerator.sync_gradients:
            parts.ema.step(parts.parameters)
    assert parts.lr_scheduler.get_last_lr()[0] > 0
    return {**{k: v.clone() for k, v in parts.unet.state_dict().items()},
            **{f"ema.{i}": p.clone() for i, p in enumerate(parts.ema.shadow_params)},
            "lr": torch.tensor(parts.lr_scheduler.get_last_lr())}


def test_one_process_steps_adamw_and_clips_with_torch_itself(fresh_accelerate_state):
    accelerator = Accelerator(cpu=True)
    assert wrappers_only_call_through(accelerator)
    preset = apply_overrides(get_preset("mnist-baseline-16"), TINY).validate()
    parts = build_trainables(preset, accelerator, updates_per_epoch=10)
    assert type(parts.optimizer) is torch.optim.AdamW and parts.clip_grad_norm_ is torch.nn.utils.clip_grad_norm_
    assert parts.parameters == list(parts.unet.parameters()) and parts.unet is accelerator.unwrap_model(parts.model)
    assert (parts.max_steps, parts.num_epochs) == (3, 1)


def test_the_plain_parts_train_bit_identically_to_accelerates_wrappers(fresh_accelerate_state):
    from tiny_training import reset_accelerate_state

    for accumulation in (1, 2):
        plain = _steps(True, accumulation)
        reset_accelerate_state()
        wrapped = _steps(False, accumulation)
        reset_accelerate_state()
        assert plain.keys() == wrapped.keys()
        assert all(torch.equal(plain[k], wrapped[k]) for k in plain), accumulation
