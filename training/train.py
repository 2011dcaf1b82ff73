"""Train a punkdiff preset with Accelerate: the whole loop, top to bottom.

    accelerate launch training/train.py --preset mnist-baseline-16 --dataset ../shared/datasets/mnist
    accelerate launch --multi_gpu --num_processes 2 training/train.py --preset punks-32 ...
    punkdiff train ...            (same parser, same loop, one process)

What the loop calls lives in `punkdiff.training`, one module per concern (arguments, resume, checkpoints, loss,
progress, previews, monitor, reporting).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, gather_object, set_seed
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from punkdiff.data import (
    DataError,
    ImageStreamLoader,
    ImageTransform,
    count_images,
    default_cache_dir,
    exceeds_cache_budget,
    load_training_images,
    pixel_art_palette,
    stream_training_images,
    to_model_input,
)
from punkdiff.files import write_json
from punkdiff.hub import ModelCardInfo, ModelFolderError, export_pipeline, push_to_hub
from punkdiff.interrupts import exit_on_interrupt
from punkdiff.presets import PresetError
from punkdiff.training import TrainingError
from punkdiff.training.arguments import build_train_parser, hub_model_id, resolve_training_config
from punkdiff.training.checkpoints import (
    load_checkpoint,
    register_ema_hooks,
    require_finite_weights,
    resume_hint,
    save_checkpoint,
)
from punkdiff.training.ema import ema_weights_in_sync
from punkdiff.training.loss import diffusion_loss
from punkdiff.training.monitor import QualityMonitor
from punkdiff.training.preemption import StopRequest
from punkdiff.training.pretrained import load_initial_unet
from punkdiff.training.previews import ema_sample_grid
from punkdiff.training.progress import LoopProgress, steps_per_epoch
from punkdiff.training.reporting import (
    flat_config,
    log_image,
    package_versions,
    peak_memory_mb,
    precision_used,
)
from punkdiff.training.resources import check_run_outputs, cpu_threads_warning, out_of_memory_message
from punkdiff.training.resume import check_resume, remove_previous_run
from punkdiff.training.run_lock import claim_output_dir
from punkdiff.training.speed import build_optimizer, precision_for
from punkdiff.training.step_log import StepLog
from punkdiff.visuals import plot_loss_curve


def main(argv: Sequence[str] | None = None) -> int:
    args = build_train_parser().parse_args(argv)
    return exit_on_interrupt(lambda: run(args), "train", lambda: resume_hint(args.output_dir))  # Ctrl-C: 130


def run(args: argparse.Namespace) -> int:
    """Train as `args` (from `build_train_parser`) says; 0 on success, 1 on a failed run, 2 on bad input."""
    # ---- 1. configuration: every bad flag, preset or resume mismatch fails here, before any data -------------
    try:
        preset = resolve_training_config(args)
    except PresetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    train_spec = preset.train
    output_dir = Path(args.output_dir)
    if (busy := claim_output_dir(output_dir)) is not None:  # two runs in one folder would claim one pipeline/
        print(f"error: {busy}", file=sys.stderr)
        return 2

    # `--multi_gpu` on a machine without a GPU: one run over gloo, not N independent runs writing over each other
    several_cpu_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    device = PartialState(cpu=several_cpu_processes).device
    precision, precision_fallback = precision_for(train_spec.mixed_precision, device)  # no emulated bf16 on a CPU
    accelerator = Accelerator(
        cpu=several_cpu_processes,
        gradient_accumulation_steps=train_spec.gradient_accumulation_steps,
        mixed_precision=precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed, non_blocking=True),
    )
    try:
        # a dataset whose decoded cache would not fit the budget streams (decided from its metadata, no image read)
        too_big = None if args.streaming else exceeds_cache_budget(
            preset.data.dataset, preset.data, args.cache_dir,
            None if args.cache_budget is None else int(args.cache_budget * 2**30),
        )
        streaming = args.streaming or too_big is not None
        if streaming and args.eval_every:
            raise DataError("--eval-every scores samples against the training images held in the cache, and a "
                            "streamed dataset holds none: drop --eval-every, or cache the data (no --streaming, a "
                            "larger --cache-budget)")
        resume = check_resume(
            output_dir, args.resume_from_checkpoint, preset, accelerator.num_processes, args.overwrite_output_dir,
            seed=args.seed, extend_schedule=args.extend_schedule, streaming=streaming,
        )
        if accelerator.is_main_process:  # an unwritable folder is found now, not at the first checkpoint
            check_run_outputs(output_dir, args.cache_dir or default_cache_dir(), preset)
        initial_unet = load_initial_unet(args.init_from, preset) if args.init_from and resume is None else None
        if args.overwrite_output_dir and resume is None and accelerator.is_main_process:
            remove_previous_run(output_dir)
        accelerator.wait_for_everyone()
        set_seed(args.seed, device_specific=True)  # dropout etc. differ per process, reproducibly
        # timesteps, noise and flips come from our own generator, saved with each checkpoint, so a
        # resumed run draws exactly what the uninterrupted one would have
        noise_rng = torch.Generator(accelerator.device).manual_seed(args.seed * 1000 + accelerator.process_index)

        # ---- 2. data: decoded once into the cache (main process first, so it is built once), or streamed -------
        if streaming:  # each process reads and decodes its own shard of the stream, with the cache's transform
            accelerator.print(f"streaming {preset.data.dataset}: {too_big or '--streaming'}")
            num_images = count_images(preset.data.dataset, preset.data)
            stream = stream_training_images(preset.data.dataset, preset.data, seed=args.seed,
                                            rank=accelerator.process_index, world_size=accelerator.num_processes)
            loader = ImageStreamLoader(stream, num_images, train_spec.batch_size, accelerator.num_processes,
                                       accelerator.device)
            palette = None  # a palette needs every image: a streamed run's samples are not snapped to one
        else:
            with accelerator.main_process_first():
                dataset = load_training_images(
                    preset.data.dataset, preset.data, cache_dir=args.cache_dir, progress=accelerator.is_main_process
                )
            num_images = len(dataset)
            on_device = args.data_on_device == "yes" or (
                args.data_on_device == "auto" and accelerator.device.type == "cuda" and dataset.images.nbytes < 2**31
            )
            # pixel art (CryptoPunks) keeps its colours: grids and the export snap samples to the training palette
            palette = pixel_art_palette(dataset.images, ImageTransform.from_spec(preset.data))
            if on_device:
                dataset = dataset.to(accelerator.device)
            # batches are single gathers, seeded by the loader's own generator (not the global RNG, which dropout
            # uses); data in host memory feeding a GPU comes through pinned memory, copied without waiting
            loader = dataset.loader(train_spec.batch_size, args.seed, pin_memory=accelerator.device.type == "cuda")
            loader = accelerator.prepare(loader)  # sharded: each process sees its own slice of every batch
        updates_per_epoch = steps_per_epoch(len(loader), train_spec.gradient_accumulation_steps)
    except (DataError, TrainingError, ModelFolderError) as err:
        accelerator.print(f"error: {err}")
        return 2

    # ---- 3. model, noise schedule, optimizer, LR schedule, EMA ----------------------------------------------
    model = initial_unet or UNet2DModel(**preset.model.unet_config())
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    noise_scheduler = DDPMScheduler(**preset.scheduler.ddpm_config())
    optimizer = build_optimizer(model.parameters(), train_spec, accelerator.device)  # fused on CUDA
    max_steps = train_spec.max_steps or train_spec.epochs * updates_per_epoch
    num_epochs = math.ceil(max_steps / updates_per_epoch)
    # the prepared scheduler advances once per process per optimizer step, so its length is in
    # optimizer steps x processes (never in data-loader batches)
    lr_scheduler = get_scheduler(
        train_spec.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=train_spec.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    # --compile compiles the training forward only: EMA, previews, checkpoints and the export keep the eager module
    train_forward = torch.compile(model, backend=args.compile) if args.compile else model
    ema = None
    if train_spec.use_ema:
        ema = EMAModel(
            accelerator.unwrap_model(model).parameters(),
            decay=train_spec.ema_decay,
            use_ema_warmup=train_spec.ema_warmup,
            inv_gamma=train_spec.ema_inv_gamma,
            power=train_spec.ema_power,
            model_cls=UNet2DModel,
            model_config=accelerator.unwrap_model(model).config,
            foreach=True,  # one kernel per operation for all parameters, not one per parameter
        )
        ema.to(accelerator.device)
        register_ema_hooks(accelerator, ema)

    # ---- 4. resume ---------------------------------------------------------------------------------------------
    progress, resumed_from = LoopProgress(), None
    if resume is not None:
        checkpoint, state = resume
        load_checkpoint(accelerator, checkpoint, noise_rng)
        if streaming:  # the stream continues from its saved position (each process its own shard's)
            loader.load_state_dict(state["stream"][accelerator.process_index])
        progress, resumed_from = LoopProgress.from_state(state), str(checkpoint)
        accelerator.print(f"resumed from {checkpoint} at step {progress.global_step}")
    elif args.resume_from_checkpoint:
        accelerator.print(f"no checkpoint in {output_dir / 'checkpoints'}: starting from scratch")
    if progress.global_step > max_steps:
        accelerator.print(f"error: {resumed_from} is at step {progress.global_step}, beyond {max_steps} steps: "
                          "resume with at least as many --max-steps or --epochs, or from an earlier checkpoint")
        return 2
    if resume is not None and args.extend_schedule and progress.history:
        accelerator.print(f"--extend-schedule: the LR schedule is re-planned over {max_steps} steps; the LR goes "
                          f"from {progress.history[-1][2]:.3e} to {lr_scheduler.get_last_lr()[0]:.3e} at step "
                          f"{progress.global_step}")
    few_threads = cpu_threads_warning(accelerator.device.type, accelerator.num_processes)
    if few_threads:
        accelerator.print(few_threads)
    if precision_fallback:
        accelerator.print(f"warning: {precision_fallback}")
    used_precision = precision_used(accelerator, precision)
    if used_precision != precision:
        accelerator.print(f"warning: --mixed-precision {train_spec.mixed_precision} is not available on "
                          f"{accelerator.device.type}: training in {used_precision} (float32)")

    monitor = None
    if args.eval_every and accelerator.is_main_process:
        try:
            monitor = QualityMonitor(dataset.images, args.eval_images, args.seed)
        except ValueError as err:
            accelerator.print(f"error: {err}")
            return 2

    global_batch = train_spec.batch_size * accelerator.num_processes * train_spec.gradient_accumulation_steps
    if accelerator.is_main_process:
        accelerator.init_trackers("punkdiff", config=flat_config(preset))
    accelerator.print(
        f"{preset.name}: {num_images} images, {accelerator.num_processes} process(es), global batch {global_batch}, "
        f"{max_steps} optimizer steps ({num_epochs} epochs)"
    )

    def save_samples(step: int):
        """A DDIM grid from the EMA weights with a fixed seed, saved and logged, comparable over time."""
        grid = ema_sample_grid(
            accelerator.unwrap_model(model), ema, noise_scheduler, train_spec.num_sample_images,
            train_spec.sample_inference_steps, args.seed, palette=palette,
        )
        (output_dir / "samples").mkdir(parents=True, exist_ok=True)
        grid.save(output_dir / "samples" / f"step-{step:07d}.png")
        log_image(accelerator, "samples", grid, step)
        return grid

    # ---- 5. the loop -------------------------------------------------------------------------------------------
    progress_bar = tqdm(
        total=max_steps, initial=progress.global_step, desc="training", disable=not accelerator.is_local_main_process
    )
    start, step_log = time.time(), StepLog(accelerator, args.log_every, advice=lambda: resume_hint(output_dir))
    last_grid, exit_code = None, 0
    stop = StopRequest().install()  # SIGTERM (preemption): checkpoint after the current step, then exit
    try:
        for epoch in range(progress.epoch if progress.global_step < max_steps else num_epochs, num_epochs):
            model.train()
            loader.set_epoch(epoch)  # the seeded shuffle of epoch e is the same in every run
            skip = progress.batches_in_epoch if epoch == progress.epoch else 0  # > 0: resumed mid-epoch
            progress.epoch, progress.batches_in_epoch = epoch, skip
            # resumed mid-epoch: a cached epoch skips the batches done in its seeded order; a stream is already there
            batches = accelerator.skip_first_batches(loader, skip) if skip and not streaming else loader
            for batch in batches:
                progress.batches_in_epoch += 1
                # 5.1 x_0 in [-1, 1] (flipped per image), noise and timesteps from the saved generator
                clean = to_model_input(batch, preset.data.random_flip, noise_rng)
                noise = torch.randn(clean.shape, generator=noise_rng, device=clean.device)
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],), generator=noise_rng,
                    device=clean.device,
                )
                # 5.2 loss, backward, clip, step (the optimizer steps once per accumulated batch)
                # (nothing here reads a device value back: the host queues steps ahead of the GPU)
                with accelerator.accumulate(model):
                    loss = diffusion_loss(train_forward, noise_scheduler, clean, noise, timesteps, train_spec.snr_gamma)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), train_spec.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                step_log.add_loss(loss.detach())
                progress.images_seen += clean.shape[0] * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue

                # 5.3 one optimizer step done: EMA (once per optimizer step), the step's numbers kept on the device
                if ema is not None:
                    ema.step(accelerator.unwrap_model(model).parameters())
                progress.global_step += 1
                step = progress.global_step
                step_log.end_step(step, grad_norm, lr_scheduler.get_last_lr()[0], images=global_batch,
                                 **({"ema_decay": ema.cur_decay_value} if ema is not None else {}))
                progress_bar.update(1)

                # 5.4 every --log-every steps, and before anything is saved, read the losses back (one device
                # synchronisation) and stop on a non-finite one, so non-finite weights are never saved or exported;
                # SIGTERM is polled every step on one process, with the reads on several (there it is a collective)
                checkpoint_due = step % train_spec.checkpoint_every == 0 or step == max_steps
                sample_due = step % train_spec.sample_every == 0 or step == max_steps
                read_due = step_log.due(step) or checkpoint_due or sample_due  # the same steps on every process
                stopping = (read_due or accelerator.num_processes == 1) and stop.requested(accelerator)
                if read_due or stopping:
                    rows = step_log.read()
                    rows[-1]["peak_memory_mb"] = peak_memory_mb(accelerator.device)
                    for row in rows:
                        progress.history.append([row["step"], row["loss"], row["lr"]])
                        accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
                    progress_bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}", lr=f"{rows[-1]['lr']:.2e}")

                # 5.5 checkpoints (never of non-finite weights) and sample grids; SIGTERM checkpoints and stops
                if checkpoint_due or stopping:
                    require_finite_weights(accelerator.unwrap_model(model), ema, step)
                    state = {**progress.to_state(preset, accelerator.num_processes, len(loader)), "seed": args.seed}
                    if streaming:  # every process's position in its shard (a collective, like the checkpoint)
                        state["stream"] = gather_object([loader.state_dict()])
                    save_checkpoint(accelerator, output_dir, state, noise_rng, train_spec.checkpoints_total_limit)
                if stopping:
                    raise TrainingError(f"stopped by {stop.received.name} at step {step}; {resume_hint(output_dir)}")
                if sample_due and accelerator.is_main_process:
                    last_grid = save_samples(step)
                eval_due = monitor is not None and (step % args.eval_every == 0 or step == max_steps)
                if eval_due:
                    quality = monitor(accelerator.unwrap_model(model), ema, noise_scheduler,
                                      train_spec.sample_inference_steps, step)
                    accelerator.log(quality, step=step)
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
    # every process must hold the same EMA weights (each updates its own copy after the all-reduce)
    ema_in_sync = ema_weights_in_sync(accelerator, ema) if ema is not None else None

    # ---- 6. export: EMA weights by default, the last grid, the loss curve, a summary, the Hub -----------------
    if exit_code == 0 and accelerator.is_main_process:
        unet = copy.deepcopy(accelerator.unwrap_model(model)).eval()
        if ema is not None:
            ema.copy_to(unet.parameters())
        if last_grid is None:  # resumed from the final checkpoint (killed during the grid or export): export only
            last_grid = save_samples(progress.global_step)
        last_grid.save(output_dir / "samples.png")
        steps, losses = [h[0] for h in progress.history], [h[1] for h in progress.history]
        plot_loss_curve(steps, losses, output_dir / "loss_curve.png", title=f"{preset.name} on {preset.data.dataset}")
        export_pipeline(
            unet,
            noise_scheduler,
            output_dir / "pipeline",
            card=ModelCardInfo(
                preset=preset.name,
                dataset=str(preset.data.dataset),
                training_steps=progress.global_step,
                resolution=preset.data.resolution,
                license=preset.data.license,
                metrics=monitor.card_metrics() if monitor is not None else None,
            ),
            sample_grid=last_grid,
            palette=palette,
        )
        summary = {
            "preset": preset.name,
            "config": preset.to_dict(),
            "steps": progress.global_step,
            "epochs": num_epochs,
            "num_processes": accelerator.num_processes,
            "global_batch_size": global_batch,
            "images_seen": progress.images_seen,
            "steps_per_epoch": updates_per_epoch,
            "wall_time_s": time.time() - start,
            "final_loss": progress.history[-1][1] if progress.history else None,
            "final_lr": lr_scheduler.get_last_lr()[0],
            "ema_optimization_step": ema.optimization_step if ema is not None else None,
            "ema_in_sync_across_processes": ema_in_sync,
            "resumed_from": resumed_from,
            "initialized_from": args.init_from,
            "mixed_precision": used_precision,
            "device": str(accelerator.device),
            "versions": package_versions(),
        }
        if monitor is not None:
            summary["eval"] = monitor.summary(summary["wall_time_s"])
        write_json(output_dir / "training_summary.json", summary)
        accelerator.print(f"done: pipeline in {output_dir / 'pipeline'}, samples in {output_dir / 'samples.png'}")
        if args.push_to_hub:
            try:
                url = push_to_hub(output_dir / "pipeline", hub_model_id(args), private=args.private or None)
            except Exception as err:  # the Hub's errors are many; the trained model is safe on disk either way
                accelerator.print(f"error: the push failed ({type(err).__name__}: {err}); the export is kept in "
                                  f"{output_dir / 'pipeline'}: retry with `punkdiff push {output_dir / 'pipeline'} "
                                  f"--repo-id {hub_model_id(args)}`")
                exit_code = 1
            else:
                accelerator.print(f"pushed to {url}")
    accelerator.end_training()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
