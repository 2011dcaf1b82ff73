"""Export a trained model as a Diffusers folder, check model folders before loading, and push to the Hub.

An export is what a Hub user downloads: `model_index.json`, `unet/` and `scheduler/` (weights in
`.safetensors` only), `pipeline.py` (the `PunkDiffPipeline` source, for diffusers' custom-pipeline route),
`sampling.json` (how the model is meant to be sampled), `samples.png` and a `README.md` model card.
`model_index.json` names the stock `DDPMPipeline`, so `DiffusionPipeline.from_pretrained(folder)` works without
running any code shipped with the model, and `custom_pipeline=..., trust_remote_code=True` is an explicit opt-in
to `PunkDiffPipeline`.

Loading goes through `validate_model_folder` first, which reads only JSON and safetensors headers: a
pickle checkpoint is refused, never unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import yaml
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects
from safetensors import safe_open

from punkdiff.files import write_text
from punkdiff.pipelines.punkdiff_pipeline import (
    CONDITION_FILE,
    MULTI_HOT,
    PALETTE_FILE,
    SAMPLING_FILE,
    AttributeEncoder,
    ConditionError,
    ConditionVocabulary,
    PunkDiffPipeline,
    SamplingConfig,
    read_palette,
    read_sampling_config,
)
from punkdiff.presets import RECOMMENDED_SAMPLING

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = f"{WEIGHTS_NAME}.index.json"  # a sharded UNet's map of tensors to shards
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# What a card rendered without `repo_id` loads from; `push_to_hub` replaces the quoted token with the repo id.
LOCAL_MODEL_REF = "path/to/this/folder"


class ModelFolderError(ValueError):
    """A model folder that punkdiff will not load or push; the message names the file and the fix."""


class PushError(RuntimeError):
    """The Hub refused or could not be reached; the message says why and what to check (never the token)."""


@dataclasses.dataclass
class ModelCardInfo:
    """What the model card says about a trained model; `None` fields are filled from the model or left out.

    Attributes:
        preset: punkdiff preset name the model was trained with.
        dataset: What it was trained on: a Hub dataset id such as `"ylecun/mnist"` (linked, and listed in the
            card metadata) or any other name or path (only mentioned).
        training_steps: Optimiser steps taken.
        resolution: Image side in pixels (default: the UNet's `sample_size`).
        channels: 1 or 3 (default: the UNet's `in_channels`).
        num_train_timesteps: Length of the noise schedule (default: the scheduler's).
        license: Hub license id; set it to respect the training data's terms.
        metrics: e.g. `{"FID": 12.3}`; the card says "not measured" when `None`.
        model_name: Card title (default: `punkdiff <preset>`).
        repo_id: Where the model will live, used in the card's loading snippets (default: `LOCAL_MODEL_REF`,
            which `push_to_hub` replaces with the repo id it pushes to).
        tags: Extra Hub tags.
        distilled_from: A distilled student's teacher (folder or Hub id); the card then says how it samples.
        distillation_stages: The student's step counts, teacher first (e.g. `[64, 32, 16, 8, 4]`).
        distribution_matching_steps: Optimizer steps of the student's last, distribution-matching stage (0: none).
        gan_weight: The weight of that stage's GAN term on the training images (0: none).
        condition: A conditional model's vocabulary (default: the folder's `condition.json`); the card lists it
            and shows how to ask for it.
    """

    preset: str = "custom"
    dataset: str | None = None
    training_steps: int | None = None
    resolution: int | None = None
    channels: int | None = None
    num_train_timesteps: int | None = None
    license: str = "apache-2.0"
    metrics: dict[str, float] | None = None
    model_name: str | None = None
    repo_id: str | None = None
    tags: list[str] = dataclasses.field(default_factory=list)
    distilled_from: str | None = None
    distillation_stages: list[int] | None = None
    distribution_matching_steps: int = 0
    gan_weight: float = 0.0
    condition: ConditionVocabulary | None = None


def render_model_card(info: ModelCardInfo, *, has_samples: bool = False) -> str:
    """Render `model_cards/template.md` with Hub metadata, so the Hub lists the model as a Diffusers one."""
    model_name = info.model_name or f"punkdiff {info.preset}"
    eval_results = _eval_results(info.metrics or {}, info.dataset)
    kind = "unconditional-image-generation" if info.condition is None else "class-conditional-image-generation"
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="unconditional-image-generation",
        license=info.license,
        datasets=[info.dataset] if _is_hub_dataset(info.dataset) else None,
        tags=["diffusers", kind, "ddpm", "punkdiff", *info.tags],
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
        punkdiff={"preset": info.preset, "dataset": _dataset_name(info.dataset)},  # read back by the web app
    )
    template = resources.files("punkdiff.model_cards").joinpath("template.md").read_text(encoding="utf-8")
    card = ModelCard.from_template(
        card_data,
        template_str=template,
        model_name=model_name,
        model_ref=info.repo_id or LOCAL_MODEL_REF,
        preset=info.preset,
        dataset=_dataset_name(info.dataset),
        training_steps=info.training_steps,
        resolution=info.resolution,
        channels=info.channels,
        num_train_timesteps=info.num_train_timesteps,
        metrics_table=_metrics_table(info.metrics or {}),
        has_samples=has_samples,
        distilled_from=info.distilled_from,
        distillation_stages=" -> ".join(map(str, info.distillation_stages or [])),
        sampling_steps=(info.distillation_stages or [None])[-1],
        distribution_matching_steps=info.distribution_matching_steps,
        gan_weight=info.gan_weight,
        condition=info.condition.markdown() if info.condition is not None else None,
        request=_example_request(info.condition) if info.condition is not None else None,
    )
    return str(card)


def _example_request(condition: ConditionVocabulary) -> str:
    """The keyword arguments of a `PunkDiffPipeline` call that asks for the first name of every column."""
    if condition.encoding != MULTI_HOT:
        return f"labels={list(condition.groups[0].names[:2])!r}"
    request = {g.column: g.names[0] if g.kind == "single" else list(g.names[:1]) for g in condition.groups}
    return f"attributes={request!r}, batch_size=4"


def update_model_card(
    folder: str | os.PathLike[str], metrics: Mapping[str, float | str], dataset: str | None = None
) -> Path:
    """Add `metrics` (measured on `dataset`) to the model card of a local model folder, keeping everything else.

    Numeric values go into the YAML `model-index` results, replacing earlier results of the same name and
    dataset; the card's Metrics table is rewritten from all of them (a text value, such as "not computed:
    weights unavailable", appears in the table only). The rest of the card, hand edits included, is left as it
    is; a folder without a card gets a new one. `punkdiff eval --update-card` calls this after writing its report.

    Examples:
        ```py
        >>> update_model_card("outputs/mnist16/pipeline", {"fd_classifier (1000 samples)": 3.1}, "ylecun/mnist")
        PosixPath('outputs/mnist16/pipeline/README.md')
        ```
    """
    card = load_model_card(folder)
    if card is None:
        return write_model_card(folder, ModelCardInfo(dataset=dataset, metrics=dict(metrics)))
    readme = Path(folder) / "README.md"
    new = _eval_results(metrics, dataset)
    replaced = {(r.dataset_name, r.metric_name) for r in new}
    kept = [r for r in card.data.eval_results or [] if (r.dataset_name, r.metric_name) not in replaced]
    card.data.eval_results = kept + new
    card.data.model_name = card.data.model_name or Path(folder).resolve().name
    table = _metrics_table({**{r.metric_name: r.metric_value for r in kept}, **metrics})
    section = re.compile(r"^## Metrics\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    new_section = f"## Metrics\n\n{table}\n\n"
    if section.search(card.text):
        card.text = section.sub(lambda _: new_section, card.text, count=1)
    else:
        card.text = card.text.rstrip() + "\n\n" + new_section
    write_text(readme, str(card))  # replaces the file; never writes through a link
    return readme


def load_model_card(folder: str | os.PathLike[str]) -> ModelCard | None:
    """The model card of a local folder for editing (None if it has none), or `ModelFolderError` saying why not.

    A `README.md` that is a symbolic link is refused, never followed: editing it would rewrite whatever file the
    link points to. A card whose YAML header does not parse is refused too, naming the error, so
    `punkdiff eval --update-card` can check it before sampling.
    """
    readme = Path(folder) / "README.md"
    if readme.is_symlink():
        raise ModelFolderError(
            f"{readme} is a symbolic link (to {os.readlink(readme)}); punkdiff never edits a card through a link, "
            "which would rewrite the file it points to. Replace the link with a copy of the card, then run again."
        )
    if not readme.exists():
        return None
    if not readme.is_file():
        raise ModelFolderError(f"{readme} is not a file; remove it (a new card is then written) or put the card there.")
    try:
        return ModelCard.load(readme)
    except (yaml.YAMLError, ValueError, TypeError, KeyError, RecursionError, UnicodeDecodeError) as e:
        detail = " ".join(str(e).split())[:300]
        raise ModelFolderError(
            f"{readme} has a metadata header (the YAML between the first two '---' lines) that cannot be read "
            f"({type(e).__name__}: {detail}); fix or remove that header, then run again."
        ) from None


def _eval_results(metrics: Mapping[str, Any], dataset: str | None) -> list[EvalResult]:
    """The numeric metrics as YAML `model-index` results, where the Hub shows and indexes them."""
    name = _dataset_name(dataset) or "unknown"
    return [
        EvalResult(task_type="unconditional-image-generation", dataset_type=name, dataset_name=name,
                   metric_type=metric, metric_name=metric, metric_value=value)
        for metric, value in metrics.items() if isinstance(value, (int, float)) and not isinstance(value, bool)
    ]


def _metrics_table(metrics: Mapping[str, Any]) -> str:
    """The card's Metrics section: a Markdown table of the metrics, or "Not measured yet."."""
    if not metrics:
        return "Not measured yet."
    rows = [f"| {name} | {f'{value:.4g}' if isinstance(value, (int, float)) else value} |"
            for name, value in metrics.items()]
    return "\n".join(["| Metric | Value |", "|---|---|", *rows])


def write_model_card(folder: str | os.PathLike[str], info: ModelCardInfo | Mapping[str, Any] | None = None) -> Path:
    """Write the model card `README.md` into a saved pipeline folder; `export_pipeline` calls it.

    Fields `info` leaves empty (resolution, channels, schedule length) are read from the folder's configs, and the
    card shows `samples.png` when the folder has one. This is punkdiff's one model card, for every way a model is
    saved or pushed.

    Examples:
        ```py
        >>> write_model_card("outputs/mnist16/pipeline", {"preset": "mnist-baseline-16", "dataset": "ylecun/mnist"})
        PosixPath('outputs/mnist16/pipeline/README.md')
        ```
    """
    folder = Path(folder)
    info = ModelCardInfo(**info) if isinstance(info, Mapping) else info or ModelCardInfo()
    unet_config = _read_json(folder / "unet" / "config.json")
    scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json")
    info = dataclasses.replace(
        info,
        resolution=info.resolution or _side(unet_config["sample_size"]),
        channels=info.channels or unet_config["in_channels"],
        num_train_timesteps=info.num_train_timesteps or scheduler_config["num_train_timesteps"],
        condition=info.condition or _saved_condition(folder),
    )
    readme = folder / "README.md"
    write_text(readme, render_model_card(info, has_samples=(folder / "samples.png").is_file()))
    return readme


def _saved_condition(folder: Path) -> ConditionVocabulary | None:
    path = folder / CONDITION_FILE
    return ConditionVocabulary.from_json(path.read_text()) if path.is_file() else None


def export_pipeline(
    unet: UNet2DModel,
    scheduler: SchedulerMixin,
    output_dir: str | os.PathLike[str],
    *,
    card: ModelCardInfo | Mapping[str, Any] | None = None,
    sample_grid: PIL.Image.Image | None = None,
    palette: np.ndarray | None = None,
    attribute_encoder: AttributeEncoder | None = None,
    condition: ConditionVocabulary | None = None,
    sampling: SamplingConfig | Mapping[str, Any] | None = None,
) -> Path:
    """Write a Hub-ready model folder, replacing `output_dir` only once the new export is complete and valid.

    The schedule is saved as a `DDPMScheduler` (the training process), so stock `DDPMPipeline` and
    `DDIMPipeline` load the folder; samplers are picked at call time, and `sampling` (default: punkdiff's
    `RECOMMENDED_SAMPLING`, DDIM-50 with eta 1, what measured best for trained presets) is saved as `sampling.json`,
    the sampler, steps and eta that calls leaving them out use. Pass an unwrapped UNet (e.g. the EMA
    copy, not a DDP or compiled wrapper). A pixel-art model's training `palette` (uint8 `[P, C]`) is saved as
    `palette.json`, so its pipeline snaps samples to it. An existing `output_dir` is replaced only if it is empty or
    is itself an export, so a mistyped path never deletes a training run. A conditional model passes its
    `condition` vocabulary (saved as `condition.json`, listed in the card) and, for attributes, its
    `attribute_encoder`.

    Examples:
        ```py
        >>> export_pipeline(unet, DDPMScheduler(), "outputs/mnist16/pipeline", card={"preset": "mnist-baseline-16"})
        ```
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not (output_dir / "model_index.json").is_file():
        raise FileExistsError(f"{output_dir} exists and is not a model export; choose another output folder.")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.parent.glob(f".{output_dir.name}.staging-*"):  # left by an export that was killed
        shutil.rmtree(stale, ignore_errors=True)
    _recover_interrupted_move(output_dir)
    staging = output_dir.with_name(f".{output_dir.name}.staging-{uuid.uuid4().hex[:8]}")
    staging.mkdir()  # a sibling, so the final rename stays on one filesystem
    try:
        if sample_grid is not None:
            sample_grid.save(staging / "samples.png")
        pipe = PunkDiffPipeline(unet=unet, scheduler=DDPMScheduler.from_config(scheduler.config),
                                attribute_encoder=attribute_encoder, condition=condition)
        pipe.palette = torch.as_tensor(palette) if palette is not None else None
        pipe.sampling_config = sampling if isinstance(sampling, SamplingConfig) else SamplingConfig.from_dict(
            dict(sampling or RECOMMENDED_SAMPLING))
        pipe.save_pretrained(staging, safe_serialization=True)
        write_model_card(staging, card)
        validate_model_folder(staging)
        _move_into_place(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def validate_model_folder(folder: str | os.PathLike[str]) -> Path:
    """Check a model folder without executing anything from it; raise `ModelFolderError` saying what to fix.

    Reads only JSON files and the safetensors header, and checks the UNet config against the weights'
    names and shapes (diffusers would otherwise leave missing weights randomly initialised, with a warning).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder} is not a folder; pass a folder written by punkdiff's export.")
    if not (folder / "model_index.json").is_file() and (folder / "pipeline" / "model_index.json").is_file():
        raise ModelFolderError(
            f"{folder} has no model_index.json but looks like a training output folder: "
            f"did you mean {folder / 'pipeline'}?"
        )
    _check_model_index(folder / "model_index.json", _read_json(folder / "model_index.json"))
    _check_scheduler_config(folder / "scheduler" / "scheduler_config.json",
                            _read_json(folder / "scheduler" / "scheduler_config.json"))
    unet_config = _read_json(folder / "unet" / "config.json")
    _check_unet_config(folder / "unet" / "config.json", unet_config)
    if (folder / PALETTE_FILE).exists():
        _check_palette(folder / PALETTE_FILE, unet_config["in_channels"])
    _check_condition(folder)
    _check_sampling_config(folder)
    weights = _unet_weight_files(folder)
    found: dict[str, tuple[int, ...]] = {}
    for file in weights:
        try:
            with safe_open(file, framework="pt") as f:
                found.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})  # noqa: SIM118
        except Exception as e:  # safetensors raises its own SafetensorError for truncated or corrupt files
            raise ModelFolderError(
                f"{file} is not a readable safetensors file ({e}); re-export or re-download it."
            ) from e
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            expected = {k: tuple(v.shape) for k, v in UNet2DModel.from_config(unet_config).state_dict().items()}
    except Exception as e:
        raise ModelFolderError(f"{folder / 'unet' / 'config.json'} does not describe a UNet2DModel: {e}") from e
    problems = [f"missing {k}" for k in expected.keys() - found.keys()]
    problems += [f"unexpected {k}" for k in found.keys() - expected.keys()]
    problems += [
        f"{k}: config says {expected[k]}, weights have {found[k]}"
        for k in expected.keys() & found.keys()
        if expected[k] != found[k]
    ]
    if problems:
        shown = "; ".join(sorted(problems)[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ModelFolderError(
            f"{folder / 'unet' / 'config.json'} does not match {', '.join(map(str, weights))} ({shown}). "
            "The config and weights come from different models; re-export them together."
        )
    for file in weights:
        _check_weight_values(file)
    return folder


def _unet_weight_files(folder: Path) -> list[Path]:
    """The UNet's safetensors files as diffusers will load them: the shards its index names, else the one file.

    diffusers prefers `WEIGHTS_INDEX_NAME` when it exists, so the index is what is checked then; it may name only
    plain `.safetensors` files beside it (a pickle shard is refused, never opened).
    """
    unet = folder / "unet"
    index_path = unet / WEIGHTS_INDEX_NAME
    if index_path.exists():
        index = _read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not (isinstance(weight_map, dict) and weight_map and isinstance(index.get("metadata"), dict)
                and all(isinstance(v, str) for v in weight_map.values())):
            raise ModelFolderError(
                f"{index_path} must hold {{\"metadata\": {{...}}, \"weight_map\": {{tensor: shard file}}}} naming "
                "at least one shard; re-export the model (or delete the index to load the single weights file)."
            )
        shards = sorted(set(weight_map.values()))
        bad = [s for s in shards if Path(s).name != s or not s.endswith(".safetensors") or s.startswith(".")]
        if bad:
            raise ModelFolderError(
                f"{index_path}: weight_map names {', '.join(map(repr, bad[:3]))}; every shard must be a "
                ".safetensors file beside the index (punkdiff never opens pickle shards, which can run code). "
                "Re-export the model with safe_serialization=True."
            )
        missing = [s for s in shards if not (unet / s).is_file()]
        if missing:
            raise ModelFolderError(f"{index_path} names shards that are missing: {', '.join(missing[:3])}; "
                                   "download or re-export the whole model.")
        return [unet / s for s in shards]
    weights = unet / WEIGHTS_NAME
    if weights.is_file():
        return [weights]
    pickles = sorted(str(p.relative_to(folder)) for p in _pickle_files(folder))
    if pickles:
        raise ModelFolderError(
            f"{folder} has only pickle checkpoints ({', '.join(pickles)}), and punkdiff never unpickles "
            "because that can run arbitrary code. Convert it in an environment you trust: load it with "
            "diffusers and save it with `save_pretrained(dir, safe_serialization=True)` or "
            f"`punkdiff.hub.export_pipeline`, which write {WEIGHTS_NAME}."
        )
    raise ModelFolderError(f"Missing weights {weights}; re-export the model with punkdiff.hub.export_pipeline.")


# what a punkdiff model folder may name: the pipeline classes that load it, its two components, and the attribute
# encoder of a conditional model, as `PunkDiffPipeline.save_pretrained` lists it
_PIPELINE_CLASSES = ("DDPMPipeline", "DDIMPipeline", "PunkDiffPipeline")
_COMPONENTS = {"unet", "scheduler"}
_ENCODER_ENTRY = [AttributeEncoder.__module__, AttributeEncoder.__name__]
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# bounds shared with training presets: a sample size or schedule outside them is a broken or hostile file
_MAX_SAMPLE_SIZE, _MAX_TIMESTEPS = 4096, 100_000
_MAX_CLIP_RANGE = 1000
_TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")  # the ones diffusers' schedulers implement


def _check_palette(path: Path, channels: int) -> None:
    try:
        palette = read_palette(path)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as e:
        raise ModelFolderError(
            f"{path} is not a palette ({type(e).__name__}: {e}); it should be "
            '{"colors": ["#rrggbb", ...]}: delete it (samples are then not snapped) or re-export the model.'
        ) from e
    if palette.shape[1] != channels or len(palette) > 4096:
        raise ModelFolderError(f"{path} has {len(palette)} colours of {palette.shape[1]} channels; the UNet has "
                               f"{channels} channels: delete the file or re-export the model.")


def _check_condition(folder: Path) -> None:
    """A conditional model's `condition.json` is a vocabulary, and an attribute model has its encoder's weights."""
    path, encoder = folder / CONDITION_FILE, folder / "attribute_encoder" / WEIGHTS_NAME
    listed = "attribute_encoder" in _read_json(folder / "model_index.json")
    if not path.exists():
        if listed:
            raise ModelFolderError(f"{folder} has an attribute_encoder but no {CONDITION_FILE} (its vocabulary); "
                                   "re-export the model.")
        return
    try:
        condition = ConditionVocabulary.from_json(path.read_text())
    except (ConditionError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"{path} is not a condition vocabulary ({e}); re-export the model.") from e
    needs = condition.encoding == MULTI_HOT
    if needs != listed or (listed and not encoder.is_file()):
        wanted = f"an attribute_encoder with {encoder.relative_to(folder)}" if needs else "no attribute_encoder"
        raise ModelFolderError(f"{path} describes a {condition.encoding} condition, which needs {wanted}; the folder "
                               f"{'lists one' if listed else 'has none'}. Re-export the model.")


def _check_sampling_config(folder: Path) -> None:
    """`sampling.json`, where there is one: a known sampler, and counts and eta the model's schedule allows."""
    path = folder / SAMPLING_FILE
    if not path.exists():
        return
    fix = "fix or delete it (the model is then sampled with punkdiff's defaults), or re-export the model"
    try:
        config = read_sampling_config(path)
    except ValueError as e:
        raise ModelFolderError(f"{path} is not a usable sampling recommendation ({e}); {fix}.") from e
    timesteps = _read_json(folder / "scheduler" / "scheduler_config.json").get("num_train_timesteps", 1000)
    too_many = {k: v for k, v in (("num_inference_steps", config.num_inference_steps),
                                  ("distilled_steps", config.distilled_steps)) if v is not None and v > timesteps}
    if too_many:
        counts = ", ".join(f"{k} {v}" for k, v in too_many.items())
        raise ModelFolderError(f"{path} asks for {counts}, more than the model's {timesteps} training timesteps; "
                               f"{fix}.")


def _check_model_index(path: Path, index: object) -> None:
    """`model_index.json` names a pipeline class punkdiff loads, a diffusers UNet2DModel and a diffusers scheduler."""

    def component(name: str) -> tuple[object, object]:
        entry = index.get(name)
        return tuple(entry) if isinstance(entry, list) and len(entry) == 2 else (None, None)

    if not isinstance(index, dict):
        raise ModelFolderError(f"{path} must hold a JSON object naming the pipeline and its components; re-export.")
    if index.get("_class_name") not in _PIPELINE_CLASSES:
        raise ModelFolderError(
            f"{path} names the pipeline class {index.get('_class_name')!r}; punkdiff loads only "
            f"{', '.join(_PIPELINE_CLASSES)} folders. Use a model folder written by punkdiff's export."
        )
    scheduler_library, scheduler_class = component("scheduler")
    if component("unet") != ("diffusers", "UNet2DModel") or scheduler_library != "diffusers" or not (
        isinstance(scheduler_class, str) and _is_diffusers_scheduler(scheduler_class)
    ):
        raise ModelFolderError(
            f"{path} must list `unet` as [\"diffusers\", \"UNet2DModel\"] and `scheduler` as a diffusers scheduler "
            f"(e.g. [\"diffusers\", \"DDPMScheduler\"]); it has unet={index.get('unet')!r}, "
            f"scheduler={index.get('scheduler')!r}. Re-export the model."
        )
    if "attribute_encoder" in index and index["attribute_encoder"] != _ENCODER_ENTRY:
        raise ModelFolderError(f"{path} lists attribute_encoder as {index['attribute_encoder']!r}; punkdiff loads "
                               f"only {_ENCODER_ENTRY!r}. Re-export the model.")
    extra = sorted(k for k, v in index.items() if isinstance(v, list) and k not in {*_COMPONENTS, "attribute_encoder"})
    if extra:
        raise ModelFolderError(f"{path} lists components punkdiff does not use ({', '.join(extra)}); remove them.")


def _is_diffusers_scheduler(name: str) -> bool:
    import diffusers

    return isinstance(getattr(diffusers, name, None), type) and issubclass(getattr(diffusers, name), SchedulerMixin)


def _check_scheduler_config(path: Path, config: object) -> None:
    """The fields the samplers use, with the types and ranges they need (else they fail or sample garbage later)."""
    if not isinstance(config, dict):
        raise ModelFolderError(f"{path} must hold a JSON object; re-export the model.")
    problems = []
    if not (isinstance(config.get("_class_name"), str) and _is_diffusers_scheduler(config["_class_name"])):
        problems.append(f"_class_name must name a diffusers scheduler, got {config.get('_class_name')!r}")
    timesteps = config.get("num_train_timesteps", 1000)
    if not (isinstance(timesteps, int) and not isinstance(timesteps, bool) and 2 <= timesteps <= _MAX_TIMESTEPS):
        problems.append(f"num_train_timesteps must be an integer in [2, {_MAX_TIMESTEPS}], got {timesteps!r}")
    schedule = config.get("beta_schedule", "linear")
    if schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        problems.append(f"beta_schedule must be linear, scaled_linear or squaredcos_cap_v2, got {schedule!r}")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction", "sample"):
        problems.append(f"prediction_type must be epsilon, v_prediction or sample, got {prediction!r}")
    for key in ("beta_start", "beta_end"):
        value = config.get(key, 0.01)
        if not (_is_number(value) and 0 < value < 1):
            problems.append(f"{key} must be a number in (0, 1), got {value!r}")
    betas = config.get("trained_betas")
    if betas is not None and not (
        isinstance(betas, list) and len(betas) == timesteps and all(_is_number(b) and 0 < b < 1 for b in betas)
    ):
        shown = betas if not isinstance(betas, list) else f"a list of {len(betas)}"
        problems.append(f"trained_betas must be null or a list of num_train_timesteps ({timesteps!r}) numbers in "
                        f"(0, 1), got {shown!r}"[:300])
    spacing = config.get("timestep_spacing", "leading")
    if spacing not in _TIMESTEP_SPACINGS:
        problems.append(f"timestep_spacing must be one of {', '.join(_TIMESTEP_SPACINGS)}, got {spacing!r}")
    offset = config.get("steps_offset", 0)
    offset_limit = max(1, timesteps // 10) if isinstance(timesteps, int) else 1
    if not (isinstance(offset, int) and not isinstance(offset, bool) and 0 <= offset < offset_limit):
        problems.append(f"steps_offset must be an integer in [0, {offset_limit}) (a tenth of num_train_timesteps), "
                        f"got {offset!r}")
    clip_range = config.get("clip_sample_range", 1.0)
    if not (_is_number(clip_range) and 0 < clip_range <= _MAX_CLIP_RANGE):  # pixels lie in [-1, 1]
        problems.append(f"clip_sample_range must be a number in (0, {_MAX_CLIP_RANGE}], got {clip_range!r}")
    if not problems:
        problems = _alpha_bar_problems(config)
    if problems:
        raise ModelFolderError(f"{path} is not a usable noise schedule: {'; '.join(problems)}. Re-export the model.")


def _is_number(value: object) -> bool:
    """A JSON number that is finite (json reads NaN and Infinity as floats)."""
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int) and not isinstance(value, bool)


def _alpha_bar_problems(config: dict[str, Any]) -> list[str]:
    """What the samplers will compute from the schedule: alpha_bar_t = prod(1 - beta_s), finite, strictly
    decreasing and inside (0, 1), in the float32 the schedulers use (else x_0 = (x_t - ...) / sqrt(alpha_bar_t)
    divides by zero, or two steps are the same noise level). A zero-terminal-SNR schedule ends at exactly 0."""
    try:
        alpha_bar = DDPMScheduler.from_config(config).alphas_cumprod.double().numpy()
    except Exception as e:  # diffusers raises NotImplementedError, ValueError ... for schedules it cannot build
        return [f"diffusers cannot build this schedule ({type(e).__name__}: {e})"]
    if not np.isfinite(alpha_bar).all():
        return ["the schedule's alpha_bar (cumulative product of 1 - beta) holds NaN or infinite values"]
    if config.get("rescale_betas_zero_snr") is True and alpha_bar[-1] == 0:  # zero terminal SNR, by design
        alpha_bar = alpha_bar[:-1]  # (Lin et al. 2024): only the last step reaches pure noise
    if not (alpha_bar.min() > 0 and alpha_bar.max() < 1):
        why = "the first betas round to 0" if alpha_bar.max() >= 1 else "the betas are too large or too many"
        return [f"the schedule's alpha_bar (cumulative product of 1 - beta) must lie in (0, 1), but spans "
                f"[{alpha_bar.min():.3g}, {alpha_bar.max():.3g}] in float32: {why}"]
    flat = np.flatnonzero(np.diff(alpha_bar) >= 0)
    if flat.size:
        return [f"the schedule's alpha_bar must strictly decrease, but steps {int(flat[0])} and {int(flat[0]) + 1} "
                "have the same noise level in float32: a beta there rounds to 0"]
    return []


def _check_unet_config(path: Path, config: object) -> None:
    """Types and ranges of the UNet fields that decide shapes, before diffusers builds anything from them."""
    if not isinstance(config, dict):
        raise ModelFolderError(f"{path} must hold a JSON object; re-export the model.")

    def positive_int(value: object, limit: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= limit

    problems = [] if config.get("_class_name") == "UNet2DModel" else [
        f"_class_name must be UNet2DModel, got {config.get('_class_name')!r}"
    ]
    size = config.get("sample_size")
    sizes = size if isinstance(size, list) and len(size) == 2 else [size]
    if not all(positive_int(s, _MAX_SAMPLE_SIZE) for s in sizes):
        problems.append(f"sample_size must be an integer in [1, {_MAX_SAMPLE_SIZE}], got {size!r}")
    for key in ("in_channels", "out_channels"):
        if not positive_int(config.get(key), 64):
            problems.append(f"{key} must be an integer in [1, 64], got {config.get(key)!r}")
    channels = config.get("block_out_channels")
    if not (isinstance(channels, list) and channels and all(positive_int(c, 2**16) for c in channels)):
        problems.append(f"block_out_channels must be a list of positive integers, got {channels!r}")
    elif not problems and any(s % 2 ** (len(channels) - 1) for s in sizes):  # else the skips do not line up
        problems.append(f"sample_size {size!r} must be a multiple of {2 ** (len(channels) - 1)}: the UNet halves it "
                        f"{len(channels) - 1} times")
    if "layers_per_block" in config and not positive_int(config["layers_per_block"], 64):
        problems.append(f"layers_per_block must be an integer in [1, 64], got {config['layers_per_block']!r}")
    groups = config.get("norm_num_groups", 32)  # a bool here builds, then fails in the first forward
    if not positive_int(groups, 2**16):
        problems.append(f"norm_num_groups must be a positive integer, got {groups!r}")
    elif isinstance(channels, list) and any(positive_int(c, 2**16) and c % groups for c in channels):
        problems.append(f"norm_num_groups {groups} must divide every block_out_channels entry {channels!r}")
    if problems:
        raise ModelFolderError(f"{path} does not describe a usable UNet2DModel: {'; '.join(problems)}. Re-export it.")


def _check_weight_values(weights: Path) -> None:
    """Floating-point tensors only, every value finite: NaN or integer weights would sample garbage without error."""
    with safe_open(weights, framework="pt") as f:
        for key in f.keys():  # noqa: SIM118
            dtype = f.get_slice(key).get_dtype()
            if dtype not in _FLOAT_DTYPES:
                raise ModelFolderError(
                    f"{weights}: tensor {key} is {dtype}, not floating point; re-export the model from float weights."
                )
            if not torch.isfinite(f.get_tensor(key)).all():
                raise ModelFolderError(
                    f"{weights}: tensor {key} holds NaN or infinite values (training diverged); export an earlier, "
                    "finite checkpoint instead."
                )


def model_folder(model: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A validated model folder: `model` itself if it is a local path, else a Hub model id, downloaded.

    Only configs, safetensors weights, the model card and sample images are downloaded (never a pickle or code),
    then checked like a local folder. Offline, or for an unknown id, the error says so and what to pass instead.
    `cache_dir` replaces the Hub cache folder (a server keeps downloads inside the folders it may write).

    Examples:
        ```py
        >>> model_folder("outputs/mnist16/pipeline")
        PosixPath('outputs/mnist16/pipeline')
        >>> model_folder("your-name/punkdiff-mnist")  # from the Hub cache, downloaded if needed
        PosixPath('/root/.cache/huggingface/hub/models--your-name--punkdiff-mnist/snapshots/...')
        ```
    """
    path = Path(model).expanduser()
    if path.exists() or not _is_repo_id(str(model)):
        return validate_model_folder(path)
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            str(model), allow_patterns=["*.json", "*.safetensors", "README.md", "*.png"], cache_dir=cache_dir
        )
    except (OSError, ValueError) as e:  # offline, unknown repo, no access, bad id
        raise ModelFolderError(
            f"{model} is not a local folder, and the Hub model {model!r} could not be downloaded "
            f"({type(e).__name__}: {str(e).splitlines()[0]}); check the id, your connection and login, or pass a "
            "local folder"
        ) from e
    return validate_model_folder(local)


def load_pipeline(model: str | os.PathLike[str], **kwargs: Any) -> PunkDiffPipeline:
    """Validate a model folder (or download a Hub id), then load it as a `PunkDiffPipeline` from safetensors only.

    `kwargs` go to `from_pretrained` (e.g. `dtype`).

    Examples:
        ```py
        >>> pipe = load_pipeline("outputs/mnist16/pipeline", dtype=torch.bfloat16)
        ```
    """
    return PunkDiffPipeline.from_pretrained(model_folder(model), use_safetensors=True, **kwargs)


def push_to_hub(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
) -> str:
    """Upload a validated model folder to `repo_id` (created if needed) in one commit; returns its URL (or the PR's).

    The one way punkdiff publishes a model: `punkdiff push` and `train --push-to-hub` both end here, with public
    `huggingface_hub` APIs only (`PunkDiffPipeline.push_to_hub` is diffusers' own, with diffusers' card). The
    uploaded README.md names the repo in its loading snippets (the local one says `LOCAL_MODEL_REF`, and is left
    unchanged); every other file is uploaded as it is, without a copy. The token defaults to the usual Hugging Face
    login (`hf auth login` or `HF_TOKEN`); punkdiff never stores it. Folders with pickle files are refused so that
    nothing unsafe to load is published.

    Examples:
        ```py
        >>> push_to_hub("outputs/mnist16/pipeline", "your-name/punkdiff-mnist", private=True)
        'https://huggingface.co/your-name/punkdiff-mnist'
        ```
    """
    folder = validate_model_folder(folder)
    pickles = sorted(str(p.relative_to(folder)) for p in _pickle_files(folder))
    if pickles:
        raise ModelFolderError(f"{folder} contains pickle files ({', '.join(pickles)}); remove them before pushing.")
    try:
        api = HfApi(token=token)
        # `private=None` leaves a new repo's visibility to the account's or organisation's default.
        repo_url = api.create_repo(repo_id, private=private or None, exist_ok=True, repo_type="model")
        files = filter_repo_objects(
            sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()),
            ignore_patterns=DEFAULT_IGNORE_PATTERNS,  # as upload_folder: no .git/ or .cache/huggingface/
        )
        operations = [CommitOperationAdd(path, str(folder / path)) for path in files if path != "README.md"]
        if (folder / "README.md").is_file():
            # The Hub's id (a bare name gets the user's namespace), which create_repo has validated: safe to quote.
            readme = (folder / "README.md").read_bytes()
            readme = readme.replace(f'"{LOCAL_MODEL_REF}"'.encode(), f'"{repo_url.repo_id}"'.encode())
            operations.append(CommitOperationAdd("README.md", readme))
        commit = api.create_commit(
            repo_url.repo_id,
            operations,
            commit_message=commit_message or "Upload punkdiff model",
            repo_type="model",
            create_pr=create_pr,
        )
    except Exception as err:  # the Hub client raises many types (HTTP status, connection, timeout, validation)
        raise PushError(
            f"the push to {repo_id} failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            f"check your connection and login (`hf auth login` or HF_TOKEN, with write access to {repo_id}), "
            f"then push again; {folder} is unchanged"
        ) from err
    return commit.pr_url or str(repo_url)


def _is_repo_id(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None


def _is_hub_dataset(dataset: str | None) -> bool:
    """Only a `namespace/name` that is not a local path goes into the card's `datasets` metadata and links."""
    return bool(dataset) and _is_repo_id(dataset) and not Path(dataset).exists()


def _dataset_name(dataset: str | None) -> str | None:
    """A Hub id as it is; a local path by its folder name only, so a card never publishes a machine's file layout."""
    if dataset is None or _is_hub_dataset(dataset) or not (Path(dataset).is_absolute() or Path(dataset).exists()):
        return dataset
    return Path(dataset).resolve().name


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelFolderError(f"Missing {path}; pass a folder written by punkdiff's export or save_pretrained.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"{path} is not valid JSON ({e}); re-export the model.") from e
    except RecursionError:  # JSON nested thousands deep: no config of ours is more than three levels
        raise ModelFolderError(f"{path} is nested too deeply to be a model config; re-export the model.") from None


def _pickle_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES]


def _side(sample_size: int | list[int] | tuple[int, ...]) -> int:
    return sample_size if isinstance(sample_size, int) else sample_size[0]


def _recover_interrupted_move(target: Path) -> None:
    """A kill between the two renames of `_move_into_place` leaves only the old export, moved aside: put it back."""
    aside = sorted(target.parent.glob(f".{target.name}.old-*"))
    if aside and not target.exists():
        aside.pop().rename(target)
    for old in aside:
        shutil.rmtree(old, ignore_errors=True)


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename `staging` to `target`; an old `target` is moved aside first and deleted only afterwards."""
    if not target.exists():
        staging.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    target.rename(old)
    staging.rename(target)
    shutil.rmtree(old)
