"""The condition of a conditional model: which dataset columns it is told, and how they become tensors.

A condition is one or more *groups*, each a dataset column:

- a **single-label** group is a `datasets.ClassLabel` column (MNIST's `label`, the punks' `type`): one name per image;
- a **multi-label** group is a sequence of `ClassLabel`s or of strings (the punks' `accessories`): a set of names per
  image; for strings the names are the sorted set of values found in the data.

Two encodings follow from the groups (`ConditionVocabulary.encoding`):

- `"class_index"`, for a lone single-label group: the class index, for `UNet2DModel`'s own class embedding
  (`num_class_embeds = num_classes + 1`); the last index is the null class, "unspecified".
- `"multi_hot"`, for everything else: one float vector per image, a block per group (one-hot for a single-label
  group, multi-hot for a multi-label one, whose block ends with a "nothing" slot for an explicitly empty set). An
  all-zero block means "unspecified", so a user may leave a group out, and the all-zero vector is the null
  condition. The attribute encoder maps it to the UNet's class embedding.

The request side (`ConditionVocabulary`, its groups, `encode_request`, the null condition) and the attribute
encoder travel with a model, so they live in `punkdiff.pipelines.punkdiff_pipeline` and are imported here. This
module holds the dataset side: building a vocabulary from a `datasets.Dataset`'s columns (`datasets` is imported
only there), the guidance drops of training and the rare-class weights.

Examples:
    ```py
    >>> import datasets
    >>> rows = datasets.Dataset.from_dict(
    ...     {"type": [0, 1, 1], "accessories": [["Cap"], [], ["Cap", "Pipe"]]},
    ...     features=datasets.Features({"type": datasets.ClassLabel(names=["Ape", "Male"]),
    ...                                 "accessories": datasets.Sequence(datasets.Value("string"))}))
    >>> vocabulary = vocabulary_from_dataset(rows, "type,accessories")
    >>> vocabulary.encoding, vocabulary.width
    ('multi_hot', 5)
    >>> vocabulary.encode_request(attributes={"type": "Male", "accessories": ["Pipe"]})
    tensor([[0., 1., 0., 1., 0.]])
    ```
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from punkdiff.pipelines.punkdiff_pipeline import (
    CLASS_INDEX,
    CONDITION_FILE,
    MULTI,
    MULTI_HOT,
    SINGLE,
    ConditionError,
    ConditionGroup,
    ConditionVocabulary,
)

__all__ = [
    "CLASS_INDEX",
    "CONDITION_DROP",
    "CONDITION_FILE",
    "GROUP_DROP",
    "MULTI",
    "MULTI_HOT",
    "SINGLE",
    "ConditionError",
    "ConditionGroup",
    "ConditionVocabulary",
    "balanced_row_weights",
    "check_columns",
    "class_weights",
    "drop_conditions",
    "parse_columns",
    "requests_from_rows",
    "vocabulary_from_columns",
    "vocabulary_from_dataset",
]

# Whole-condition drop rate for classifier-free guidance training. Ho & Salimans (2022) found 0.1 and 0.2 about equally
# good and 0.5 worse; the smaller one leaves more of a small model's few steps to the conditional task that guided
# sampling relies on.
CONDITION_DROP = 0.1
# Per-group drop rate on top of it (multi-group conditions only), so any group may be left unspecified: with two
# groups, 0.9 * 0.95**2 = 81 % of the rows keep their whole condition.
GROUP_DROP = 0.05
_ACCEPTED = "a ClassLabel column, or a sequence of ClassLabels or of strings"


# ---- building a vocabulary from a dataset ------------------------------------------------------------------------


def vocabulary_from_dataset(dataset: Any, columns: str | Sequence[str]) -> ConditionVocabulary:
    """The vocabulary of `columns` (a list, or `"COLUMN[,COLUMN]"` as `--condition-on` takes it) of a
    `datasets.Dataset`: ClassLabel names from the features, string names and every count from the data."""
    names = parse_columns(columns)
    check_columns(dataset.features, names)
    return vocabulary_from_columns(dataset.features, dataset.select_columns(names).to_dict())

def vocabulary_from_columns(features: Mapping[str, Any], rows: Mapping[str, Sequence]) -> ConditionVocabulary:
    """The vocabulary of the columns in `rows` (column -> values, as `Dataset.to_dict()` gives them), whose types
    `features` (a `datasets.Features`) gives; e.g. a `ReferenceData`'s `features` and `train_columns`."""
    check_columns(features, list(rows))
    groups, num_rows = [], None
    for column, values in rows.items():
        kind, class_names = _feature_kind(features[column])
        if num_rows is not None and len(values) != num_rows:
            raise ConditionError(f"condition column {column!r} has {len(values)} rows, the others {num_rows}")
        num_rows = len(values)
        if kind == SINGLE:
            counts = [0] * len(class_names)
            for value in values:
                if value is not None and value >= 0:  # -1: a ClassLabel's "no label"
                    counts[value] += 1
            groups.append(ConditionGroup(column, SINGLE, tuple(class_names), tuple(counts)))
            continue
        found: dict[str | int, int] = {}
        for value in values:
            for name in set(value or ()):
                found[name] = found.get(name, 0) + 1
        if class_names is None:
            class_names = sorted(found)
        else:
            found = {class_names[k]: n for k, n in found.items()}
        counts = tuple(found.get(n, 0) for n in class_names)
        groups.append(ConditionGroup(column, MULTI, tuple(class_names), counts))
    return ConditionVocabulary(tuple(groups), num_rows or 0)


