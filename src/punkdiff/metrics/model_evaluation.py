"""`evaluate_model`: everything `punkdiff eval` does, as one library call.

Sample from a model (or read existing images), score them beside their real-vs-real floors (`evaluate`), add the
reconstruction study, write `metrics.json`, `report.md` and the figures, and, when asked, the numbers into the
model's card. A conditional model is asked for conditions drawn as the data (and, per class, balanced ones), and
its classifier-scored "asked against drawn" goes beside its floor (`punkdiff.metrics.conditional`). `punkdiff eval`
only turns its flags into `EvalOptions` and calls this; the web app's evaluation job
runs that command, so both go through the same code.

Every input is checked before the slow work starts (sampling, classifier training, feature networks), so a
mistake costs seconds, not the run.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from punkdiff.files import atomic_path
from punkdiff.metrics.classifiers import Classifier
from punkdiff.metrics.evaluation import MIN_IMAGES, Evaluation, evaluate
from punkdiff.metrics.feature_networks import (
    DINOV2_ENV,
    INCEPTION_ENV,
    load_dinov2,
    load_inception,
    resolve_weights,
)
from punkdiff.metrics.real_images import ReferenceData, load_reference, model_transform, read_images
from punkdiff.metrics.report import write_report
from punkdiff.pipelines import PunkDiffPipeline
from punkdiff.pipelines.punkdiff_pipeline import SAMPLERS

SAMPLES_FILE = "samples.npy"  # the generated images an evaluation scored, beside its report
PER_CLASS = 100  # balanced requests per class of a conditional model, by default

class EvaluationError(ValueError):
    """Options an evaluation cannot use; the message says what was wrong and what to do."""


@dataclass
class EvalOptions:
    """What to evaluate and how; the fields are `punkdiff eval`'s flags.

    Attributes:
        reference: The dataset the model learned (Hub id or local folder).
        out: Folder for `metrics.json`, `report.md` and the figures.
        model: The model folder or Hub id: its `training_summary.json` gives the preprocessing, and its card
            receives the numbers with `update_card`. Loaded from here unless a pipeline is passed.
        samples: Score these images (a folder of images or a uint8 `.npy`) instead of sampling.
        preset: Preprocessing (and, without a model, resolution) of the training data.
        split, heldout_split: The training split, and real images the model never saw (default: test/validation
            if the dataset has one, else half of `split`).
        num_samples, batch_size, scheduler, steps, eta, seed: The sampling (sample i uses seed + i; the metrics'
            random draws use the seed too). A sampler, steps or eta left `None` is the model's recommendation
            (`punkdiff.sampling.recommended_sampling`); steps still unknown (another sampler) are 50.
        guidance_scale: A conditional model's classifier-free guidance (default 1: the conditional model alone).
        per_class: A conditional model's balanced requests: this many images of each class of its single-label
            column, scored for per-class accuracy (0 skips them; default `PER_CLASS`).
        reconstruction_images: Held-out images for the reconstruction study (0 skips it).
        inception_weights: The FID Inception as safetensors (default: `$PUNKDIFF_INCEPTION_WEIGHTS`); without it,
            FID, KID (Inception) and IS are reported as not computed.
        dinov2: A local transformers DINOv2 folder (default: `$PUNKDIFF_DINOV2`); without it, FD-DINOv2 is not
            computed.
        update_card: Also write the metrics into the model's card (a local model folder only).
        cache_dir: Decoded reference images and classifiers (default: `~/.cache/punkdiff`).
    """

    reference: str
    out: str | Path = "eval"
    model: str | None = None
    samples: str | None = None
    preset: str | None = None
    split: str = "train"
    heldout_split: str | None = None
    num_samples: int = 1000
    batch_size: int = 250
    scheduler: str | None = None
    steps: int | None = None
    eta: float | None = None
    seed: int = 0
    guidance_scale: float | None = None
    per_class: int | None = None
    reconstruction_images: int = 64
    inception_weights: str | None = None
    dinov2: str | None = None
    update_card: bool = False
    cache_dir: str | None = None


@dataclass
class ModelEvaluation:
    """What `evaluate_model` produced: the scores, the report's path, the updated card's path (or None) and, for
    a conditional model, what was asked against what was drawn (`conditional_evaluation`'s entry, else None)."""

    evaluation: Evaluation
    report: Path
    card: Path | None
    conditional: dict[str, Any] | None = None


def evaluate_model(
    options: EvalOptions, pipe: PunkDiffPipeline | None = None, *, progress: bool = True
) -> ModelEvaluation:
    """Sample (or read) images, score them beside their floors, write the report and, if asked, the card.

    `pipe` is the model to sample from, already on its device; without it, `options.model` is loaded (on CPU).

    Examples:
        ```py
        >>> result = evaluate_model(EvalOptions("../shared/datasets/mnist", out="eval/mnist16",
        ...                                     model="outputs/mnist16/pipeline", num_samples=5000))
        >>> result.evaluation.metrics["fd_classifier"], result.report
        ({'model': 3.1, 'floor': 1.3, 'better': 'lower'}, PosixPath('eval/mnist16/report.md'))
        ```
    """
    from punkdiff.presets import get_preset

    o = options
    if pipe is None and o.model is None and (o.samples is None or o.preset is None):
        raise EvaluationError("give a MODEL to sample from, or --samples with --preset (resolution and preprocessing)")
    out = Path(o.out)
    if out.is_file():
        raise EvaluationError(f"--out {out} is a file; give a folder (created if missing)")
    if o.samples is None and o.num_samples < MIN_IMAGES:
        raise EvaluationError(f"--num-samples {o.num_samples} is too few to score; use at least {MIN_IMAGES}")
    _check_writable(out)  # before sampling, so the samples always have a place to go
    card_folder = _card_folder(o) if o.update_card else None
    networks = _feature_networks(o)
    if pipe is None and o.model is not None:
        from punkdiff.hub import load_pipeline

        pipe = load_pipeline(o.model)
    if pipe is not None:
        o = _with_recommended_sampling(o, pipe)
    if pipe is not None and o.steps > pipe.scheduler.config.num_train_timesteps:
        raise EvaluationError(f"--steps {o.steps} is more than the model's "
                              f"{pipe.scheduler.config.num_train_timesteps} training timesteps")
    o = _with_condition_options(o, pipe)

    if pipe is not None:
        resolution, channels = pipe.unet.config.sample_size, pipe.unet.config.in_channels
    else:
        resolution, channels = get_preset(o.preset).data.resolution, get_preset(o.preset).data.channels
    transform, origin = model_transform(resolution, channels, preset=o.preset, model_dir=o.model)
    samples = read_images(o.samples, transform) if o.samples else None
    if samples is not None and len(samples) < MIN_IMAGES:
        raise EvaluationError(f"--samples {o.samples} holds {len(samples)} images, too few to score; give at least "
                              f"{MIN_IMAGES}")
    reference = load_reference(o.reference, transform, split=o.split, heldout_split=o.heldout_split, seed=o.seed,
                               cache_dir=o.cache_dir, progress=progress)
    requests = _ConditionalRequests.draw(pipe, o, reference, progress) if o.guidance_scale is not None else None
    start = time.perf_counter()
    balanced = None
    if samples is None:  # the sampling is the slow part: keep it, so `--samples OUT/samples.npy` re-scores it
        samples = _sample(pipe, o, progress, requests.data if requests else None)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / SAMPLES_FILE) as tmp, open(tmp, "wb") as handle:
            np.save(handle, samples, allow_pickle=False)
        if requests is not None and requests.balanced:  # seeds after the data-distributed samples' own
            balanced = (_sample(pipe, replace(o, seed=o.seed + o.num_samples), progress, requests.balanced),
                        requests.balanced)
    sampling_s = time.perf_counter() - start
    classifier = {"classifier": requests.classifier} if requests is not None else {}
    result = evaluate(samples, reference, seed=o.seed, cache_dir=o.cache_dir, progress=progress, **networks,
                      **classifier)
    conditional = None
    if requests is not None:
        from punkdiff.metrics.conditional import conditional_evaluation

        conditional = conditional_evaluation(requests.classifier, reference, pipe.condition.columns,
                                             o.guidance_scale, samples, requests.data, balanced)
    study = None
    if pipe is not None and o.reconstruction_images > 0:
        from punkdiff.metrics.reconstruction import reconstruction_study

        originals = reference.heldout[: o.reconstruction_images]
        study = (reconstruction_study(pipe, originals, sampler=o.scheduler, num_inference_steps=o.steps,
                                      seed=o.seed, progress=progress), originals)
    info = {
        "model": o.model or "(none: existing images)", "samples": o.samples or "generated",
        "reference": f"{o.reference} ({reference.description})", "preprocessing": origin,
        "resolution": f"{resolution} px, {channels} channel(s)",
        "sampler": "(none: existing images)" if o.samples else sampler_label(o),
        **({"requests": requests.description(o)} if requests is not None else {}),
        "seed": o.seed, "sampling_seconds": round(sampling_s, 1), "metrics_seconds": round(result.seconds, 1),
        **({} if o.samples else {"samples_file": f"{SAMPLES_FILE} (uint8 [N, C, H, W]; score again with --samples)"}),
    }
    report = write_report(result, out, training_images=reference.train, info=info, reconstruction=study,
                          conditional=conditional)
    card = None
    if card_folder is not None:  # after the report, so a card that cannot be written loses no result
        from punkdiff.hub import update_model_card

        card = update_model_card(card_folder, card_metrics(result, o, conditional), o.reference)
    return ModelEvaluation(result, report, card, conditional)


