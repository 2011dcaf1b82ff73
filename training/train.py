"""Train a punkdiff preset with Accelerate: the whole loop, top to bottom.

    accelerate launch training/train.py --preset mnist-baseline-16 --dataset ../shared/datasets/mnist
    accelerate launch --multi_gpu --num_processes 2 training/train.py --preset punks-32 ...
    punkdiff train ...            (same parser, same loop, one process)

What the loop calls lives in `punkdiff.training`, one module per concern (arguments, launch, batches, optimization,
resume, checkpoints, loss, step_log, progress, previews, monitor, reporting, export); the loop body itself (forward,
loss, backward, clip, step, EMA, and when to log, check, checkpoint and preview) stays here.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate.utils import set_seed
from diffusers import UNet2DModel
from tqdm.auto import tqdm

from punkdiff.data import DataError
from punkdiff.files import write_json
from punkdiff.hub import ModelFolderError
from punkdiff.interrupts import exit_on_interrupt
from punkdiff.presets import PresetError
from punkdiff.training import TrainingError
from punkdiff.training.arguments import build_train_parser, hub_model_id, resolve_training_config
from punkdiff.training.batches import load_training_data, streaming_reason
from punkdiff.training.checkpoints import (
    register_state_hooks,
    require_finite_weights,
    resume_hint,
    save_checkpoint,
)
from punkdiff.training.conditioning import batch_inputs
from punkdiff.training.ema import ema_weights_in_sync
from punkdiff.training.export import export_run, push_export
from punkdiff.training.launch import end_run, make_accelerator, warn_about_device
from punkdiff.training.loss import LossFn, diffusion_loss
from punkdiff.training.monitor import QualityMonitor
from punkdiff.training.optimization import build_trainables
from punkdiff.training.preemption import StopRequest
from punkdiff.training.previews import SampleGrids
from punkdiff.training.progress import checkpoint_state
from punkdiff.training.reporting import record_steps, run_summary, start_trackers
from punkdiff.training.resources import out_of_memory_message
from punkdiff.training.resume import prepare_start, restore_progress
from punkdiff.training.run_lock import claim_output_dir
from punkdiff.training.step_log import StepLog


def main(argv: Sequence[str] | None = None) -> int:
    args = build_train_parser().parse_args(argv)
    return exit_on_interrupt(lambda: run(args), "train", lambda: resume_hint(args.output_dir))  # Ctrl-C: 130


def run(args: argparse.Namespace, loss_fn: LossFn | None = None, start_from: UNet2DModel | None = None,
        keep_process_group: bool = False) -> int:
    """Train as `args` says (0 done, 1 failed, 2 bad input); `distill.py` runs each stage through it."""
    # ---- 1. configuration: every bad flag, preset or resume mismatch fails here, before any data -------------
    try:
        preset = resolve_training_config(args)
    except PresetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    train_spec, output_dir = preset.train, Path(args.output_dir)
    if (busy := claim_output_dir(output_dir)) is not None:  # two runs in one folder would claim one pipeline/
        print(f"error: {busy}", file=sys.stderr)
        return 2
    accelerator, precision, precision_fallback = make_accelerator(args, train_spec)  # bf16 only where native
    try:
        streaming = streaming_reason(args, preset)  # a dataset too big for the cache budget streams
        resume, initial_unet = prepare_start(args, preset, accelerator, streaming is not None, start_from)
        set_seed(args.seed, device_specific=True)  # dropout etc. differ per process, reproducibly
        # timesteps, noise, flips: our own generator, saved in each checkpoint, so a resumed run draws the same
        noise_rng = torch.Generator(accelerator.device).manual_seed(args.seed * 1000 + accelerator.process_index)

        # ---- 2. data: decoded once into the cache (main process first, so it is built once), or streamed -------
        data = load_training_data(args, preset, accelerator, streaming)
    except (DataError, TrainingError, ModelFolderError) as err:
        accelerator.print(f"error: {err}")
        return 2

    # ---- 3. model, noise schedule, optimizer, LR schedule, EMA, all prepared by Accelerate -------------------
    parts = build_trainables(preset, accelerator, data.updates_per_epoch, initial_unet, args.channels_last,
                             args.compile, data.vocabulary)  # a conditional run: class embedding, encoder
    model, optimizer, lr_scheduler, ema = parts.model, parts.optimizer, parts.lr_scheduler, parts.ema
    max_steps, num_epochs = parts.max_steps, parts.num_epochs
    if hasattr(loss_fn, "save_state"):  # a loss that learns too (distribution matching's fake denoiser)
        register_state_hooks(accelerator, loss_fn, loss_fn.state_folder)  # saved and resumed with the run

    # ---- 4. resume: the exact state of the interrupted run (weights, optimizer, RNGs, data position) ------------
    try:
        progress, resumed_from = restore_progress(args, accelerator, resume, noise_rng, data.loader, data.streaming,
                                                  max_steps, lambda: lr_scheduler.get_last_lr()[0])
        used_precision = warn_about_device(accelerator, train_spec, precision, precision_fallback)
        monitor = QualityMonitor(data.images, args.eval_images, args.seed, parts.condition) if (
            args.eval_every and accelerator.is_main_process) else None  # SWD against the cached images
    except (TrainingError, ValueError) as err:
        accelerator.print(f"error: {err}")
        return 2
    global_batch = train_spec.batch_size * accelerator.num_processes * train_spec.gradient_accumulation_steps
    start_trackers(accelerator, preset, data.num_images, global_batch, max_steps, num_epochs)
    grids = SampleGrids(accelerator, output_dir, parts.unet, ema, parts.noise_scheduler, train_spec, args.seed,
                        data.palette, parts.condition)

    # ---- 5. the loop -------------------------------------------------------------------------------------------
    progress_bar = tqdm(total=max_steps, initial=progress.global_step, desc="training", mininterval=1.0,
                        disable=not accelerator.is_local_main_process)  # redrawn at most once a second
    start, step_log = time.time(), StepLog(accelerator, args.log_every, advice=lambda: resume_hint(output_dir))
    last_grid, exit_code = None, 0
    stop = StopRequest().install()  # SIGTERM (preemption): checkpoint after the current step, then exit
    try:
        for epoch in range(progress.epoch if progress.global_step < max_steps else num_epochs, num_epochs):
            model.train()
            data.loader.set_epoch(epoch)  # the seeded shuffle of epoch e is the same in every run
            skip = progress.batches_in_epoch if epoch == progress.epoch else 0  # > 0: resumed mid-epoch
            progress.epoch, progress.batches_in_epoch = epoch, skip
            # resumed mid-epoch: a cached epoch skips the batches done in its seeded order; a stream is already there
            batches = accelerator.skip_first_batches(data.loader, skip) if skip and not data.streaming else data.loader
            for batch in batches:
                progress.batches_in_epoch += 1
                # 5.1 x_0 in [-1, 1] (flipped per image), a condition's drops, noise and timesteps from the saved
                # generator; a conditional run's forward is told the condition (and its loss weighs rare classes)
                clean, forward, loss_of = batch_inputs(batch, preset.data.random_flip, noise_rng, parts.train_forward,
                                                       loss_fn or diffusion_loss, parts.condition)
                noise = torch.randn(clean.shape, generator=noise_rng, device=clean.device)
                timesteps = torch.randint(0, parts.noise_scheduler.config.num_train_timesteps, (clean.shape[0],),
                                          generator=noise_rng, device=clean.device)
                # 5.2 loss, backward, clip, step once per accumulated batch; no device value is read back here
                with accelerator.accumulate(model):
                    loss = loss_of(forward, parts.noise_scheduler, clean, noise, timesteps, train_spec.snr_gamma)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:  # the norm stays on the device until the step log reads it
                        grad_norm = parts.clip_grad_norm_(parts.parameters, train_spec.max_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    lr_scheduler.step()  # Accelerate's: counts micro-batches, advances the LR once per step
                step_log.add_loss(loss.detach())
                progress.images_seen += clean.shape[0] * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue

                # 5.3 one optimizer step done: EMA (once per optimizer step), the step's numbers kept on the device
                parts.step_ema()
                progress.global_step += 1
                step = progress.global_step
                step_log.end_step(step, grad_norm, lr_scheduler.get_last_lr()[0], images=global_batch,
                                  **({"ema_decay": ema.cur_decay_value} if ema is not None else {}))
                progress_bar.update(1)

                # 5.4 every --log-every steps and before anything is saved: read the losses back (the one device sync)
                # and stop on a non-finite one; SIGTERM is polled each step on one process, at the reads on several
                checkpoint_due = step % train_spec.checkpoint_every == 0 or step == max_steps
                sample_due = step % train_spec.sample_every == 0 or step == max_steps
                read_due = step_log.due(step) or checkpoint_due or sample_due  # the same steps on every process
                stopping = (read_due or accelerator.num_processes == 1) and stop.requested(accelerator)
                if read_due or stopping:
                    record_steps(accelerator, step_log.read(), progress.history, progress_bar)

                # 5.5 checkpoints (never of non-finite weights) and sample grids; SIGTERM checkpoints and stops
                if checkpoint_due or stopping:
                    require_finite_weights(parts.unet, ema, step)
                    state = checkpoint_state(progress, preset, accelerator, data.loader, args.seed, data.streaming)
                    save_checkpoint(accelerator, output_dir, state, noise_rng, train_spec.checkpoints_total_limit)
                if stopping:
                    raise TrainingError(f"stopped by {stop.received.name} at step {step}; {resume_hint(output_dir)}")
                if sample_due and accelerator.is_main_process:
                    last_grid = grids(step)
                eval_due = monitor is not None and (step % args.eval_every == 0 or step == max_steps)
                if eval_due:
                    accelerator.log(monitor(parts.unet, ema, parts.noise_scheduler,
                                            train_spec.sample_inference_steps, step), step=step)
                if checkpoint_due or sample_due or eval_due:
                    step_log.restart_clock()  # images/s measures training, not checkpoints, grids or evaluations
                if progress.global_step >= max_steps:
                    break
            if progress.global_step >= max_steps:
                break
    except (TrainingError, DataError) as err:  # DataError: a streamed image that cannot be read
        accelerator.print(f"error: {err}")
        exit_code = 1
    except torch.OutOfMemoryError:
        accelerator.print("error: " + out_of_memory_message(
            str(accelerator.device), train_spec.batch_size, train_spec.gradient_accumulation_steps))
        exit_code = 1
    finally:
        stop.uninstall()
    progress_bar.close()
    ema_in_sync = ema_weights_in_sync(accelerator, ema) if ema is not None else None  # the same EMA on every process

    # ---- 6. export: EMA weights by default, the last grid, the loss curve, a summary, the Hub -----------------
    if exit_code == 0 and accelerator.is_main_process:
        last_grid = grids(progress.global_step) if last_grid is None else last_grid  # None: resumed at the end
        export_run(output_dir, preset, parts.unet, ema, parts.noise_scheduler, progress.history,
                   progress.global_step, last_grid, data.palette,
                   monitor.card_metrics() if monitor is not None else None, parts.condition)
        summary = run_summary(preset, accelerator, progress, parts, data, global_batch=global_batch,
                              wall_time_s=time.time() - start, ema_in_sync=ema_in_sync, resumed_from=resumed_from,
                              initialized_from=args.init_from, mixed_precision=used_precision)
        if monitor is not None:
            summary["eval"] = monitor.summary(summary["wall_time_s"])
        write_json(output_dir / "training_summary.json", summary)
        accelerator.print(f"done: pipeline in {output_dir / 'pipeline'}, samples in {output_dir / 'samples.png'}")
        if args.push_to_hub:
            exit_code = push_export(accelerator, output_dir, hub_model_id(args), args.private or None)
    end_run(accelerator, keep_process_group)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
