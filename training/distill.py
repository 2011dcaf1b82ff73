"""Distil a trained punkdiff model into a student that samples in a handful of steps: the stages, top to bottom.

    accelerate launch training/distill.py outputs/mnist16/pipeline --steps 4 --dataset ../shared/datasets/mnist
    punkdiff distill outputs/mnist16/pipeline --steps 4          (same parser, same stages, one process)

Distillation in the manner of progressive distillation (Salimans & Ho 2022): a student learns to take one
deterministic DDIM step where its teacher takes several, in v-prediction, on the teacher's own data pipeline. By
default one stage, 32 -> 4, the teacher walking each student step in 8 DPM-Solver++ 2M steps (measured best on CPU
budgets, docs/few-step.md); `--stage-factor 2 --teacher-solver ddim --teacher-steps 64` is the paper's halving, 64
-> 32 -> 16 -> 8 -> 4, each stage's EMA export teaching the next. A last stage, distribution matching (DMD, Yin et
al. 2024; `--dmd-steps`, 0 skips it), then samples the student from pure noise and pulls its images toward the
teacher's distribution rather than its path, with DMD2's GAN term on the training images (`--gan-weight`). A stage
is a run of `train.py`'s loop (EMA, checkpoints, exact resume, progress bar, TensorBoard) with its loss, in
`OUTPUT_DIR/stage-<n>/` (`stage-<n>-dmd/`). The last stage's export is copied to `OUTPUT_DIR/pipeline/`: a normal
export whose scheduler config says "trailing" spacing (so a stock `DDIMPipeline` samples it with
`num_inference_steps=n`, no guesswork) and whose card names the teacher.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import PartialState
from diffusers import DDPMScheduler, UNet2DModel

from punkdiff.files import write_json
from punkdiff.hub import ModelCardInfo, ModelFolderError, model_folder, validate_model_folder, write_model_card
from punkdiff.interrupts import exit_on_interrupt
from punkdiff.pipelines.punkdiff_pipeline import CONDITION_FILE, SAMPLING_FILE, SamplingConfig
from punkdiff.presets import PRESETS, PresetError
from punkdiff.scripts.train import run as train_stage
from punkdiff.training.arguments import add_distill_arguments, resolve_training_config
from punkdiff.training.checkpoints import resume_hint
from punkdiff.training.distillation import DistillationError, DistillationLoss, default_stage_steps, distillation_stages
from punkdiff.training.distribution_matching import (
    DMD_LEARNING_RATE,
    GAN_WEIGHT,
    DistributionMatchingLoss,
    default_dmd_steps,
)
from punkdiff.training.speed import precision_for


def build_distill_parser(prog: str = "distill.py") -> argparse.ArgumentParser:
    """The parser of `training/distill.py`; `punkdiff distill` adds the same flags to its subparser."""
    p = argparse.ArgumentParser(prog=prog, description="Distil a punkdiff model into a few-step student.")
    add_distill_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_distill_parser().parse_args(argv)
    return exit_on_interrupt(lambda: run(args), "distill", lambda: resume_hint(args.output_dir))  # Ctrl-C: 130


def run(args: argparse.Namespace) -> int:
    """Distil as `args` says; 0 on success, 1 on a failed stage, 2 on bad input (found before any work)."""
    # ---- 1. the teacher and the plan, checked before any data loads -------------------------------------------
    output_dir = Path(args.output_dir)
    try:
        teacher = model_folder(args.teacher)
        validate_model_folder(teacher)
        teacher_config = dict(DDPMScheduler.from_pretrained(teacher / "scheduler").config)
        stages = distillation_stages(args.teacher_steps, args.steps, args.stage_factor)
        DistillationLoss.check_teacher(teacher_config)
        for teacher_steps, steps in itertools.pairwise([args.teacher_steps, *stages]):
            DistillationLoss.check_solver(args.teacher_solver, teacher_steps // steps)
        if args.dmd_steps is not None and args.dmd_steps < 0:
            raise DistillationError(f"--dmd-steps {args.dmd_steps} must be 0 (no distribution-matching stage) or more")
        args.gan_weight = GAN_WEIGHT if args.gan_weight is None else args.gan_weight
        if not args.gan_weight >= 0:
            raise DistillationError(f"--gan-weight {args.gan_weight} must be 0 (no GAN term) or more")
        if (teacher / CONDITION_FILE).is_file() or args.condition_on:
            raise DistillationError("distilling a conditional model is not supported: its students would need the "
                                    "condition and guidance in every teacher step; distil an unconditional model")
        if (output_dir / "pipeline").exists() and not (args.overwrite_output_dir or args.resume_from_checkpoint):
            raise DistillationError(f"{output_dir / 'pipeline'} already holds a student: pass --overwrite-output-dir "
                                    "to distil again, --resume-from-checkpoint latest to finish it, or another "
                                    "--output-dir")
        base_preset = _teacher_preset(args, teacher, output_dir)
        _stage_args(args, base_preset, output_dir / f"stage-{stages[0]}", stages[0], len(stages))  # flags checked
    except (ModelFolderError, DistillationError, PresetError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    # ---- 2. the stages: each student starts from its teacher's weights and learns its teacher's steps in one -----
    first_teacher = teacher
    for teacher_steps, steps in itertools.pairwise([args.teacher_steps, *stages]):
        stage_dir = output_dir / f"stage-{steps}"
        if not (_finished(stage_dir) and not args.overwrite_output_dir):  # else done before an interruption
            stage_args = _stage_args(args, base_preset, stage_dir, steps, len(stages))
            student = UNet2DModel.from_pretrained(teacher / "unet", use_safetensors=True)
            teacher_config = dict(DDPMScheduler.from_pretrained(teacher / "scheduler").config)
            loss = DistillationLoss(copy.deepcopy(student), teacher_config, steps, teacher_steps // steps,
                                    args.teacher_solver, _precision(stage_args))  # the teacher: a frozen copy
            print(f"distilling {teacher_steps} -> {steps} steps into {stage_dir}", file=sys.stderr)
            if (code := train_stage(stage_args, loss_fn=loss, start_from=student, keep_process_group=True)) != 0:
                return code
        teacher = _recommend_steps(stage_dir / "pipeline", steps)

    # ---- 3. distribution matching: the student's images, sampled from noise, pulled toward its first teacher's ----
    stage_dir = output_dir / f"stage-{args.steps}-dmd"
    stage_args = _stage_args(args, base_preset, stage_dir, args.steps, len(stages), dmd=True)
    if stage_args.max_steps:
        if not (_finished(stage_dir) and not args.overwrite_output_dir):
            student = UNet2DModel.from_pretrained(teacher / "unet", use_safetensors=True)
            loss = DistributionMatchingLoss(
                UNet2DModel.from_pretrained(first_teacher / "unet", use_safetensors=True),
                dict(DDPMScheduler.from_pretrained(first_teacher / "scheduler").config), args.steps,
                _precision(stage_args), warmup=stage_args.max_steps // 4, gan_weight=args.gan_weight)
            print(f"matching the {args.steps}-step student's images to its teacher's in {stage_dir}", file=sys.stderr)
            if (code := train_stage(stage_args, loss_fn=loss, start_from=student, keep_process_group=True)) != 0:
                return code
        teacher = _recommend_steps(stage_dir / "pipeline", args.steps)

    # ---- 4. the student: the last stage's export, its card naming the teacher and the steps it samples in -------
    state = PartialState()
    if state.is_main_process:
        _export_student(teacher.parent, output_dir, args, stages)
        print(f"done: a {args.steps}-step student in {output_dir / 'pipeline'}", file=sys.stderr)
    state.wait_for_everyone()
    state.destroy_process_group()  # the stages kept it
    return 0


def _teacher_preset(args: argparse.Namespace, teacher: Path, output_dir: Path) -> str | None:
    """The teacher's own training configuration (its run's `training_summary.json`, else the preset its card
    names), saved as `OUTPUT_DIR/teacher_config.json` for the stages; None when `--preset`/`--config` is given."""
    if args.preset or args.config:
        return None
    summary = teacher.parent / "training_summary.json"
    if summary.is_file():
        saved = json.loads(summary.read_text())["config"]
        config = {"preset": saved["name"], **{k: v for k, v in saved.items() if k not in ("name", "description")}}
        if saved["name"] not in PRESETS:
            raise PresetError(f"{summary} names preset {saved['name']!r}, which this punkdiff does not have: pass "
                              "--preset and --dataset")
    else:
        from huggingface_hub import ModelCard

        meta = ModelCard.load(teacher / "README.md").data.to_dict().get("punkdiff", {}) if (
            teacher / "README.md").is_file() else {}
        if meta.get("preset") not in PRESETS:
            raise PresetError(f"{args.teacher} names no punkdiff preset (no training_summary.json beside it, no "
                              "preset in its card): pass the --preset and --dataset it was trained with")
        config = {"preset": meta["preset"]}
        if meta.get("dataset"):
            config["data"] = {"dataset": meta["dataset"]}
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "teacher_config.json"
    write_json(path, config)  # atomic: every process of a launch writes the same file
    return str(path)


def _stage_args(args: argparse.Namespace, base_preset: str | None, stage_dir: Path, steps: int,
                num_stages: int, dmd: bool = False) -> argparse.Namespace:
    """The training run of one stage: the teacher's data and model, a v-prediction student sampled by trailing
    DDIM without clipping (its x target at high noise is not an image), previews at the stage's step count, and
    without `--max-steps` `default_stage_steps` (with the distribution-matching stage, `dmd=True`, and its
    `default_dmd_steps`: within twice the teacher's training time). The distribution-matching stage learns at a
    constant 1e-5 (DMD's small steps; the student is already close)."""
    stage = copy.copy(args)
    stage.output_dir = str(stage_dir)
    stage.config = args.config or base_preset
    stage.set = [*args.set, "scheduler.prediction_type=v_prediction", "scheduler.clip_sample=false",
                 "scheduler.timestep_spacing=trailing", f"train.sample_inference_steps={steps}", "train.sample_eta=0"]
    stage.prediction_type = None
    if dmd:
        stage.set = [*stage.set, "train.lr_scheduler=constant", "train.lr_warmup_steps=0"]
        stage.learning_rate, stage.epochs = DMD_LEARNING_RATE, None
        if args.dmd_steps is not None or args.max_steps is not None:  # --max-steps: each stage's
            stage.max_steps = args.dmd_steps if args.dmd_steps is not None else args.max_steps
        else:
            stage.max_steps = default_dmd_steps(resolve_training_config(stage).train.max_steps)
    elif args.max_steps is None and args.epochs is None:  # 2/5 of the teacher's steps, shared out over the stages
        stage.max_steps = default_stage_steps(resolve_training_config(stage).train.max_steps, num_stages)
    stage.resume_from_checkpoint = "latest" if args.resume_from_checkpoint and (stage_dir / "checkpoints").is_dir() \
        else None
    stage.init_from, stage.push_to_hub = None, False
    return stage


def _recommend_steps(export: Path, steps: int) -> Path:
    """Record in the stage's export how it is sampled (its `sampling.json`): trailing DDIM, deterministic, in the
    steps it was distilled for; returns the export."""
    if PartialState().is_main_process:
        write_json(export / SAMPLING_FILE, asdict(SamplingConfig("ddim-trailing", steps, 0.0, distilled_steps=steps)))
    PartialState().wait_for_everyone()
    return export


def _precision(stage_args: argparse.Namespace) -> str:
    """The stage's mixed precision as training resolves it (bf16 only where native): the teacher runs in it."""
    return precision_for(resolve_training_config(stage_args).train.mixed_precision,
                         torch.device("cuda" if torch.cuda.is_available() else "cpu"))[0]


def _finished(stage_dir: Path) -> bool:
    return (stage_dir / "training_summary.json").is_file() and (stage_dir / "pipeline" / "model_index.json").is_file()


def _export_student(last_stage: Path, output_dir: Path, args: argparse.Namespace, stages: list[int]) -> None:
    """Copy the last stage's export to `OUTPUT_DIR/pipeline` and write its card: the teacher, the steps."""
    stage_dirs = [output_dir / f"stage-{n}" for n in stages]
    matched = last_stage not in stage_dirs  # the last stage was distribution matching
    summaries = [json.loads((d / "training_summary.json").read_text()) for d in stage_dirs + [last_stage] * matched]
    summary, config = summaries[-1], summaries[-1]["config"]
    dmd_steps = summary["steps"] if matched else 0
    target = output_dir / "pipeline"
    staging = output_dir / ".pipeline.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(last_stage / "pipeline", staging)
    write_model_card(staging, ModelCardInfo(
        preset=config["name"],
        dataset=str(config["data"]["dataset"]),
        training_steps=sum(s["steps"] for s in summaries),
        resolution=config["data"]["resolution"],
        license=config["data"].get("license", "apache-2.0"),
        distilled_from=str(args.teacher),
        distillation_stages=[args.teacher_steps, *stages],
        distribution_matching_steps=dmd_steps,
        gan_weight=args.gan_weight if dmd_steps else 0.0,
        model_name=f"punkdiff {config['name']}, {args.steps}-step student",
    ))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    # beside the export, as after training: evaluation, the app and a further distillation read its preprocessing
    write_json(output_dir / "training_summary.json", {**summary, "distillation": {
        "teacher": str(args.teacher), "stages": [args.teacher_steps, *stages], "teacher_solver": args.teacher_solver,
        "dmd_steps": dmd_steps, "gan_weight": args.gan_weight if dmd_steps else 0.0,
        "wall_time_s": sum(s["wall_time_s"] for s in summaries)}})


if __name__ == "__main__":
    sys.exit(main())