def sampler_label(options: EvalOptions) -> str:
    """How the samples were drawn, e.g. `ddim-50, eta 1` (`, guidance 3` for a conditional model): DDIM's eta
    changes the numbers as much as its steps."""
    label = f"{options.scheduler}-{options.steps}"
    if SAMPLERS[options.scheduler.lower()].uses_eta:
        label += f", eta {options.eta:g}"
    return label if options.guidance_scale is None else f"{label}, guidance {options.guidance_scale:g}"


def _with_condition_options(o: EvalOptions, pipe: PunkDiffPipeline | None) -> EvalOptions:
    """`o` with a conditional model's guidance and balanced requests filled in (None for other models, whose
    evaluation is unchanged); guidance or balanced requests that cannot apply are refused."""
    from punkdiff.pipelines.punkdiff_pipeline import check_guidance_scale

    if o.guidance_scale is not None:
        try:
            check_guidance_scale(o.guidance_scale)
        except ValueError as err:
            raise EvaluationError(f"--guidance: {err}") from None
    if o.per_class is not None and o.per_class < 0:
        raise EvaluationError(f"--per-class {o.per_class}: give a count of images per class, or 0 to skip them")
    if pipe is None or o.samples is not None or pipe.condition is None:
        asked = [flag for flag, value in (("--guidance", o.guidance_scale), ("--per-class", o.per_class))
                 if value is not None]
        if asked:
            what = ("existing images (--samples) are scored as they are, with no request to compare against"
                    if o.samples is not None or pipe is None else f"{o.model or 'this model'} is unconditional")
            raise EvaluationError(f"{' and '.join(asked)} apply to sampling a conditional model; {what}")
        return o
    return replace(o, guidance_scale=1.0 if o.guidance_scale is None else float(o.guidance_scale),
                   per_class=PER_CLASS if o.per_class is None else o.per_class)


