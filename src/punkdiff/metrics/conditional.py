"""How often what was asked is what was drawn: a conditional model's images scored by the data's own classifier.

Given generated images and the condition each was asked for, the classifier of `punkdiff.metrics.classifiers`
(trained on the same data and preprocessing) says what it sees:

- **class accuracy**, overall and per class (digits; punk types): the share of images whose predicted class is
  the requested one;
- **label recall** (punk accessories): the share of requested labels the classifier finds (probability >= 0.5);
- **spurious labels per image**: labels it finds that were not requested.

Like every score, these mean something beside their floor: the same function on real held-out images with their
true conditions gives what the classifier itself gets right (`conditional_scores(classifier, reference.heldout,
reference.heldout_columns)`).

A conditional model's evaluation asks for what the data holds: `data_requests` draws training rows' conditions,
so every other metric compares like with like, and `balanced_requests` asks for each class equally, so rare classes
(the punks' 9 Aliens) get a per-class accuracy too. `conditional_evaluation` puts the scores beside their floor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from punkdiff.conditions import SINGLE, requests_from_rows
from punkdiff.metrics.classifiers import Classifier

if TYPE_CHECKING:
    from punkdiff.conditions import ConditionVocabulary
    from punkdiff.metrics.real_images import ReferenceData

# a label counts as drawn when the classifier gives it at least this probability
LABEL_THRESHOLD = 0.5


@dataclass
class ConditionalScores:
    """Scores of images against their requested conditions; None where nothing of that kind was requested.

    Attributes:
        num_images: Images scored.
        accuracy: Share of images with a requested class whose predicted class is it.
        per_class: Class name -> `{"requested": count, "accuracy": share}`, for every requested class.
        label_recall: Share of the requested labels (over all images) that the classifier finds.
        spurious_per_image: Labels found but not requested, per image whose labels were requested.
        per_label_recall: Label name -> `{"requested": count, "recall": share}`, for every requested label.
        unscored_labels: Requested labels the classifier does not know (absent from its training data), left out.
    """

    num_images: int
    accuracy: float | None = None
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    label_recall: float | None = None
    spurious_per_image: float | None = None
    per_label_recall: dict[str, dict[str, float]] = field(default_factory=dict)
    unscored_labels: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def conditional_scores(
    classifier: Classifier,
    images: np.ndarray,
    requested: Mapping[str, Sequence],
    *,
    threshold: float = LABEL_THRESHOLD,
) -> ConditionalScores:
    """Score uint8 images `[N, C, H, W]` against the conditions they were asked for.

    `requested` maps the classifier's columns to one value per image, as a dataset row holds them: the class column
    (e.g. `label`, `type`) an index or a name, the label column (`accessories`) a list of names. None (or -1 for a
    class) marks an image whose value was not requested; columns the classifier does not predict are ignored.

    Examples:
        ```py
        >>> scores = conditional_scores(digit_classifier, samples, {"label": [3] * len(samples)})
        >>> scores.accuracy, scores.per_class["3"]["accuracy"]
        (0.99..., 0.99...)
        ```
    """
    task = classifier.task
    scored = [c for c in (task.class_column, task.label_column) if c is not None and c in requested]
    if not scored:
        known = ", ".join(c for c in (task.class_column, task.label_column) if c)
        raise ValueError(f"the requested conditions ({', '.join(requested) or 'none'}) include none of the columns "
                         f"the {task.name} classifier predicts: {known}")
    images = np.asarray(images)
    for column in scored:
        if len(requested[column]) != len(images):
            raise ValueError(f"{len(images)} images but {len(requested[column])} requested {column!r} values")
    predictions = classifier.predict(images)
    scores = ConditionalScores(num_images=len(images))
    if task.class_column in requested:
        classes = _class_indices(requested[task.class_column], task.class_names, task.class_column)
        _score_classes(scores, predictions["class_probs"].argmax(axis=1), classes, task.class_names)
    if task.label_column is not None and task.label_column in requested:
        _score_labels(scores, predictions["label_probs"] >= threshold, requested[task.label_column], task.label_names)
    return scores


def _class_indices(values: Sequence, names: Sequence[str], column: str) -> np.ndarray:
    """Requested classes as indices into `names`, -1 where unspecified."""
    out = np.full(len(values), -1, dtype=np.int64)
    for i, value in enumerate(values):
        if value is None:
            continue
        if isinstance(value, str):
            if value not in names:
                raise ValueError(f"requested {column} {value!r} is not a class the classifier knows: "
                                 f"{', '.join(names)}")
            out[i] = list(names).index(value)
        elif not -1 <= int(value) < len(names):
            raise ValueError(f"requested {column} {value} is out of range: 0..{len(names) - 1} (or -1, unspecified)")
        else:
            out[i] = int(value)
    return out


def _score_classes(scores: ConditionalScores, predicted: np.ndarray, classes: np.ndarray, names: Sequence[str]) -> None:
    asked = classes >= 0
    if not asked.any():
        return
    hits = predicted == classes
    scores.accuracy = float(hits[asked].mean())
    for k, name in enumerate(names):
        rows = classes == k
        if rows.any():
            scores.per_class[name] = {"requested": int(rows.sum()), "accuracy": float(hits[rows].mean())}


def _score_labels(scores: ConditionalScores, found: np.ndarray, values: Sequence, names: Sequence[str]) -> None:
    position = {name: i for i, name in enumerate(names)}
    asked = np.zeros(found.shape, dtype=bool)
    specified = np.zeros(len(values), dtype=bool)
    for row, wanted in enumerate(values):
        if wanted is None:
            continue
        specified[row] = True
        for name in [wanted] if isinstance(wanted, str) else wanted:
            if name in position:
                asked[row, position[name]] = True
            else:
                scores.unscored_labels += 1
    if not specified.any():
        return
    if asked.any():
        scores.label_recall = float(found[asked].mean())
        for k in np.flatnonzero(asked.any(axis=0)):
            column = asked[:, k]
            recall = float(found[column, k].mean())
            scores.per_label_recall[names[k]] = {"requested": int(column.sum()), "recall": recall}
    scores.spurious_per_image = float((found & ~asked)[specified].sum() / specified.sum())


def data_requests(
    vocabulary: ConditionVocabulary, reference: ReferenceData, count: int, seed: int = 0
) -> list[dict[str, Any]]:
    """`count` requests distributed as the data: the conditions of training rows drawn at random (with
    replacement, seeded), by name, as `PunkDiffPipeline(attributes=...)` takes them."""
    rows = np.random.default_rng(seed).integers(0, len(reference.train), count)
    return requests_from_rows(vocabulary, reference.features, reference.train_columns, rows.tolist())


def balanced_requests(
    vocabulary: ConditionVocabulary, reference: ReferenceData, per_class: int, seed: int = 0
) -> list[dict[str, Any]]:
    """`per_class` requests for each class of the model's first single-label column, in the vocabulary's order;
    [] without one. Each is a training row of that class (drawn with replacement), so the other columns are as
    the data pairs them with it; a class with no training row is asked alone, the rest unspecified."""
    group = next((g for g in vocabulary.groups if g.kind == SINGLE), None)
    if group is None or per_class < 1:
        return []
    rows = requests_from_rows(vocabulary, reference.features, reference.train_columns,
                              range(len(reference.train)))
    rng = np.random.default_rng(seed)
    requests: list[dict[str, Any]] = []
    for name in group.names:
        own = [r for r in rows if r.get(group.column) == name]
        requests += ([own[i] for i in rng.integers(0, len(own), per_class)] if own
                     else [{group.column: name}] * per_class)
    return requests


def requested_columns(requests: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> dict[str, list]:
    """Requests (one mapping per image) as `conditional_scores` takes them: column -> one value per image."""
    return {c: [r.get(c) for r in requests] for c in columns}


def conditional_evaluation(
    classifier: Classifier,
    reference: ReferenceData,
    columns: Sequence[str],
    guidance_scale: float,
    samples: np.ndarray,
    requests: Sequence[Mapping[str, Any]],
    balanced: tuple[np.ndarray, Sequence[Mapping[str, Any]]] | None = None,
) -> dict[str, Any]:
    """The scores of a conditional model's images beside their floor, as the report's `"conditional"` entry.

    `generated`: `samples` against their `requests` (drawn as the data); `floor`: every held-out real image against
    its true condition (the model's condition `columns` only); `balanced`: images and requests of
    `balanced_requests`, or None. Each is `ConditionalScores.to_dict()`.
    """
    floor = {c: reference.heldout_columns[c] for c in columns}
    return {
        "guidance_scale": guidance_scale,
        "generated": conditional_scores(classifier, samples, requested_columns(requests, columns)).to_dict(),
        "floor": conditional_scores(classifier, reference.heldout, floor).to_dict(),
        "balanced": None if not balanced else conditional_scores(
            classifier, balanced[0], requested_columns(balanced[1], columns)).to_dict(),
    }