# ---- which columns ------------------------------------------------------------------------------------------------


def parse_columns(columns: str | Sequence[str]) -> list[str]:
    """`"type,accessories"` (as `--condition-on` takes it) or a list -> column names, each once, none empty."""
    names = [c.strip() for c in (columns.split(",") if isinstance(columns, str) else columns)]
    if not names or any(not n for n in names):
        raise ConditionError(f"--condition-on {columns!r}: give COLUMN[,COLUMN] with no empty names")
    if len(set(names)) != len(names):
        raise ConditionError(f"--condition-on {columns!r} names a column twice")
    return names


def check_columns(features: Mapping[str, Any], columns: Sequence[str]) -> None:
    """Refuse a missing column or one of a type a condition cannot take, listing the dataset's columns and types."""
    for column in columns:
        if column not in features:
            raise ConditionError(f"the dataset has no column {column!r}; {_columns_and_types(features)}")
        try:
            _feature_kind(features[column])
        except ConditionError as err:
            hint = ""
            if type(features[column]).__name__ == "Value":
                hint = (f" (a column of plain values can become one with "
                        f"`dataset = dataset.class_encode_column({column!r})`)")
            raise ConditionError(f"column {column!r} holds {features[column]!r}, which cannot condition a model: "
                                 f"{err}{hint}; {_columns_and_types(features)}") from None


def _columns_and_types(features: Mapping[str, Any]) -> str:
    listed = ", ".join(f"{k}: {v!r}" for k, v in features.items())
    return f"its columns are {listed}; a condition column must be {_ACCEPTED}"


def _feature_kind(feature: Any) -> tuple[str, list[str] | None]:
    """(kind, ClassLabel names or None for strings found in the data) for a feature type, else ConditionError."""
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return SINGLE, list(feature.names)
    sequences = tuple(getattr(datasets, n) for n in ("Sequence", "List", "LargeList") if isinstance(
        getattr(datasets, n, None), type))
    if isinstance(feature, sequences):
        inner = feature.feature
        if isinstance(inner, datasets.ClassLabel):
            return MULTI, list(inner.names)
        if isinstance(inner, datasets.Value) and inner.dtype in ("string", "large_string"):
            return MULTI, None
    raise ConditionError(f"expected {_ACCEPTED}")


def requests_from_rows(
    vocabulary: ConditionVocabulary, features: Mapping[str, Any], rows: Mapping[str, Sequence], indices: Sequence[int]
) -> list[dict[str, Any]]:
    """Dataset rows `indices` as requests by name (`attributes=` of `PunkDiffPipeline`), one mapping per row.

    ClassLabel indices become their names (-1 or None: left out, i.e. unspecified); every name is checked against
    the vocabulary, so rows of another dataset are refused with the names the model knows.

    Examples:
        ```py
        >>> requests_from_rows(vocabulary, punks.features, punks.to_dict(), [0])
        [{'type': 'Female', 'accessories': ['Blonde Bob', 'Earring', 'Green Eye Shadow']}]
        ```
    """
    missing = [c for c in vocabulary.columns if c not in rows or c not in features]
    if missing:
        raise ConditionError(f"the data lacks the model's condition columns {missing}; it has {list(rows)}")
    requests: list[dict[str, Any]] = [{} for _ in indices]
    for group in vocabulary.groups:
        _, class_names = _feature_kind(features[group.column])
        values = rows[group.column]
        for request, i in zip(requests, indices, strict=True):
            value = values[i]
            if value is None or (isinstance(value, int) and value < 0):
                continue
            if group.kind == MULTI:
                request[group.column] = [_named(group, class_names, v) for v in value]
            else:
                request[group.column] = _named(group, class_names, value)
    return requests


