"""What the loop optimizes: the UNet, its noise schedule, AdamW, the LR schedule and the EMA, prepared by Accelerate.

Accelerate prepares everything (and saves and restores it with each checkpoint); the loop steps the plainest object
that does the same work. `unet` and `parameters` are the underlying module and its parameter list, taken once, so
the per-step EMA update and gradient clipping do not walk the module tree again. Where Accelerate's optimizer and
clipping wrappers would only call through (one process or DDP, no fp16 loss scaler), the loop calls AdamW and
`torch.nn.utils.clip_grad_norm_` itself, once per optimizer step: the same arithmetic on the same tensors, without
the wrappers' per-call look-ups (an installed-package probe per step, a signature inspection per `zero_grad`, a walk
over every gradient looking for sharded ones).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from punkdiff.conditions import ConditionVocabulary
from punkdiff.pipelines.punkdiff_pipeline import AttributeEncoder
from punkdiff.presets import Preset
from punkdiff.training.checkpoints import ENCODER_EMA_FOLDER, register_ema_hooks
from punkdiff.training.conditioning import TrainingCondition, build_attribute_encoder
from punkdiff.training.speed import build_optimizer

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass
class Trainables:
    """The prepared model, optimizer and LR schedule, the forward the loss calls, the EMA, and the run's length."""

    model: torch.nn.Module  # as prepared (DDP on several processes)
    unet: UNet2DModel  # the module itself: EMA, previews, checkpoints and the export use it
    parameters: list[torch.nn.Parameter]
    train_forward: Callable[..., Any]  # `model`, or its compiled forward (`--compile`)
    noise_scheduler: DDPMScheduler
    optimizer: torch.optim.Optimizer  # stepped once per optimizer step: AdamW itself, or Accelerate's wrapper
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler  # Accelerate's: stepped every micro-batch
    ema: EMAModel | None
    clip_grad_norm_: Callable[..., torch.Tensor]
    max_steps: int
    num_epochs: int
    condition: TrainingCondition | None = None  # a conditional run's vocabulary, attribute encoder and its EMA

    def step_ema(self) -> None:
        """One EMA update per optimizer step: the UNet's, and the attribute encoder's."""
        if self.ema is not None:
            self.ema.step(self.unet.parameters() if self.condition else self.parameters)
        if self.condition is not None and self.condition.ema is not None:
            self.condition.ema.step(self.condition.attribute_encoder.parameters())


def build_trainables(preset: Preset, accelerator: Accelerator, updates_per_epoch: int,
                     initial_unet: UNet2DModel | None = None, channels_last: bool = False,
                     compile_backend: str | None = None, vocabulary: ConditionVocabulary | None = None) -> Trainables:
    """The preset's UNet (or `initial_unet`), noise schedule, AdamW, LR schedule and EMA, prepared for `accelerator`.

    A conditional run (`vocabulary`) gets the UNet's class embedding from `vocabulary.unet_kwargs()` and, for
    multi-hot conditions, an attribute encoder trained with it: one optimizer, one gradient clip, an EMA of each.

    Examples:
        ```py
        >>> parts = build_trainables(preset, accelerator, updates_per_epoch=78)
        >>> parts.max_steps == preset.train.max_steps or preset.train.epochs * 78
        True
        ```
    """
    train_spec = preset.train
    model = initial_unet or UNet2DModel(**preset.model.unet_config(), **(vocabulary.unet_kwargs() if vocabulary
                                                                          else {}))
    if channels_last:
        model.to(memory_format=torch.channels_last)
    noise_scheduler = DDPMScheduler(**preset.scheduler.ddpm_config())
    encoder = build_attribute_encoder(vocabulary, preset.model.block_out_channels)
    trained = [*model.parameters(), *(encoder.parameters() if encoder is not None else ())]
    optimizer = build_optimizer(trained, train_spec, accelerator.device)  # fused on CUDA
    max_steps = train_spec.max_steps or train_spec.epochs * updates_per_epoch
    # the prepared scheduler advances once per process per optimizer step, so its length is in
    # optimizer steps x processes (never in data-loader batches)
    lr_scheduler = get_scheduler(
        train_spec.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=train_spec.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    if encoder is not None:  # prepared after the UNet: Accelerate's model_1, checkpointed beside it
        model, encoder, optimizer, lr_scheduler = accelerator.prepare(model, encoder, optimizer, lr_scheduler)
    else:
        model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    unet = accelerator.unwrap_model(model)
    # --compile compiles the training forward only: EMA, previews, checkpoints and the export keep the eager module
    train_forward = torch.compile(model, backend=compile_backend) if compile_backend else model
    ema = None
    if train_spec.use_ema:
        ema = EMAModel(
            unet.parameters(),
            decay=train_spec.ema_decay,
            use_ema_warmup=train_spec.ema_warmup,
            inv_gamma=train_spec.ema_inv_gamma,
            power=train_spec.ema_power,
            model_cls=UNet2DModel,
            model_config=unet.config,
            foreach=True,  # one kernel per operation for all parameters, not one per parameter
        )
        ema.to(accelerator.device)
        register_ema_hooks(accelerator, ema)
    condition = None
    if vocabulary is not None:
        attribute_encoder = accelerator.unwrap_model(encoder) if encoder is not None else None
        encoder_ema = None
        if ema is not None and attribute_encoder is not None:
            encoder_ema = EMAModel(attribute_encoder.parameters(), decay=train_spec.ema_decay,
                                   use_ema_warmup=train_spec.ema_warmup, inv_gamma=train_spec.ema_inv_gamma,
                                   power=train_spec.ema_power, model_cls=AttributeEncoder,
                                   model_config=attribute_encoder.config, foreach=True)
            encoder_ema.to(accelerator.device)
            register_ema_hooks(accelerator, encoder_ema, ENCODER_EMA_FOLDER, model_index=1)
        condition = TrainingCondition(vocabulary, encoder, attribute_encoder, encoder_ema)
    plain = wrappers_only_call_through(accelerator)
    return Trainables(
        model=model, unet=unet, condition=condition, train_forward=train_forward,
        parameters=list(unet.parameters()) + (list(condition.attribute_encoder.parameters())
                                              if condition and condition.attribute_encoder else []),
        noise_scheduler=noise_scheduler, optimizer=optimizer.optimizer if plain else optimizer,
        lr_scheduler=lr_scheduler, ema=ema,
        clip_grad_norm_=torch.nn.utils.clip_grad_norm_ if plain else accelerator.clip_grad_norm_,
        max_steps=max_steps, num_epochs=math.ceil(max_steps / updates_per_epoch),
    )


def wrappers_only_call_through(accelerator: Accelerator) -> bool:
    """Whether Accelerate's optimizer step, `zero_grad` and `clip_grad_norm_`, called once per optimizer step, only
    call AdamW's and torch's: one process or DDP (gradients already all-reduced by `backward`) and no fp16 loss
    scaler to unscale. FSDP, DeepSpeed, XLA and fp16 keep the wrappers. Either way the clipped norm stays a device
    tensor (no host synchronisation)."""
    from accelerate.utils import DistributedType

    plain = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    return accelerator.scaler is None and accelerator.distributed_type in plain
