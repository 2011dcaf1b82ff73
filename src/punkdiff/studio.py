"""What the web app does with a trained model: find it, load it once, sample, inpaint and reconstruct.

Every function takes plain values and returns pictures ready to show (upscaled with nearest, so pixel art
stays crisp) and files ready to download, so the Gradio page only wires widgets to them. Paths come in
through `punkdiff.roots.Roots`, so nothing outside the app's folders is opened or written.

Example:
    >>> roots = Roots(models=["outputs"], runs="punkdiff-runs")
    >>> model = resolve_model("mnist16/pipeline", roots)
    >>> pipe, info = load_model(model)
    >>> result = sample(pipe, info, "ddim", steps=50, eta=0.0, seed=0, batch_size=16, out_dir=roots.runs / "generated")
    >>> result.grid_path, result.animation_path
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from punkdiff.data import BUILTIN_DATASETS, ImageTransform, load_image_dataset
from punkdiff.pipelines.punkdiff_pipeline import (
    CLASS_INDEX,
    MULTI,
    SAMPLERS,
    SINGLE,
    ConditionVocabulary,
    SamplingConfig,
    check_guidance_scale,
)
from punkdiff.presets import MAX_SAMPLING_SEED, PRESETS, DataSpec
from punkdiff.roots import HUB_ID, PathOutsideRoots, Roots
from punkdiff.seeds import image_generators
from punkdiff.visuals import display_scale, image_grid, save_gif, trajectory_frames

# how the page names the pipeline's samplers (`SAMPLERS`); a sampler without a label here is shown by its name
SAMPLER_LABELS = {
    "ddpm": "DDPM",
    "ddim": "DDIM",
    "ddim-trailing": "DDIM, trailing steps",
    "dpm++": "DPM-Solver++ 2M",
    "dpm++-karras": "DPM-Solver++ 2M, Karras",
    "unipc": "UniPC",
    "unipc-karras": "UniPC, Karras",
}
ANY = "(any)"  # a choice that leaves a condition unspecified
MAX_BATCH = 64
ProgressCallback = Callable[[int, int], None]


class StudioError(ValueError):
    """Input the app cannot use (a number out of range, an empty mask); the message says what to change."""


@dataclass(frozen=True)
class ModelInfo:
    """What the page needs to know about a loaded model, read from its folder without running it.

    Attributes:
        path: The model folder.
        resolution: Image side in pixels.
        channels: 1 (grayscale) or 3 (RGB).
        num_train_timesteps: Length of the training noise schedule (the range of t).
        data: How real images are prepared for this model (background, resize filter, crop), taken from the
            run's `training_summary.json` or the preset the model card names, so an uploaded punk is
            composited on the same blue-grey and resized with nearest, as in training.
        trained_on: The dataset named by the run or the card, if any.
        sampling: How the model is meant to be sampled (`punkdiff.sampling.recommended_sampling`): the Generate
            tab's defaults; a distilled student's step count among them.
        condition: A conditional model's vocabulary (what it can be asked for); None when it is unconditional.
    """

    path: Path
    resolution: int
    channels: int
    num_train_timesteps: int
    data: DataSpec
    trained_on: str | None = None
    sampling: SamplingConfig | None = None
    condition: ConditionVocabulary | None = None

    def describe(self) -> str:
        kind = "grayscale" if self.channels == 1 else "RGB"
        on = f", trained on {self.trained_on}" if self.trained_on else ""
        asked = f", conditioned on {', '.join(self.condition.columns)}" if self.condition else ""
        distilled = self.sampling.distilled_steps if self.sampling else None
        student = f", distilled to {distilled} steps" if distilled else ""
        return f"{self.resolution}x{self.resolution} {kind}, T = {self.num_train_timesteps}{on}{asked}{student}"


@dataclass(frozen=True)
class ConditionForm:
    """What a conditional model can be asked for, laid out as the Generate tab offers it.

    A model conditioned on one single-label column (digits) gets a picker of its classes; a model conditioned on
    attributes (a punk's type and accessories) gets a builder: a choice from its first single-label column and
    checkboxes from its first multi-label column. Other columns are left unspecified (`others`).

    Attributes:
        kind: `"labels"` (a digit picker), `"attributes"` (a punk builder) or None (an unconditional model).
        choice_column: The single-label column the choice picks from (`label`, `type`), if any.
        choices: Its names, in the vocabulary's order.
        set_column: The multi-label column the checkboxes pick from (`accessories`), if any.
        set_names: Its names.
        others: Columns the page does not offer; they stay unspecified.
    """

    kind: str | None = None
    choice_column: str | None = None
    choices: tuple[str, ...] = ()
    set_column: str | None = None
    set_names: tuple[str, ...] = ()
    others: tuple[str, ...] = ()

    @classmethod
    def of(cls, condition: ConditionVocabulary | None) -> ConditionForm:
        """The form for a model's vocabulary (None: an unconditional model, no form)."""
        if condition is None:
            return cls()
        singles = [g for g in condition.groups if g.kind == SINGLE]
        multis = [g for g in condition.groups if g.kind == MULTI]
        shown = singles[:1] + multis[:1]
        return cls(
            kind="labels" if condition.encoding == CLASS_INDEX else "attributes",
            choice_column=singles[0].column if singles else None,
            choices=singles[0].names if singles else (),
            set_column=multis[0].column if multis else None,
            set_names=multis[0].names if multis else (),
            others=tuple(g.column for g in condition.groups if g not in shown),
        )

    def request(self, choice: str | None = None, chosen: Sequence[str] | None = None,
                model_chooses_set: bool = False, guidance_scale: float = 1.0) -> dict[str, Any]:
        """The keywords of `sample` (`labels=` or `attributes=`, and `guidance_scale=`) for what the form says.

        `choice` is a class name (or `ANY`/None: unspecified); `chosen` the ticked names of the multi-label
        column: none ticked asks for none of them (a bare punk) unless `model_chooses_set`, which leaves the
        column unspecified. Nothing specified at all asks for nothing: the model's unconditional samples. An
        unconditional model has no form (the page hides it), so its request is empty whatever the widgets hold.
        Names are checked by the pipeline, which refuses unknown ones with the known ones listed.

        Examples:
            ```py
            >>> ConditionForm.of(punks).request("Ape", ["Cap"], guidance_scale=3.0)
            {'attributes': {'type': 'Ape', 'accessories': ['Cap']}, 'guidance_scale': 3.0}
            >>> ConditionForm.of(digits).request("7")
            {'labels': '7', 'guidance_scale': 1.0}
            ```
        """
        if self.kind is None:
            return {}
        choice = None if choice in (None, "", ANY) else choice
        chosen = list(chosen or [])
        if self.kind == "labels":
            return {"labels": choice, "guidance_scale": guidance_scale}
        attributes: dict[str, Any] = {}
        if self.choice_column and choice is not None:
            attributes[self.choice_column] = choice
        if self.set_column and not model_chooses_set:
            attributes[self.set_column] = chosen
        elif chosen:
            raise StudioError(f"{', '.join(chosen)} ticked, but the model is to choose the {self.set_column}: "
                              f"untick them, or let the ticked {self.set_column} be the request")
        return {"attributes": attributes or None, "guidance_scale": guidance_scale}


@dataclass
class SampleResult:
    images: list[Image.Image]
    grid: Image.Image
    grid_path: Path
    animation_path: Path
    notes: list[str] = field(default_factory=list)  # what the user should know about these samples


# --- finding and loading models -------------------------------------------------------------------------


def find_models(roots: Roots, max_depth: int = 4) -> list[Path]:
    """Model folders (holding `model_index.json`) under the model roots and the run root, sorted."""
    return sorted({p for p in roots.walk("models", max_depth) if (p / "model_index.json").is_file()})


def find_datasets(roots: Roots, max_depth: int = 2) -> list[Path]:
    """Dataset folders under the data roots: Hub layout (a dataset card or `data/`) or a folder of images."""

    def is_dataset(folder: Path) -> bool:
        if (folder / "data").is_dir() or (folder / "dataset_info.json").is_file():
            return True
        readme = folder / "README.md"
        if readme.is_file() and "dataset_info" in readme.read_text(errors="replace")[:4000]:
            return True
        return any(p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") for p in _first_files(folder, 50))

    return sorted(p for p in roots.walk("data", max_depth) if is_dataset(p))


def resolve_model(ref: str, roots: Roots, *, allow_hub: bool | None = None) -> Path:
    """A model folder inside the roots, from a path (relative to a root, or absolute) or a Hub id.

    A Hub id (`owner/name`) that is not a local folder is downloaded by `punkdiff.hub.model_folder` (configs,
    safetensors and the card only) into the Hub cache layout under `<run root>/hub`; refused when the app is
    offline (`HF_HUB_OFFLINE=1`).
    """
    text = (ref or "").strip()
    try:
        return roots.check_model(roots.resolve(text, "models"))  # every file in it, links followed
    except FileNotFoundError:
        if not HUB_ID.match(text):
            raise
    if allow_hub is None:
        from huggingface_hub import constants

        allow_hub = not constants.HF_HUB_OFFLINE
    if not allow_hub:
        raise StudioError(
            f"{text} is not a model folder here, and this app is offline (HF_HUB_OFFLINE=1), so it cannot be "
            "fetched from the Hub: pick a model from the list"
        )
    from punkdiff.hub import model_folder

    return roots.check_model(model_folder(text, cache_dir=roots.runs / "hub"))  # the download stays in the run root


class ModelCache:
    """Loaded pipelines by folder (a small LRU), reloaded when the weights file changes (a re-export)."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._items: OrderedDict[Path, tuple[float, object, ModelInfo]] = OrderedDict()
        self._lock = threading.Lock()

    def load(self, folder: Path):
        """`(PunkDiffPipeline, ModelInfo)` for a model folder; validated before loading (safetensors only)."""
        from punkdiff.hub import load_pipeline
        from punkdiff.sampling import recommended_sampling

        stamp = _weights_mtime(folder)
        # One load at a time: a page that opens asks for its model from several handlers at once, and they
        # should share one load, not race to make three.
        with self._lock:
            cached = self._items.get(folder)
            if cached and cached[0] == stamp:
                self._items.move_to_end(folder)
                return cached[1], cached[2]
            pipe = load_pipeline(folder)
            pipe.set_progress_bar_config(desc="sampling")
            info = replace(model_info(folder), sampling=recommended_sampling(pipe), condition=pipe.condition)
            self._items[folder] = (stamp, pipe, info)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return pipe, info


def model_info(folder: Path) -> ModelInfo:
    """Resolution, channels and T from the JSON configs; data preparation from the run or the card."""
    unet = json.loads((folder / "unet" / "config.json").read_text())
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    size = unet["sample_size"] if isinstance(unet["sample_size"], int) else unet["sample_size"][0]
    data, trained_on = _training_data_spec(folder)
    data = replace(data, resolution=size, channels=unet["in_channels"])
    return ModelInfo(folder, size, unet["in_channels"], scheduler["num_train_timesteps"], data, trained_on)


def _training_data_spec(folder: Path) -> tuple[DataSpec, str | None]:
    summary = folder.parent / "training_summary.json"
    if summary.is_file():
        data = json.loads(summary.read_text())["config"]["data"]
        return DataSpec(**{k: v for k, v in data.items() if k in DataSpec.__dataclass_fields__}), data.get("dataset")
    card = folder / "README.md"
    if card.is_file():  # a model without its run: the card's YAML header names the preset and the data
        from huggingface_hub import ModelCard

        try:
            header = ModelCard.load(card).data.to_dict()
        except (ValueError, OSError, yaml.YAMLError):  # a header that is not YAML: the model still loads
            return DataSpec(), None
        meta = header.get("punkdiff") if isinstance(header.get("punkdiff"), dict) else {}
        listed = header.get("datasets")
        preset = meta.get("preset")
        dataset = meta.get("dataset") or (listed[0] if isinstance(listed, list) and listed else None)
        if isinstance(preset, str) and preset in PRESETS:
            return replace(PRESETS[preset].data), dataset if isinstance(dataset, str) else None
    return DataSpec(), None


# --- sampling -------------------------------------------------------------------------------------------


def sampler_choices() -> list[tuple[str, str]]:
    """`(label, name)` for every sampler the pipeline runs (`SAMPLERS`), in its order, for a Radio or Dropdown."""
    return [(SAMPLER_LABELS.get(name, name), name) for name in SAMPLERS]


def uses_eta(sampler: str) -> bool:
    """Whether `eta` changes what `sampler` draws (the DDIM samplers), so the page can grey it out otherwise."""
    return SAMPLERS[_sampler_name(sampler)].uses_eta


def sampling_note(config: SamplingConfig | None) -> str:
    """What the Generate tab says about a model's recommended sampling; for a student, the count it holds at."""
    if config is None:
        return ""
    how = f"{SAMPLER_LABELS.get(config.sampler, config.sampler)}, {config.num_inference_steps} steps"
    if SAMPLERS[config.sampler].uses_eta:
        how += f", eta {config.eta:g}"
    if config.distilled_steps:
        return (f"This model is a student distilled to sample in **{config.distilled_steps} steps** ({how}): "
                f"its quality is only guaranteed at {config.distilled_steps} steps.")
    return f"Recommended for this model: {how}."


def sample(
    pipe,
    info: ModelInfo,
    scheduler: str,
    steps: int,
    eta: float,
    seed: int,
    batch_size: int,
    out_dir: Path,
    progress: ProgressCallback | None = None,
    *,
    labels: str | int | None = None,
    attributes: dict[str, Any] | None = None,
    guidance_scale: float = 1.0,
) -> SampleResult:
    """Sample a batch; write the grid and the denoising animation (x_t beside the predicted x_0) to `out_dir`.

    Image i uses seed + i, as `punkdiff sample` does, so it is the same whatever the batch size. A conditional
    model draws what `labels` (a digit) or `attributes` (`ConditionForm.request`) ask for, guided by
    `guidance_scale`; asked for nothing, it draws its unconditional samples, where guidance does not apply (a
    note says so). Everything is checked before the first step: nothing is written for a request it refuses.
    Warnings of the pipeline (a student sampled at another step count than it was distilled for) come back in
    `notes`.
    """
    scheduler = _sampler_name(scheduler)
    steps = _check_int("steps", steps, 1, info.num_train_timesteps)
    batch_size = _check_int("batch size", batch_size, 1, MAX_BATCH)
    seed = _check_int("seed", seed, 0, MAX_SAMPLING_SEED)
    if not 0.0 <= float(eta) <= 1.0:
        raise StudioError(f"eta must be between 0 (deterministic DDIM) and 1 (DDPM-like), got {eta}")
    try:
        guidance_scale = check_guidance_scale(guidance_scale)
    except ValueError as err:
        raise StudioError(str(err)) from None
    notes = []
    if labels is None and attributes is None and guidance_scale != 1.0 and getattr(pipe, "condition", None):
        notes.append("Nothing was asked for, so guidance does not apply: these are the model's unconditional "
                     "samples.")
        guidance_scale = 1.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            out = pipe(
                batch_size=batch_size,
                labels=labels,
                attributes=attributes,
                guidance_scale=guidance_scale,
                generator=image_generators(seed, batch_size),
                num_inference_steps=steps,
                eta=float(eta),
                sampler=scheduler,
                return_trajectory=True,
                callback_on_step_end=_callback(progress, steps),
            )
        except ValueError as err:  # the pipeline's checks: an unknown class or accessory, a condition given to an
            raise StudioError(str(err)) from None  # unconditional model; all before its first step
    notes += [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    scale = display_scale(info.resolution, target=96)
    grid = image_grid(out.images, scale=scale, gap=1)
    out_dir = _new_output_folder(out_dir)
    grid.save(out_dir / "grid.png")
    frames = trajectory_frames(out.trajectory, out.pred_original_samples, display_scale(info.resolution, 64))
    animation = save_gif(frames, out_dir / "denoising.gif")
    return SampleResult(out.images, grid, out_dir / "grid.png", animation, notes)


# --- real images, masks, inpainting, reconstruction -----------------------------------------------------


def prepare_image(image: Image.Image, info: ModelInfo) -> Image.Image:
    """A real image as the model sees it: composited on the training background, cropped, resized, L or RGB."""
    array = ImageTransform.from_spec(info.data)(image)  # [C, H, W] uint8
    return Image.fromarray(array[0], "L") if info.channels == 1 else Image.fromarray(array.transpose(1, 2, 0), "RGB")


def dataset_image(source: str, index: int, split: str = "train") -> Image.Image:
    """Image `index` of a dataset (a folder already resolved inside the data roots, or a built-in name)."""
    if source not in BUILTIN_DATASETS and not Path(source).is_absolute():
        raise PathOutsideRoots(f"{source} must be resolved inside the data roots first")
    dataset, column = _cached_dataset(source, split)
    index = _check_int("image index", index, 0, len(dataset) - 1)
    return dataset[index][column]


def upscale(image: Image.Image, target: int = 384) -> Image.Image:
    """Nearest-neighbour upscale to about `target` pixels wide: every model pixel stays a crisp square."""
    scale = display_scale(image.width, target)
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def mask_from_layers(layers: Sequence[np.ndarray], resolution: int, coverage: float = 0.25) -> Image.Image:
    """The painted strokes of an image editor (RGBA layers at display size) as a model-size mask.

    A model pixel is masked (white, 255: to be generated) when at least `coverage` of its upscaled square is
    painted, so a brush stroke that touches a pixel's edge does not count, one that covers a quarter does.
    """
    painted = None
    for layer in layers:
        if layer is None:
            continue
        layer = np.asarray(layer)
        alpha = layer[..., 3] if layer.ndim == 3 and layer.shape[-1] == 4 else (layer.reshape(*layer.shape[:2], -1) > 0)
        painted = alpha > 0 if painted is None else painted | (alpha > 0)
    if painted is None or not painted.any():
        raise StudioError("Nothing is painted: paint over the part of the image to replace, then press Inpaint.")
    share = Image.fromarray(painted.astype(np.uint8) * 255, "L").resize((resolution, resolution), Image.Resampling.BOX)
    return Image.fromarray(((np.asarray(share) / 255.0 >= coverage) * 255).astype(np.uint8), "L")


def inpaint(
    pipe,
    image: Image.Image,
    mask: Image.Image,
    steps: int,
    jump_length: int,
    jump_n_sample: int,
    seed: int,
    num_images: int = 1,
) -> list[Image.Image]:
    """Fill the white part of `mask` with the unconditional model (RePaint); the rest of `image` is kept.

    Several fills of one image use seeds seed, seed + 1, ... (one generator per image).
    """
    T = pipe.scheduler.config.num_train_timesteps
    steps = _check_int("steps", steps, 1, T)
    jump_length = _check_int("jump length", jump_length, 1, steps)
    jump_n_sample = _check_int("resampling", jump_n_sample, 1, 50)
    num_images = _check_int("number of fills", num_images, 1, 16)
    seed = _check_int("seed", seed, 0, MAX_SAMPLING_SEED)
    out = pipe.inpaint(
        [image] * num_images,
        mask,
        num_inference_steps=steps,
        jump_length=jump_length,
        jump_n_sample=jump_n_sample,
        generator=image_generators(seed, num_images),
    )
    return out.images


def reconstruct(
    pipe,
    info: ModelInfo,
    image: Image.Image,
    t_start: int,
    scheduler: str,
    steps: int,
    seed: int,
    out_dir: Path,
    progress: ProgressCallback | None = None,
) -> tuple[Image.Image, float, Path]:
    """Noise `image` to step `t_start`, denoise it back; return the result, its MSE to the input and a GIF."""
    t_start = _check_int("t", t_start, 0, info.num_train_timesteps - 1)
    steps = _check_int("steps", steps, 1, info.num_train_timesteps)
    seed = _check_int("seed", seed, 0, MAX_SAMPLING_SEED)
    try:
        out = pipe.reconstruct(
            image,
            t_start=t_start,
            generator=image_generators(seed, 1),
            num_inference_steps=steps,
            sampler=_sampler_name(scheduler),
            return_trajectory=True,
            callback_on_step_end=_callback(progress, steps),
        )
    except ValueError as err:  # e.g. no scheduled step below a very small t
        raise StudioError(str(err)) from err
    result = out.images[0]
    mse = float(np.mean((np.asarray(result, np.float64) / 255 - np.asarray(image, np.float64) / 255) ** 2))
    frames = trajectory_frames(out.trajectory, out.pred_original_samples, display_scale(info.resolution, 128))
    animation = save_gif(frames, _new_output_folder(out_dir) / "reconstruction.gif")
    return result, mse, animation


def side_by_side(images: Sequence[Image.Image], target: int = 192, gap: int = 8) -> Image.Image:
    """Images upscaled (nearest) and placed in a row on white, e.g. original | mask | result."""
    tiles = [upscale(im.convert("RGB"), target) for im in images]
    width = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    strip = Image.new("RGB", (width, max(t.height for t in tiles)), "white")
    x = 0
    for tile in tiles:
        strip.paste(tile, (x, 0))
        x += tile.width + gap
    return strip


def show_mask(image: Image.Image, mask: Image.Image, colour: tuple[int, int, int] = (255, 0, 255)) -> Image.Image:
    """`image` with its masked pixels painted in `colour`: what the model will replace."""
    rgb = np.array(image.convert("RGB"))
    rgb[np.asarray(mask) > 127] = colour
    return Image.fromarray(rgb)


# --- helpers --------------------------------------------------------------------------------------------


def _sampler_name(name: str) -> str:
    """A sampler's name in `SAMPLERS` from its name (any case) or its label in the page."""
    text = str(name or "").strip()
    by_label = {label.lower(): key for key, label in SAMPLER_LABELS.items()}
    key = by_label.get(text.lower(), text.lower())
    if key not in SAMPLERS:
        raise StudioError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}")
    return key


def _check_int(name: str, value, low: int, high: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise StudioError(f"{name} must be a whole number, got {value!r}") from None
    if not number.is_integer() or not low <= number <= high:
        raise StudioError(f"{name} must be a whole number from {low} to {high}, got {value}")
    return int(number)


def _callback(progress: ProgressCallback | None, total: int):
    if progress is None:
        return None

    def on_step(pipe, i, t, kwargs):
        progress(i + 1, total)
        return kwargs

    return on_step


def _new_output_folder(root: Path) -> Path:
    folder = Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    folder.mkdir(parents=True)
    return folder


def _weights_mtime(folder: Path) -> float:
    try:
        return (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime
    except OSError:
        return 0.0


def _first_files(folder: Path, limit: int) -> list[Path]:
    files = []
    try:
        for entry in os.scandir(folder):
            if entry.is_file():
                files.append(Path(entry.path))
                if len(files) >= limit:
                    break
    except OSError:
        pass
    return files


_DATASETS: OrderedDict[tuple[str, str], tuple[object, str]] = OrderedDict()
_DATASETS_LOCK = threading.Lock()


def _cached_dataset(source: str, split: str):
    """`datasets` objects are memory-mapped, so keeping the last few open is cheap and saves a reload."""
    key = (source, split)
    with _DATASETS_LOCK:
        if key in _DATASETS:
            _DATASETS.move_to_end(key)
            return _DATASETS[key]
    loaded = load_image_dataset(source, split)
    with _DATASETS_LOCK:
        _DATASETS[key] = loaded
        while len(_DATASETS) > 4:
            _DATASETS.popitem(last=False)
    return loaded