@dataclass
class _ConditionalRequests:
    """What a conditional model is asked for: requests drawn as the data (`data`), balanced ones per class
    (`balanced`, maybe empty), and the classifier that scores them (also the other metrics' feature space)."""

    data: list[dict[str, Any]]
    balanced: list[dict[str, Any]]
    classifier: Classifier
    columns: tuple[str, ...]

    @classmethod
    def draw(
        cls, pipe: PunkDiffPipeline, o: EvalOptions, reference: ReferenceData, progress: bool
    ) -> _ConditionalRequests:
        """Draw the requests (seeded by `o.seed`) and load the classifier; before any sampling, a reference whose
        conditions the model does not know, or that no classifier can score, is refused."""
        from punkdiff.conditions import ConditionError
        from punkdiff.metrics.classifiers import load_or_train_classifier
        from punkdiff.metrics.conditional import balanced_requests, data_requests

        try:
            data = data_requests(pipe.condition, reference, o.num_samples, seed=o.seed)
            balanced = balanced_requests(pipe.condition, reference, o.per_class, seed=o.seed)
        except ConditionError as err:
            raise EvaluationError(f"--reference {o.reference} does not hold the conditions this model was trained "
                                  f"on ({err}); give the dataset the model learned") from None
        classifier = load_or_train_classifier(reference, seed=o.seed, cache_dir=o.cache_dir, progress=progress)
        task = classifier.task if classifier is not None else None
        scored = [c for c in pipe.condition.columns if task is not None and c in (task.class_column,
                                                                                   task.label_column)]
        if not scored:
            raise EvaluationError(f"no classifier of {o.reference} predicts the model's condition columns "
                                  f"({', '.join(pipe.condition.columns)}), so what was drawn cannot be checked "
                                  "against what was asked")
        return cls(data, balanced, classifier, tuple(pipe.condition.columns))

    def description(self, o: EvalOptions) -> str:
        """For the report: where the requests came from."""
        text = (f"{len(self.data)} conditions ({', '.join(self.columns)}) of training rows drawn at random "
                f"(seed {o.seed})")
        if self.balanced:
            text += f"; and {o.per_class} per class, balanced (seeds from {o.seed + o.num_samples})"
        return text