def _named(group: ConditionGroup, class_names: list[str] | None, value: int | str) -> str:
    """A dataset value (a ClassLabel index, or a name) as a name the vocabulary knows, else ConditionError."""
    name = class_names[value] if class_names is not None and not isinstance(value, str) else value
    group.index(name)
    return name


# ---- training: classifier-free guidance drops and rare classes ---------------------------------------------------


def drop_conditions(
    condition: torch.Tensor,
    vocabulary: ConditionVocabulary,
    generator: torch.Generator,
    *,
    condition_drop: float = CONDITION_DROP,
    group_drop: float = GROUP_DROP,
) -> torch.Tensor:
    """Replace each row's whole condition by the null one with probability `condition_drop`, and (multi-group
    conditions) each group's block by zeros with probability `group_drop`, so the model also learns the unconditional
    and the partly specified prediction that guidance needs.

    The random numbers come from `generator` only, and as many of them whatever is dropped, so a resumed run that
    restores the generator drops exactly what the uninterrupted run would.
    """
    for name, p in (("condition_drop", condition_drop), ("group_drop", group_drop)):
        if not 0.0 <= p <= 1.0:
            raise ConditionError(f"{name} must be a probability in [0, 1], got {p}")
    n = condition.shape[0]
    drop_all = torch.rand(n, generator=generator, device=generator.device).to(condition.device) < condition_drop
    if vocabulary.encoding == CLASS_INDEX:
        return torch.where(drop_all, torch.full_like(condition, vocabulary.null_class), condition)
    keep = (~drop_all).to(condition.dtype)[:, None].expand(n, vocabulary.width).clone()
    if len(vocabulary.groups) > 1:
        drop_group = torch.rand(n, len(vocabulary.groups), generator=generator, device=generator.device)
        drop_group = drop_group.to(condition.device) < group_drop
        for i, group in enumerate(vocabulary.groups):
            keep[:, vocabulary.block(group.column)] *= (~drop_group[:, i]).to(condition.dtype)[:, None]
    return condition * keep


def class_weights(group: ConditionGroup, power: float = 0.5, max_ratio: float = 10.0) -> torch.Tensor:
    """Per-class weights `(most frequent count / count) ** power`, at most `max_ratio`: the most frequent class
    weighs 1, a class 100x rarer 10x (with the default square root).

    The square root, as the punk classifier's training found, helps rare classes without letting a handful of
    images dominate; the cap bounds how often the rarest few images repeat (9 Aliens among 6,039 Males would
    otherwise weigh 26x each).
    """
    if not group.counts:
        raise ConditionError(f"condition column {group.column!r} has no training counts to weigh classes by")
    if power < 0 or max_ratio < 1:
        raise ConditionError(f"need power >= 0 and max_ratio >= 1, got power={power}, max_ratio={max_ratio}")
    counts = torch.tensor(group.counts, dtype=torch.float64)
    weights = (counts.max() / counts.clamp(min=1e-12)).pow(power)
    return weights.clamp(max=max_ratio).float()


def balanced_row_weights(
    condition: torch.Tensor, vocabulary: ConditionVocabulary, power: float = 0.5, max_ratio: float = 10.0
) -> torch.Tensor:
    """Per-row weights for class-balanced sampling (`torch.utils.data.WeightedRandomSampler`) or loss weighting,
    with mean 1 over the rows: the product of the row's single-label class weights (`class_weights`), capped at
    `max_ratio`. Multi-label groups and unspecified labels weigh 1.
    """
    n = condition.shape[0]
    weights = torch.ones(n, dtype=torch.float64)
    for group in vocabulary.groups:
        if group.kind != SINGLE:
            continue
        per_class = torch.cat([class_weights(group, power, max_ratio).double(), torch.ones(1, dtype=torch.float64)])
        if vocabulary.encoding == CLASS_INDEX:
            index = condition.long().cpu()
        else:
            block = condition[:, vocabulary.block(group.column)].cpu()
            index = torch.where(block.sum(dim=1) > 0, block.argmax(dim=1), torch.tensor(len(group.names)))
        weights *= per_class[index]
    weights = weights.clamp(max=max_ratio)
    return (weights * n / weights.sum()).float() if n else weights.float()

