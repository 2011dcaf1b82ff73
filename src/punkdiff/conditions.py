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
  condition. The attribute encoder (`punkdiff.attribute_encoder`) maps it to the UNet's class embedding.

This module needs only torch and the standard library, except `ConditionVocabulary.from_dataset`, which reads a
`datasets.Dataset`'s features.

Examples:
    ```py
    >>> import datasets
    >>> rows = datasets.Dataset.from_dict(
    ...     {"type": [0, 1, 1], "accessories": [["Cap"], [], ["Cap", "Pipe"]]},
    ...     features=datasets.Features({"type": datasets.ClassLabel(names=["Ape", "Male"]),
    ...                                 "accessories": datasets.Sequence(datasets.Value("string"))}))
    >>> vocabulary = ConditionVocabulary.from_dataset(rows, "type,accessories")
    >>> vocabulary.encoding, vocabulary.width
    ('multi_hot', 5)
    >>> vocabulary.encode_request(attributes={"type": "Male", "accessories": ["Pipe"]})
    tensor([[0., 1., 0., 1., 0.]])
    ```
"""

from __future__ import annotations

import difflib
import json
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

SINGLE, MULTI = "single", "multi"
CLASS_INDEX, MULTI_HOT = "class_index", "multi_hot"
# the file a conditional model's vocabulary is saved in, beside its components
CONDITION_FILE = "condition.json"
_FORMAT, _VERSION = "punkdiff-condition", 1
# Whole-condition drop rate for classifier-free guidance training. Ho & Salimans (2022) found 0.1 and 0.2 about equally
# good and 0.5 worse; the smaller one leaves more of a small model's few steps to the conditional task that guided
# sampling relies on.
CONDITION_DROP = 0.1
# Per-group drop rate on top of it (multi-group conditions only), so any group may be left unspecified: with two
# groups, 0.9 * 0.95**2 = 81 % of the rows keep their whole condition.
GROUP_DROP = 0.05
_ACCEPTED = "a ClassLabel column, or a sequence of ClassLabels or of strings"


class ConditionError(ValueError):
    """A condition that cannot be built or encoded; the message says what was wrong and what is accepted."""


@dataclass(frozen=True)
class ConditionGroup:
    """One conditioning column: its kind (`"single"` or `"multi"`), its names and how many training rows have each."""

    column: str
    kind: str
    names: tuple[str, ...]
    counts: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in (SINGLE, MULTI):
            raise ConditionError(f"condition group {self.column!r} has kind {self.kind!r}; expected {SINGLE!r} or "
                                 f"{MULTI!r}")
        if not self.names:
            raise ConditionError(f"condition column {self.column!r} has no values to condition on")
        if len(set(self.names)) != len(self.names):
            raise ConditionError(f"condition column {self.column!r} repeats names: {list(self.names)}")
        if self.counts and len(self.counts) != len(self.names):
            raise ConditionError(f"condition column {self.column!r} has {len(self.names)} names but "
                                 f"{len(self.counts)} counts")

    @property
    def width(self) -> int:
        """Its block's width in the multi-hot vector: a multi-label block ends with the "nothing" slot."""
        return len(self.names) + (self.kind == MULTI)

    def index(self, value: int | str) -> int:
        """A name, or an index into `names`, as an index; anything else is refused naming what is known."""
        if isinstance(value, bool) or not isinstance(value, (numbers.Integral, str)):
            raise ConditionError(f"{self.column} value {value!r} is neither a name nor an index; {self._known()}")
        if isinstance(value, numbers.Integral):
            value = int(value)
            if not 0 <= value < len(self.names):
                raise ConditionError(f"{self.column} {value} is out of range: give an index in 0..{len(self.names) - 1}"
                                     f" or a name; {self._known()}")
            return value
        try:
            return self.names.index(value)
        except ValueError:
            close = difflib.get_close_matches(value, self.names, n=5, cutoff=0.5)
            hint = f"closest: {', '.join(map(repr, close))}; " if close else ""
            raise ConditionError(f"unknown {self.column} {value!r}; {hint}{self._known()}") from None

    def _known(self) -> str:
        return f"known {self.column} values ({len(self.names)}): {', '.join(self.names)}"