def _with_recommended_sampling(o: EvalOptions, pipe: PunkDiffPipeline) -> EvalOptions:
    """`o` with the sampler, steps and eta it leaves out taken from the model's recommendation."""
    from punkdiff.sampling import recommended_sampling

    if o.scheduler is not None and o.scheduler.lower() not in SAMPLERS:
        raise EvaluationError(f"unknown sampler {o.scheduler!r}; choose one of {', '.join(SAMPLERS)}")
    scheduler, steps, eta = recommended_sampling(pipe).fill(o.scheduler, o.steps, o.eta)
    return replace(o, scheduler=scheduler, steps=steps or 50, eta=0.0 if eta is None else eta)


def card_metrics(
    result: Evaluation, options: EvalOptions, conditional: dict[str, Any] | None = None
) -> dict[str, float | str]:
    """The model card's entries: each metric with its sampling, beside its real-vs-real floor; for a conditional
    model also how often what was asked was drawn (requests as the data), beside the classifier's own floor."""
    how = f"{result.num_images} samples, {sampler_label(options)}"
    entries: dict[str, float | str] = {}
    for name, m in result.metrics.items():
        if m["model"] is not None:
            entries[f"{name} ({how})"] = m["model"]
        if m["floor"] is not None:
            entries[f"{name}, real-vs-real floor ({result.num_images} images)"] = m["floor"]
    if conditional is not None:
        generated, floor = conditional["generated"], conditional["floor"]
        for key in ("accuracy", "label_recall", "spurious_per_image"):
            if generated[key] is not None:
                entries[f"requested {key} ({generated['num_images']} samples, {sampler_label(options)})"] = \
                    generated[key]
                entries[f"requested {key}, held-out real floor ({floor['num_images']} images)"] = floor[key]
    return {**entries, **result.not_computed}


def _sample(
    pipe: PunkDiffPipeline, o: EvalOptions, progress: bool, requests: list[dict[str, Any]] | None = None
) -> np.ndarray:
    """`num_samples` images from the pipeline as uint8 `[N, C, H, W]`; a conditional model's one per request."""
    from punkdiff.sampling import generate

    condition = {} if requests is None else {"attributes": requests, "guidance_scale": o.guidance_scale}
    images = generate(pipe, len(requests) if requests else o.num_samples, seed=o.seed, batch_size=o.batch_size,
                      sampler=o.scheduler, num_inference_steps=o.steps, eta=o.eta, output_type="np",
                      progress=progress, **condition)
    return (images * 255).round().astype(np.uint8).transpose(0, 3, 1, 2)


def _card_folder(o: EvalOptions) -> Path:
    """The local model folder whose card `update_card` may rewrite: the user's own, never a Hub cache snapshot."""
    if o.model is None or o.samples is not None:
        raise EvaluationError("--update-card writes the model's own scores into its card: give a MODEL folder and "
                              "let eval sample from it (not --samples)")
    path = Path(o.model).expanduser()
    if not path.is_dir():
        raise EvaluationError(f"--update-card needs a local model folder, and {o.model} is not one (a Hub id?); "
                              "download the model to a folder of your own (`hf download ID --local-dir DIR`), "
                              "evaluate that, then push it")
    if any(part.startswith("models--") for part in path.resolve().parts):
        raise EvaluationError(f"{o.model} is a snapshot in the Hugging Face cache, not a folder of yours; copy it "
                              "(`hf download ID --local-dir DIR`) and evaluate the copy")
    from punkdiff.hub import load_model_card

    load_model_card(path)  # a linked card or an unreadable header is refused now, not after the sampling
    return path


def _check_writable(out: Path) -> None:
    """Write a file in `out` (creating it), so a folder that cannot hold the results is refused before any work;
    the folders created for the test are removed again, so a refused evaluation leaves nothing behind."""
    created = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise EvaluationError(f"--out {out} cannot be written ({type(err).__name__}: {err.strerror or err}); "
                              "choose a folder you can write to") from None
    finally:
        for folder in created:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()


def _feature_networks(o: EvalOptions) -> dict[str, Any]:
    """The Inception and DINOv2 networks from their local weights, where given (flag, else environment)."""
    inception = resolve_weights(o.inception_weights, INCEPTION_ENV)
    dinov2 = resolve_weights(o.dinov2, DINOV2_ENV)
    return {"inception": load_inception(inception) if inception else None,
            "dinov2": load_dinov2(dinov2) if dinov2 else None}
