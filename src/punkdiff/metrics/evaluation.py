"""`evaluate`: every offline metric for a set of images, each beside its real-vs-real floor.

Evaluation scores images, not models, so a peer's samples go through exactly this code. For `n` images (the
smallest of the samples, the reference's train part and its held-out part), each metric is computed twice with the
same seeds: samples vs `n` training images (the model's score) and `n` held-out real images vs the same training
images (the floor: what a perfect model, one that draws new images from the data distribution, would get).
Pixel art is scored as it is displayed: samples snapped to the training palette (`punkdiff.data.pixel_art_palette`).

FID, KID and IS in Inception features and FD-DINOv2 need pretrained networks that cannot be downloaded here; they
are computed when the caller passes networks loaded from local weights (`punkdiff.metrics.feature_networks`), and
otherwise listed in `Evaluation.not_computed` with the reason, never given a number.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from punkdiff.data import pixel_art_palette
from punkdiff.metrics.classifiers import Classifier, load_or_train_classifier, targets
from punkdiff.metrics.feature_networks import dinov2_features, inception_features
from punkdiff.metrics.frechet import frechet_distance, inception_score, kernel_distance
from punkdiff.metrics.memorisation import memorisation, snap_to_palette
from punkdiff.metrics.precision_recall import precision_recall
from punkdiff.metrics.real_images import ReferenceData
from punkdiff.metrics.swd import sliced_wasserstein_distance

if TYPE_CHECKING:
    from transformers import Dinov2Model

    from punkdiff.metrics.inception import InceptionFeatures

# How to read each metric: which way is better.
DIRECTION = {
    "swd": "lower", "fd_classifier": "lower", "kid_classifier": "lower", "precision": "higher", "recall": "higher",
    "density": "higher", "coverage": "higher", "class_entropy": "higher", "class_tv_distance": "lower",
    "confident_share": "higher", "label_frequency_correlation": "higher", "near_copy_share_pixels": "lower",
    "near_copy_share_features": "lower", "exact_copy_rate": "lower",
    "fid": "lower", "kid_inception": "lower", "inception_score": "higher", "fd_dinov2": "lower",
}
MIN_IMAGES = 10  # fewer samples (or reference images) than this give no meaningful score
CONFIDENT = 0.9  # a class probability at least this high counts as a confident classification
WEIGHTS_UNAVAILABLE = "not computed: weights unavailable"
INCEPTION_METRICS, DINOV2_METRICS = ("fid", "kid_inception", "inception_score"), ("fd_dinov2",)


@dataclass
class Evaluation:
    """The metrics (`{name: {"model": x, "floor": y, "better": "lower"|"higher"}}`) and what the figures need."""

    metrics: dict[str, dict[str, Any]]
    num_images: int
    feature_space: str
    classifier_scores: dict[str, float] | None
    histograms: dict[str, Any]
    samples: np.ndarray
    nearest_index: np.ndarray
    seconds: float
    palette_size: int | None = None
    not_computed: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "num_images": self.num_images,
            "feature_space": self.feature_space,
            "classifier_held_out_scores": self.classifier_scores,
            "metrics": self.metrics,
            "histograms": self.histograms,
            "samples_snapped_to_palette_of": self.palette_size,
            "not_computed": self.not_computed,
            "metrics_seconds": round(self.seconds, 2),
        }


def evaluate(
    samples: np.ndarray,
    reference: ReferenceData,
    *,
    classifier: Classifier | None | str = "auto",
    seed: int = 0,
    cache_dir: str | None = None,
    inception: InceptionFeatures | None = None,
    dinov2: Dinov2Model | None = None,
    progress: bool = True,
) -> Evaluation:
    """Score uint8 samples `[N, C, H, W]` (already at the reference's resolution) against `reference`.

    `classifier="auto"` trains or loads the classifier the reference's labels allow (digits, punk attributes);
    pass None to skip classifier metrics, whose feature space is then raw pixels. `inception` and `dinov2` are
    networks from `punkdiff.metrics.feature_networks.load_inception` / `load_dinov2`; without them FID, KID
    (Inception), IS and FD-DINOv2 are reported as not computed.

    Examples:
        ```py
        >>> reference = load_reference("../shared/datasets/mnist", ImageTransform(16, 1, resize_filter="bilinear"))
        >>> result = evaluate(samples, reference)  # samples: uint8 [5000, 1, 16, 16]
        >>> result.metrics["fd_classifier"]
        {'model': 3.1, 'floor': 0.4, 'better': 'lower'}
        ```
    """
    start = time.perf_counter()
    samples = np.asarray(samples)
    expected = reference.train.shape[1:]
    if samples.dtype != np.uint8 or samples.shape[1:] != expected:
        raise ValueError(
            f"samples must be uint8 [N, {', '.join(map(str, expected))}] like the reference images, got "
            f"{samples.dtype} {list(samples.shape)}: resize them to the model's resolution first"
        )
    n = min(len(samples), len(reference.train), len(reference.heldout))
    if n < MIN_IMAGES:
        raise ValueError(f"too few images to score: {n} (need at least {MIN_IMAGES} samples and reference images)")
    palette = pixel_art_palette(np.concatenate([reference.train, reference.heldout]), reference.transform)
    if palette is not None:  # pixel art is scored as it is displayed
        samples = snap_to_palette(samples, palette)
    rng = np.random.default_rng(seed)
    train_rows = np.sort(rng.permutation(len(reference.train))[:n])
    heldout_rows = np.sort(rng.permutation(len(reference.heldout))[:n])
    sets = {"model": samples[:n], "floor": reference.heldout[heldout_rows]}
    real = reference.train[train_rows]
    every = {**sets, "real": real}

    if classifier == "auto":
        classifier = load_or_train_classifier(reference, seed=seed, cache_dir=cache_dir, progress=progress)
    predictions = {k: classifier.predict(v) for k, v in every.items()} if classifier else None
    pool_features = classifier.predict(reference.train)["features"] if classifier else None
    flat = {k: v.reshape(n, -1).astype(np.float64) / 255.0 for k, v in every.items()}
    features = {k: p["features"] for k, p in predictions.items()} if predictions else flat
    pool_logits = dino = None
    if inception is not None:
        pool_logits = {k: inception_features(inception, v, progress=progress) for k, v in every.items()}
    if dinov2 is not None:
        dino = {k: dinov2_features(dinov2, v, progress=progress) for k, v in every.items()}
    not_computed = {name: WEIGHTS_UNAVAILABLE for name in (() if inception is not None else INCEPTION_METRICS)
                    + (() if dinov2 is not None else DINOV2_METRICS)}

    per_set: dict[str, dict[str, Any]] = {}
    nearest_index = None
    for name, images in sets.items():
        values: dict[str, Any] = dict(
            swd=sliced_wasserstein_distance(real, images, seed=seed)["swd"],
            **precision_recall(features["real"], features[name]),
        )
        copies = memorisation(
            images, reference.train, features=(features[name], pool_features) if classifier else None,
            palette=palette,
        )
        values.update({k: copies[k] for k in ("near_copy_share_pixels", "near_copy_share_features", "exact_copy_rate")
                       if k in copies})
        if name == "model":
            nearest_index = copies["nearest_index"]
        if classifier:
            values["fd_classifier"] = frechet_distance(features["real"], features[name])
            values["kid_classifier"] = kernel_distance(features["real"], features[name], seed=seed)[0]
            values.update(_classifier_statistics(classifier, predictions[name], predictions["real"]))
        if pool_logits:
            (real_pool, _), (pool, logits) = pool_logits["real"], pool_logits[name]
            values["fid"] = frechet_distance(real_pool, pool)
            values["kid_inception"] = kernel_distance(real_pool, pool, seed=seed)[0]
            values["inception_score"] = inception_score(logits, seed=seed)[0]
        if dino:
            values["fd_dinov2"] = frechet_distance(dino["real"], dino[name])
        per_set[name] = values

    metrics = {
        key: {"model": per_set["model"][key], "floor": per_set["floor"][key], "better": DIRECTION[key]}
        for key in per_set["model"]
    }
    histograms = _histograms(classifier, predictions, reference) if classifier else {}
    return Evaluation(
        metrics=metrics,
        num_images=n,
        feature_space=f"{classifier.task.name} classifier (128-d)" if classifier else "pixels",
        classifier_scores=classifier.scores if classifier else None,
        histograms=histograms,
        samples=sets["model"],
        nearest_index=nearest_index,
        seconds=time.perf_counter() - start,
        palette_size=len(palette) if palette is not None else None,
        not_computed=not_computed,
    )


def _classifier_statistics(classifier: Classifier, pred: dict[str, np.ndarray], real: dict[str, np.ndarray]):
    """Mode coverage from the class predictions; accessory-style label frequencies against the real ones."""
    k = len(classifier.task.class_names)
    hist = np.bincount(pred["class_probs"].argmax(axis=1), minlength=k) / len(pred["class_probs"])
    real_hist = np.bincount(real["class_probs"].argmax(axis=1), minlength=k) / len(real["class_probs"])
    nonzero = hist[hist > 0]
    stats = {
        "class_entropy": float(max(0.0, -(nonzero * np.log(nonzero)).sum() / np.log(k))),
        "class_tv_distance": float(0.5 * np.abs(hist - real_hist).sum()),
        "confident_share": float((pred["class_probs"].max(axis=1) >= CONFIDENT).mean()),
    }
    if classifier.task.label_names:
        freq, real_freq = (pred["label_probs"] >= 0.5).mean(axis=0), (real["label_probs"] >= 0.5).mean(axis=0)
        stats["label_frequency_correlation"] = float(np.corrcoef(freq, real_freq)[0, 1]) if freq.std() > 0 else 0.0
    return stats


def _histograms(classifier: Classifier, predictions: dict[str, dict[str, np.ndarray]], reference: ReferenceData):
    """Predicted class shares of samples, held-out and training images, and the true held-out shares."""
    k = len(classifier.task.class_names)
    out = {"class_names": list(classifier.task.class_names)}
    for name, pred in predictions.items():
        out[name] = (np.bincount(pred["class_probs"].argmax(axis=1), minlength=k) / len(pred["class_probs"])).tolist()
    classes, _ = targets(classifier.task, reference.heldout_columns)
    out["heldout_true"] = (np.bincount(classes, minlength=k) / len(classes)).tolist()
    if classifier.task.label_names:
        out["label_names"] = list(classifier.task.label_names)
        for name, pred in predictions.items():
            out[f"{name}_label_frequency"] = (pred["label_probs"] >= 0.5).mean(axis=0).tolist()
    return out