@dataclass(frozen=True)
class ConditionVocabulary:
    """What a conditional model is told: its groups, in order, and how many training rows they were counted on.

    Saved with the model as `condition.json` (`to_json`), read back with `from_json`.
    """

    groups: tuple[ConditionGroup, ...]
    num_rows: int = 0
    _offsets: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.groups:
            raise ConditionError("a condition needs at least one column")
        columns = [g.column for g in self.groups]
        if len(set(columns)) != len(columns):
            raise ConditionError(f"condition columns repeat: {columns}")
        offsets = [0]
        for group in self.groups:
            offsets.append(offsets[-1] + group.width)
        object.__setattr__(self, "_offsets", tuple(offsets))

    # ---- building and saving ------------------------------------------------------------------------------------

    @classmethod
    def from_dataset(cls, dataset: Any, columns: str | Sequence[str]) -> ConditionVocabulary:
        """The vocabulary of `columns` (a list, or `"COLUMN[,COLUMN]"` as `--condition-on` takes it) of a
        `datasets.Dataset`: ClassLabel names from the features, string names and every count from the data."""
        names = parse_columns(columns)
        check_columns(dataset.features, names)
        return cls.from_columns(dataset.features, dataset.select_columns(names).to_dict())

    @classmethod
    def from_columns(cls, features: Mapping[str, Any], rows: Mapping[str, Sequence]) -> ConditionVocabulary:
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
        return cls(tuple(groups), num_rows or 0)

    def to_dict(self) -> dict[str, Any]:
        return {"format": _FORMAT, "version": _VERSION, "encoding": self.encoding, "num_rows": self.num_rows,
                "groups": [asdict(g) for g in self.groups]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConditionVocabulary:
        """Read back `to_dict`'s output; a file that is not one, or of a newer version, is refused."""
        if not isinstance(data, Mapping) or data.get("format") != _FORMAT:
            raise ConditionError(f"not a punkdiff condition (expected \"format\": {_FORMAT!r}); was it written by "
                                 "ConditionVocabulary.to_json?")
        if data.get("version") != _VERSION:
            raise ConditionError(f"condition version {data.get('version')!r} is not {_VERSION}; upgrade punkdiff")
        try:
            groups = tuple(ConditionGroup(g["column"], g["kind"], tuple(g["names"]), tuple(g.get("counts", ())))
                           for g in data["groups"])
            vocabulary = cls(groups, int(data.get("num_rows", 0)))
        except (KeyError, TypeError) as err:
            raise ConditionError(f"malformed condition: {err!r} (each group needs column, kind and names)") from err
        if data.get("encoding", vocabulary.encoding) != vocabulary.encoding:
            raise ConditionError(f"condition says encoding {data['encoding']!r} but its groups give "
                                 f"{vocabulary.encoding!r}")
        return vocabulary

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ConditionVocabulary:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as err:
            raise ConditionError(f"{CONDITION_FILE} is not valid JSON: {err}") from err

    def markdown(self) -> str:
        """The vocabulary for a model card: each column, its kind, and its names with their training counts."""
        lines = []
        for g in self.groups:
            kind = "one of" if g.kind == SINGLE else "any set of"
            named = [f"{n} ({c:,})" for n, c in zip(g.names, g.counts, strict=True)] if g.counts else list(g.names)
            lines.append(f"- `{g.column}`: {kind} {len(g.names)}: {', '.join(named)}")
        return "\n".join(lines)

    # ---- shape of the encoding ------------------------------------------------------------------------------------

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(g.column for g in self.groups)

    @property
    def encoding(self) -> str:
        """`"class_index"` for a lone single-label column, else `"multi_hot"`."""
        return CLASS_INDEX if len(self.groups) == 1 and self.groups[0].kind == SINGLE else MULTI_HOT

    @property
    def width(self) -> int:
        """Length of the multi-hot vector (the attribute encoder's input); the number of classes for class indices."""
        return self._offsets[-1]

    @property
    def null_class(self) -> int:
        """The class index that means "unspecified" (class-index encoding only): one past the real classes."""
        self._require(CLASS_INDEX)
        return len(self.groups[0].names)

    def unet_kwargs(self) -> dict[str, Any]:
        """`UNet2DModel` kwargs for this condition: its own class embedding with the null class, or `"identity"`
        for the attribute encoder's output."""
        if self.encoding == CLASS_INDEX:
            return {"num_class_embeds": self.null_class + 1}
        return {"class_embed_type": "identity"}

    def block(self, column: str) -> slice:
        """Where `column`'s block lies in the multi-hot vector."""
        self._require(MULTI_HOT)
        i = self._group_position(column)
        return slice(self._offsets[i], self._offsets[i + 1])

    def null(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The null ("unspecified") condition for `batch_size` images."""
        if self.encoding == CLASS_INDEX:
            return torch.full((batch_size,), self.null_class, dtype=torch.long, device=device)
        return torch.zeros(batch_size, self.width, device=device)

    # ---- encoding ---------------------------------------------------------------------------------------------------

    def encode(self, rows: Mapping[str, Sequence]) -> torch.Tensor:
        """Dataset rows (column -> values, as `datasets` gives a batch) -> the condition tensor `[N]` or `[N, width]`.

        A ClassLabel value is its index (or name); a multi-label value is a list of names (or indices for a sequence
        of ClassLabels). A single label of -1 or None, and a multi-label None, are "unspecified".
        """
        missing = [c for c in self.columns if c not in rows]
        if missing:
            raise ConditionError(f"rows lack the condition columns {missing}; they have {list(rows)}")
        lengths = {len(rows[c]) for c in self.columns}
        if len(lengths) > 1:
            raise ConditionError(f"condition columns have different lengths: {[len(rows[c]) for c in self.columns]}")
        return self._encode([{c: _unspecified_if_negative(rows[c][i]) for c in self.columns}
                             for i in range(lengths.pop())])

    def encode_request(
        self,
        labels: Sequence[int | str | None] | None = None,
        attributes: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    ) -> torch.Tensor:
        """What a user asked for -> the condition tensor, one row per label or per attributes mapping.

        `labels` are names or indices of the single-label column (`[3, 7]`, `["Ape"]`); `attributes` maps columns
        to a name (single-label) or a list of names (multi-label), e.g. `{"type": "Ape", "accessories": ["Cap"]}`.
        A column left out, or None, is unspecified; an empty list asks for none of that group's names. Unknown
        columns and names and out-of-range indices are refused with what is known.
        """
        if (labels is None) == (attributes is None):
            raise ConditionError("give either labels=[...] or attributes={...}, not both or neither")
        if labels is not None:
            if isinstance(labels, (str, numbers.Integral)):
                labels = [labels]
            singles = [g.column for g in self.groups if g.kind == SINGLE]
            if len(singles) != 1:
                raise ConditionError(f"labels=... needs exactly one single-label column; this model is conditioned on "
                                     f"{self._describe_columns()}: use attributes={{column: value}}")
            if not len(labels):
                raise ConditionError("labels=[] asks for no images; give one label per image")
            return self._encode([{singles[0]: label} for label in labels])
        requests = [attributes] if isinstance(attributes, Mapping) else list(attributes)
        for request in requests:
            if not isinstance(request, Mapping):
                raise ConditionError(f"attributes must be a mapping of column to value(s), got {request!r}")
            unknown = [k for k in request if k not in self.columns]
            if unknown:
                raise ConditionError(f"unknown attribute {unknown[0]!r}; this model is conditioned on "
                                     f"{self._describe_columns()}")
        if not requests:
            raise ConditionError("attributes=[] asks for no images; give one mapping per image")
        return self._encode([dict(r) for r in requests])

    def decode(self, condition: torch.Tensor) -> dict[str, list]:
        """The condition tensor back to names, column -> values (None where unspecified), as `encode` reads them."""
        if self.encoding == CLASS_INDEX:
            names = self.groups[0].names
            return {self.groups[0].column: [names[i] if i < len(names) else None for i in condition.tolist()]}
        out: dict[str, list] = {}
        for group in self.groups:
            block = condition[:, self.block(group.column)] > 0.5
            values = []
            for row in block.tolist():
                chosen = [group.names[i] for i, on in enumerate(row[:len(group.names)]) if on]
                if group.kind == SINGLE:
                    values.append(chosen[0] if chosen else None)
                else:
                    values.append(chosen if any(row) else None)
            out[group.column] = values
        return out

    def _encode(self, requests: list[dict[str, Any]]) -> torch.Tensor:
        if self.encoding == CLASS_INDEX:
            group = self.groups[0]
            return torch.tensor(
                [self.null_class if r.get(group.column) is None else group.index(r[group.column]) for r in requests],
                dtype=torch.long,
            ).reshape(len(requests))
        out = torch.zeros(len(requests), self.width)
        for group, start in zip(self.groups, self._offsets[:-1], strict=True):
            for row, request in enumerate(requests):
                value = request.get(group.column)
                if value is None:
                    continue
                if group.kind == SINGLE:
                    out[row, start + group.index(value)] = 1.0
                    continue
                values = [value] if isinstance(value, str) else list(value)
                if not values:
                    out[row, start + len(group.names)] = 1.0  # the "nothing" slot
                for v in values:
                    out[row, start + group.index(v)] = 1.0
        return out

    def _require(self, encoding: str) -> None:
        if self.encoding != encoding:
            raise ConditionError(f"this condition is encoded as {self.encoding!r}, not {encoding!r}")

    def _group_position(self, column: str) -> int:
        if column not in self.columns:
            raise ConditionError(f"no condition column {column!r}; the condition is {self._describe_columns()}")
        return self.columns.index(column)

    def _describe_columns(self) -> str:
        return ", ".join(f"{g.column} ({g.kind}-label)" for g in self.groups)


def _unspecified_if_negative(value: Any) -> Any:
    return None if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value < 0 else value


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

