"""`PunkDiffPipeline`: DDPM sampling, reconstruction and RePaint inpainting, unconditional or classifier-free guided.

This file is the one source of the class. It imports only torch, diffusers (and its huggingface_hub), numpy,
PIL and the standard library, so punkdiff's export copies it next to a model as `pipeline.py` and a Hub user
without punkdiff can load it with `DiffusionPipeline.from_pretrained(repo, custom_pipeline=repo,
trust_remote_code=True)`. It knows nothing of punkdiff: the model card and punkdiff's checked push live in
`punkdiff.hub`. A conditional model's parts travel here too: its vocabulary (`ConditionVocabulary`, saved as
`condition.json`), the `AttributeEncoder` component and the classifier-free guidance step.
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
import numbers
import os
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    ImagePipelineOutput,
    RePaintScheduler,
    UNet2DModel,
    UniPCMultistepScheduler,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_repaint import RePaintSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import create_repo, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from torch import nn

# diffusers' `custom_pipeline=<folder or repo id>` loads the pipeline class from this file name.
CUSTOM_PIPELINE_FILE = "pipeline.py"
# Pixel-art models keep their training palette here (`{"colors": ["#rrggbb", ...]}`); stock diffusers ignores it.
PALETTE_FILE = "palette.json"
# How the model is meant to be sampled (`SamplingConfig`), beside `scheduler/`, which stays the training schedule.
SAMPLING_FILE = "sampling.json"
# The `save_pretrained(push_to_hub=True, ...)` arguments diffusers takes from its kwargs.
_PUSH_KWARGS = ("repo_id", "private", "token", "commit_message", "create_pr")

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor | list[PIL.Image.Image] | list[np.ndarray]
Generator = torch.Generator | list[torch.Generator] | None
Labels = int | str | Sequence[int | str | None] | None
Attributes = Mapping[str, Any] | Sequence[Mapping[str, Any]] | None
StepCallback = Callable[[DiffusionPipeline, int, torch.Tensor, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def predicted_x0_and_epsilon(
    model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""f_theta(x_t, t) and epsilon_theta(x_t, t): the UNet's output at (x_t, t) read as the target it was trained on.

    With `alpha_prod_t` = alpha_bar_t: epsilon as is, x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t);
    "sample" is x_0 itself; "v_prediction" gives x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v and
    eps = sqrt(alpha_bar_t) v + sqrt(1 - alpha_bar_t) x_t, with no division (alpha_bar_t may be 0 at zero terminal SNR).

    Examples:
        ```py
        >>> x_t, v = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
        >>> x0, eps = predicted_x0_and_epsilon(v, x_t, torch.tensor(0.0), "v_prediction")  # pure noise: x_0 = -v
        >>> torch.equal(x0, -v), torch.equal(eps, x_t)
        (True, True)
        ```
    """
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        return (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5, model_output
    if prediction_type == "sample":
        return model_output, (sample - alpha_prod_t**0.5 * model_output) / beta_prod_t**0.5
    if prediction_type == "v_prediction":
        return (alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output,
                alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample)
    raise ValueError(f"prediction_type {prediction_type!r} must be epsilon, sample or v_prediction")


def nearest_colour(images: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """Every pixel of `images` `[N, C, H, W]` replaced by the nearest of `colours` `[P, C]` (same value scale).

    Examples:
        ```py
        >>> nearest_colour(torch.tensor([[[[0.2]], [[0.9]]]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])).flatten()
        tensor([0., 1.])
        ```
    """
    pixels = images.movedim(1, -1)
    nearest = torch.cdist(pixels.reshape(-1, pixels.shape[-1]), colours).argmin(dim=1)
    return colours[nearest].reshape(pixels.shape).movedim(-1, 1)


def read_palette(path: str | os.PathLike[str]) -> torch.Tensor:
    """A `palette.json` (`{"colors": ["#rrggbb", ...]}`, or `"#gg"`-style one-channel values) -> uint8 `[P, C]`."""
    colours = json.loads(Path(path).read_text())["colors"]
    if not colours or not all(isinstance(c, str) and c.startswith("#") for c in colours):
        raise ValueError(f"{path}: 'colors' must be a non-empty list of '#rrggbb' strings.")
    return torch.tensor([list(bytes.fromhex(c[1:])) for c in colours], dtype=torch.uint8)


def write_palette(path: str | os.PathLike[str], palette: torch.Tensor | np.ndarray) -> None:
    """Write uint8 colours `[P, C]` as `palette.json`, the form `read_palette` reads."""
    colours = ["#" + bytes(int(v) for v in colour).hex() for colour in np.asarray(palette, dtype=np.uint8)]
    Path(path).write_text(json.dumps({"colors": colours}) + "\n")


# ---- the condition of a conditional model: its vocabulary, and requests as tensors --------------------------------
#
# A condition is one or more *groups*, each a dataset column: a **single-label** group (MNIST's `label`, the punks'
# `type`) gives one name per image, a **multi-label** group (the punks' `accessories`) a set of names. A lone
# single-label group is encoded as the class index, for `UNet2DModel`'s own class embedding (`num_class_embeds =
# num_classes + 1`, the last index the null class, "unspecified"); anything else as a multi-hot vector, a block per
# group (a multi-label block ends with a "nothing" slot for an explicitly empty set), where an all-zero block means
# "unspecified" and the all-zero vector is the null condition, mapped to the UNet by the `AttributeEncoder`.

SINGLE, MULTI = "single", "multi"
CLASS_INDEX, MULTI_HOT = "class_index", "multi_hot"
# the file a conditional model's vocabulary is saved in, beside its components
CONDITION_FILE = "condition.json"
_FORMAT, _VERSION = "punkdiff-condition", 1


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

    Saved with the model as `condition.json` (`to_json`), read back with `from_json`; training builds it from a
    dataset's columns. Sampling needs only this side of it: `encode_request` turns what a user asks for into the
    condition tensor, `null` gives the "unspecified" condition that guidance extrapolates from.

    Examples:
        ```py
        >>> digits = ConditionVocabulary((ConditionGroup("label", "single", tuple("0123456789")),))
        >>> digits.encoding, digits.encode_request(labels=[3, "7"]).tolist(), digits.null(2).tolist()
        ('class_index', [3, 7], [10, 10])
        ```
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

    # ---- saving ------------------------------------------------------------------------------------------------

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



# ---- the attribute encoder: a multi-hot condition -> the UNet's class embedding ----------------------------------


class AttributeEncoder(ModelMixin, ConfigMixin):
    r"""Multi-hot attributes `[B, num_attributes]` -> class embedding `[B, embedding_dim]`: a bias-free two-layer MLP.

    Args:
        num_attributes (`int`): Width of the multi-hot condition vector.
        embedding_dim (`int`): The UNet's time-embedding width, `4 * unet.config.block_out_channels[0]`.
        hidden_dim (`int`, *optional*): Hidden width; defaults to `embedding_dim`.

    Examples:
        ```py
        >>> encoder = AttributeEncoder(num_attributes=93, embedding_dim=128)
        >>> encoder(torch.zeros(2, 93)).abs().max().item()  # the null condition adds nothing
        0.0
        >>> encoder.save_pretrained("attribute_encoder")  # config.json + diffusion_pytorch_model.safetensors
        >>> AttributeEncoder.from_pretrained("attribute_encoder").config.num_attributes
        93
        ```
    """

    @register_to_config
    def __init__(self, num_attributes: int, embedding_dim: int, hidden_dim: int | None = None) -> None:
        super().__init__()
        if num_attributes < 1 or embedding_dim < 1 or (hidden_dim is not None and hidden_dim < 1):
            raise ValueError(f"AttributeEncoder needs positive widths, got num_attributes={num_attributes}, "
                             f"embedding_dim={embedding_dim}, hidden_dim={hidden_dim}")
        hidden_dim = hidden_dim or embedding_dim
        self.linear_1 = nn.Linear(num_attributes, hidden_dim, bias=False)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(hidden_dim, embedding_dim, bias=False)

    def forward(self, attributes: torch.Tensor) -> torch.Tensor:
        """`[B, num_attributes]` multi-hot (0/1, or fractions) -> `[B, embedding_dim]`, zero rows to zero rows."""
        if attributes.ndim != 2 or attributes.shape[1] != self.config.num_attributes:
            raise ValueError(f"AttributeEncoder expects attributes of shape [batch, {self.config.num_attributes}], "
                             f"got {list(attributes.shape)}; encode the request with the model's condition vocabulary")
        return self.linear_2(self.act(self.linear_1(attributes.to(self.linear_1.weight.dtype))))


# ---- classifier-free guidance (Ho & Salimans 2022) ---------------------------------------------------------------
#
# With the conditional prediction `cond` and the unconditional one `uncond` (the null condition), the guided
# prediction is `uncond + w * (cond - uncond)`. The paper writes it `(1 + w') cond - w' uncond`; here, as in
# diffusers, `w = 1 + w'`: `w = 1` is the conditional model alone, `w = 0` the unconditional one, `w > 1` pushes
# samples towards what the condition makes likelier. Linear in the prediction, so it applies to epsilon, v or sample
# predictions alike. Both predictions come from one batched forward: the noisy sample twice, conditioned then null
# (`doubled_batch`), split back afterwards (`split_doubled`).


def check_guidance_scale(guidance_scale: float) -> float:
    """The guidance scale as a float, or a ValueError that says what is accepted."""
    try:
        scale = float(guidance_scale)
    except (TypeError, ValueError):
        raise ValueError(f"guidance scale must be a number >= 0, got {guidance_scale!r}") from None
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"guidance scale must be a finite number >= 0 (1 = the conditional model alone, 0 = the "
                         f"unconditional one, 2-5 = typical guidance), got {guidance_scale!r}")
    return scale


def guided_output(
    model_output_cond: torch.Tensor, model_output_uncond: torch.Tensor, guidance_scale: float
) -> torch.Tensor:
    """`uncond + w * (cond - uncond)`: the classifier-free guided prediction.

    Examples:
        ```py
        >>> guided_output(torch.tensor([3.0]), torch.tensor([1.0]), 2.0)
        tensor([5.])
        ```
    """
    scale = check_guidance_scale(guidance_scale)
    return model_output_uncond + scale * (model_output_cond - model_output_uncond)


def doubled_batch(
    sample: torch.Tensor, condition: torch.Tensor, null_condition: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(sample, sample)` and `(condition, null_condition)` stacked along the batch: one forward gives both."""
    if condition.shape != null_condition.shape or condition.shape[0] != sample.shape[0]:
        raise ValueError(f"condition {list(condition.shape)} and null condition {list(null_condition.shape)} must "
                         f"match each other and the batch of {sample.shape[0]} samples")
    return torch.cat([sample, sample]), torch.cat([condition, null_condition.to(condition.device, condition.dtype)])


def split_doubled(model_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A doubled batch's output -> `(cond, uncond)`."""
    cond, uncond = model_output.chunk(2)
    return cond, uncond


def guided_prediction(
    unet: Callable[..., Any],
    sample: torch.Tensor,
    timestep: torch.Tensor | int,
    condition: torch.Tensor,
    null_condition: torch.Tensor,
    guidance_scale: float,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The guided prediction of a `UNet2DModel` at `timestep`, from one forward.

    `condition` is what `ConditionVocabulary` encodes (class indices or multi-hot); `encode` turns it into the
    UNet's `class_labels` (the attribute encoder; None for class indices). At `w = 1` only the conditional
    prediction is computed, at `w = 0` only the unconditional one.
    """
    scale = check_guidance_scale(guidance_scale)
    encode = encode or (lambda c: c)

    def forward(x: torch.Tensor, t: torch.Tensor | int, c: torch.Tensor) -> torch.Tensor:
        return unet(x, t, class_labels=encode(c)).sample

    if scale == 1.0:
        return forward(sample, timestep, condition)
    if scale == 0.0:
        return forward(sample, timestep, null_condition)
    samples, conditions = doubled_batch(sample, condition, null_condition)
    if torch.is_tensor(timestep) and timestep.ndim == 1 and timestep.shape[0] == sample.shape[0]:
        timestep = torch.cat([timestep, timestep])
    cond, uncond = split_doubled(forward(samples, timestep, conditions))
    return guided_output(cond, uncond, scale)


class _ExactTimesteps:
    """`set_timesteps` with exactly `num_inference_steps` timesteps, computed in exact arithmetic.

    Upstream builds "trailing" and "linspace" timesteps in floating point. "trailing" takes
    `np.round(np.arange(T, 0, -T / n)) - 1`, which for some n (62 of 1..1000 with T = 1000, e.g. n = 61) has n + 1
    values, the last t = -1: the model is then called at t = -1 and `alphas_cumprod[-1]`, the noisiest level, is
    used for an almost clean sample. And where the exact value is a .5 tie, float error picks the side, so a
    timestep can be off by one. Here, as in Lin et al. 2024, Table 2, with T = `num_train_timesteps`:
    "leading" t_i = i * (T // n) + steps_offset, "trailing" t_k = round(T * k / n) - 1, "linspace"
    t_i = round(i * (T - 1) / (n - 1)), for i < n and 1 <= k <= n, each rounded half to even from the exact
    fraction. Custom `timesteps` (DDPM) are kept as given.
    """

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device = None, **kwargs):
        """Upstream's checks and state, then the exact timesteps (see the class docstring).

        Examples:
            ```py
            >>> sched = ExactDDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
            >>> sched.set_timesteps(61)
            >>> len(sched.timesteps), int(sched.timesteps[-1])  # upstream: 62 timesteps, the last -1
            (61, 15)
            ```
        """
        super().set_timesteps(num_inference_steps, device, **kwargs)  # validates, sets num_inference_steps
        if num_inference_steps is None:
            return
        T, n, spacing = self.config.num_train_timesteps, num_inference_steps, self.config.timestep_spacing
        if spacing == "leading":
            steps = [i * (T // n) + self.config.steps_offset for i in range(n)]
        elif spacing == "trailing":
            steps = [round(Fraction(T * k, n)) - 1 for k in range(1, n + 1)]
        else:  # "linspace": upstream has rejected any other spacing
            steps = [round(Fraction(i * (T - 1), max(n - 1, 1))) for i in range(n)]
        if steps[-1] >= T:
            raise ValueError(f"steps_offset={self.config.steps_offset} puts timestep {steps[-1]} outside [0, {T}).")
        self.timesteps = torch.tensor(steps[::-1], device=device)


class ExactDDIMScheduler(_ExactTimesteps, DDIMScheduler):
    r"""`DDIMScheduler` with exact timesteps, whose step lands on the next of them, for every `timestep_spacing`.

    Two deviations of upstream are fixed. `set_timesteps` is `_ExactTimesteps`'s (no extra t = -1 step with
    "trailing", exact rounding). And upstream `DDIMScheduler.step` takes the previous timestep as
    `t - num_train_timesteps // num_inference_steps`, which is only the next scheduled timestep for "leading"
    spacing; with "trailing" or "linspace" it steps to a timestep that is not in the schedule (diffusers issues
    #11347 and #12633). Here the previous timestep is the next entry of `timesteps` (or -1, i.e.
    `final_alpha_cumprod`, after the last), as `DDPMScheduler.previous_timestep` does. The update is upstream's
    equation for equation, the noise is drawn as upstream draws it, and the config stays a stock `DDIMScheduler`
    one. `step` reads the scheduler and never writes to it, so one instance may serve concurrent calls.
    """

    def previous_timestep(self, timestep: int | torch.Tensor) -> int:
        """The scheduled timestep after `timestep`, or -1 after the last (alpha_bar is then `final_alpha_cumprod`)."""
        timesteps = self.timesteps.tolist()
        index = timesteps.index(int(timestep))
        return timesteps[index + 1] if index + 1 < len(timesteps) else -1

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DDIMSchedulerOutput | tuple:
        r"""One reverse step x_t -> x_{t'} from `timestep` t to the next scheduled timestep t' (Song et al. 2021).

        Eq. (12) with sigma_t(eta) from Eq. (16), in the paper's notation (variable -> symbol):
        - `alpha_prod_t`, `alpha_prod_t_prev` -> alpha_t, alpha_{t'} (the paper's alphas are diffusers' alphas_cumprod)
        - `pred_epsilon` -> epsilon_theta(x_t, t)
        - `pred_original_sample` -> f_theta(x_t, t), the "predicted x_0"
        - `std_dev_t` -> sigma_t(eta) = eta * sqrt((1 - alpha_{t'}) / (1 - alpha_t)) * sqrt(1 - alpha_t / alpha_{t'})
        - `pred_sample_direction` -> sqrt(1 - alpha_{t'} - sigma_t^2) * epsilon_theta, "direction pointing to x_t"
        - `prev_sample` -> x_{t'} = sqrt(alpha_{t'}) * f_theta + direction + sigma_t * z, z ~ N(0, I)

        Args:
            model_output: The UNet's output at (x_t, t): epsilon, v or x_0 as `prediction_type` says.
            timestep: t, one of `self.timesteps`.
            sample: x_t.
            eta: Noise weight; 0 is deterministic DDIM, 1 gives DDPM's posterior variance.
            use_clipped_model_output: Re-derive epsilon from the clipped x_0 (as GLIDE does).
            generator: For z (drawn only when eta > 0, exactly as upstream draws it).
            variance_noise: z itself, instead of drawing it.
            return_dict: Return a `DDIMSchedulerOutput` rather than a tuple.

        Examples:
            ```py
            >>> scheduler = ExactDDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
            >>> scheduler.set_timesteps(61)
            >>> x_t = torch.randn(1, 3, 8, 8)
            >>> out = scheduler.step(torch.zeros_like(x_t), scheduler.timesteps[0], x_t)
            >>> out.prev_sample.shape
            torch.Size([1, 3, 8, 8])
            ```
        """
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None'; run 'set_timesteps' before 'step'.")
        # 1. t and the next scheduled timestep t'
        t = int(timestep)
        prev_t = self.previous_timestep(t)

        # 2. alpha_t, alpha_{t'} and 1 - alpha_t
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t

        # 3. f_theta(x_t, t) and epsilon_theta(x_t, t) from the model output
        pred_original_sample, pred_epsilon = predicted_x0_and_epsilon(
            model_output, sample, alpha_prod_t, self.config.prediction_type
        )

        # 4. clip or threshold f_theta
        if self.config.thresholding:
            pred_original_sample = self._threshold_sample(pred_original_sample)
        elif self.config.clip_sample:
            clip = self.config.clip_sample_range
            pred_original_sample = pred_original_sample.clamp(-clip, clip)

        # 5. sigma_t(eta), Eq. (16)
        std_dev_t = eta * self._get_variance(t, prev_t) ** 0.5
        if use_clipped_model_output:
            pred_epsilon = (sample - alpha_prod_t**0.5 * pred_original_sample) / beta_prod_t**0.5

        # 6. the direction pointing to x_t, and x_{t'} without noise, Eq. (12)
        pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * pred_epsilon
        prev_sample = alpha_prod_t_prev**0.5 * pred_original_sample + pred_sample_direction

        # 7. + sigma_t * z
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("Pass either `generator` or `variance_noise`, not both.")
            if variance_noise is None:
                variance_noise = randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
                )
            prev_sample = prev_sample + std_dev_t * variance_noise

        if not return_dict:
            return prev_sample, pred_original_sample
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


class ExactDDPMScheduler(_ExactTimesteps, DDPMScheduler):
    """`DDPMScheduler` with exact timesteps and no noise on its last step, for every `timestep_spacing`.

    Two deviations of upstream are fixed. `set_timesteps` is `_ExactTimesteps`'s (no extra t = -1 step with
    "trailing", exact rounding). And upstream `DDPMScheduler.step` adds noise whenever `t > 0` rather than
    whenever a step remains, so when the last scheduled timestep is above 0 ("trailing", or `steps_offset` > 0)
    the final sample gets noise too: std sqrt(1 - alpha_bar_t) with "fixed_large". Ho et al. 2020, Algorithm 2,
    sets z = 0 at the last step. Here the step whose previous timestep is -1 returns the posterior mean, which
    with alpha_bar_prev = 1 is exactly upstream's `pred_original_sample` (coefficients 1 and 0, as upstream
    computes them). Upstream still draws that step's noise, which is discarded, so a generator ends one draw
    further on than the reference's; the images are the same. The config stays a stock `DDPMScheduler` one.
    """

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ):
        """Upstream's DDPM step (Ho et al. 2020, Algorithm 2), returning the posterior mean at the last step.

        Examples:
            ```py
            >>> sched = ExactDDPMScheduler(timestep_spacing="trailing")
            >>> sched.set_timesteps(10)
            >>> x_t = torch.randn(1, 1, 8, 8)
            >>> last = sched.step(torch.zeros_like(x_t), sched.timesteps[-1], x_t)
            >>> torch.equal(last.prev_sample, last.pred_original_sample)  # z = 0 at the last step
            True
            ```
        """
        output = super().step(model_output, timestep, sample, generator=generator)
        if self.previous_timestep(timestep) < 0:
            output.prev_sample = output.pred_original_sample
        return output if return_dict else output.to_tuple()


class ExactRePaintScheduler(RePaintScheduler):
    r"""`RePaintScheduler` whose walk starts at t = T - 1 for every step count, with steps of any length.

    Upstream spaces its n steps by `T // n` from 0, so unless n divides T the walk never reaches the noisiest
    level it starts from (250 steps on T = 300 start at t = 249, where x_t is not pure noise), and `step` and
    `undo_step` assume that fixed stride. Here the n levels are spaced "trailing" (Lin et al. 2024), t_k =
    round(T * k / n) - 1 for 1 <= k <= n, so the first is T - 1; the walk over them (jumps back of `jump_length`
    levels, `jump_n_sample` times) is upstream's; each step goes to the next lower level and each jump back
    re-noises to the next higher one. With n = T this is upstream step for step (same noise draws, same images).

    Notation (Lugmayr et al. 2022, Algorithm 1, with the DDIM update of Song et al. 2021, Eq. (12)):
    - `alpha_prod_t`, `alpha_prod_t_prev` -> alpha_bar_t, alpha_bar_{t'} (t' is the next lower level, or the clean
      image after the last: alpha_bar = `final_alpha_cumprod`)
    - `pred_original_sample`, `pred_epsilon` -> x_0 and epsilon predicted from the UNet's output at (x_t, t): epsilon
      itself, or v (x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v; eps = sqrt(alpha_bar_t) v +
      sqrt(1 - alpha_bar_t) x_t), for `prediction_type` "epsilon" or "v_prediction"
    - `std_dev_t` -> eta * sigma_t, with
      sigma_t^2 = (1 - alpha_bar_{t'}) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_{t'})
    - `prev_unknown_part` -> x_{t'}^unknown = sqrt(alpha_bar_{t'}) x_0 + sqrt(1 - alpha_bar_{t'} - std^2) eps + std z
    - `prev_known_part` -> x_{t'}^known ~ q(x_{t'} | x_0 = original image)
    - `prev_sample` -> x_{t'} = m * known + (1 - m) * unknown, m = 1 where the original is kept
    """

    prediction_type = "epsilon"

    def use_schedule_of(self, scheduler: SchedulerMixin) -> None:
        """Take the noise levels and the prediction target of the model's own scheduler.

        Upstream's constructor knows neither `prediction_type` nor `rescale_betas_zero_snr`, so built from a
        zero-terminal-SNR v-prediction model's config it would walk a different schedule than the model learned.
        """
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        self.betas = scheduler.betas.clone()
        self.alphas = scheduler.alphas.clone()
        self.alphas_cumprod = scheduler.alphas_cumprod.clone()

    def set_timesteps(
        self, num_inference_steps: int, jump_length: int = 10, jump_n_sample: int = 10, device=None
    ) -> None:
        """The walk over the levels (upstream's, in level indices), each index mapped to its trailing timestep.

        Examples:
            ```py
            >>> sched = ExactRePaintScheduler(num_train_timesteps=300)
            >>> sched.set_timesteps(250, jump_length=10, jump_n_sample=10)
            >>> int(sched.timesteps[0]), int(sched.levels[0])  # upstream starts at 249 and ends at 0
            (299, 0)
            ```
        """
        T = self.config.num_train_timesteps
        n = min(T, num_inference_steps)
        self.num_inference_steps = n
        # the levels t_1 < ... < t_n, t_n = T - 1
        self.levels = torch.tensor([round(Fraction(T * k, n)) - 1 for k in range(1, n + 1)])
        jumps = {k: jump_n_sample - 1 for k in range(0, n - jump_length, jump_length)}
        walk, k = [], n
        while k >= 1:
            k -= 1
            walk.append(k)
            if jumps.get(k, 0) > 0:
                jumps[k] -= 1
                for _ in range(jump_length):
                    k += 1
                    walk.append(k)
        self.timesteps = self.levels[walk].to(device)

    def _alpha_prod_prev(self, t: int) -> torch.Tensor:
        """alpha_bar at the level below t (the clean image's `final_alpha_cumprod` below the lowest)."""
        index = int(torch.searchsorted(self.levels, t))
        return self.alphas_cumprod[self.levels[index - 1]] if index > 0 else self.final_alpha_cumprod

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        original_image: torch.Tensor,
        mask: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ):
        """One reverse step x_t -> x_{t'} to the next lower level, the known region taken from the original.

        Examples:
            ```py
            >>> sched = ExactRePaintScheduler(num_train_timesteps=300)
            >>> sched.set_timesteps(7, jump_length=2, jump_n_sample=2)
            >>> x_t, image, keep = torch.randn(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8)
            >>> sched.step(torch.zeros_like(x_t), sched.timesteps[0], x_t, image, keep).prev_sample.shape
            torch.Size([1, 1, 8, 8])
            ```
        """
        # 1. alpha_bar_t, alpha_bar_{t'}
        t = int(timestep)
        alpha_prod_t, alpha_prod_t_prev = self.alphas_cumprod[t], self._alpha_prod_prev(t)
        beta_prod_t = 1 - alpha_prod_t
        # 2. the predicted x_0 (clipped as configured) and epsilon, from the target the model was trained on
        pred_original_sample, pred_epsilon = predicted_x0_and_epsilon(
            model_output, sample, alpha_prod_t, self.prediction_type
        )
        if self.config.clip_sample:
            pred_original_sample = pred_original_sample.clamp(-1, 1)
        # 3. z ~ N(0, I), drawn as upstream draws it (also used for the known part)
        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                             dtype=model_output.dtype)
        variance = (1 - alpha_prod_t_prev) / beta_prod_t * (1 - alpha_prod_t / alpha_prod_t_prev)
        std_dev_t = self.eta * variance**0.5
        # 4. the unknown region: the DDIM update (noise only where t > 0 and eta > 0, as upstream)
        pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * pred_epsilon
        prev_unknown_part = alpha_prod_t_prev**0.5 * pred_original_sample + pred_sample_direction
        if t > 0 and self.eta > 0:
            prev_unknown_part = prev_unknown_part + std_dev_t * noise
        # 5. the known region: the original image noised to t'
        prev_known_part = alpha_prod_t_prev**0.5 * original_image + (1 - alpha_prod_t_prev) ** 0.5 * noise
        # 6. x_{t'}: known where the mask keeps the original
        prev_sample = mask * prev_known_part + (1.0 - mask) * prev_unknown_part
        if not return_dict:
            return prev_sample, pred_original_sample
        return RePaintSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def undo_step(self, sample: torch.Tensor, timestep: int | torch.Tensor, generator=None) -> torch.Tensor:
        """A jump back: x_{t'} -> x_t ~ q(x_t | x_{t'}), from the level below `timestep` up to it, in one draw.

        Examples:
            ```py
            >>> sched = ExactRePaintScheduler(num_train_timesteps=300)
            >>> sched.set_timesteps(7)
            >>> sched.undo_step(torch.zeros(1, 1, 8, 8), sched.levels[3]).std() > 0
            tensor(True)
            ```
        """
        t = int(timestep)
        alpha = self.alphas_cumprod[t] / self._alpha_prod_prev(t)  # prod of (1 - beta) over the levels crossed
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        return alpha**0.5 * sample + (1 - alpha) ** 0.5 * noise


@dataclass(frozen=True)
class NamedSampler:
    """A sampler by name: a scheduler class, and the config keys it sets over the model's saved (training) config.

    The keys go to `from_config` as keywords, because `from_config` drops every key a config lists in
    `_use_default_values` (those an in-memory scheduler never set), so an edited dict would be half ignored.
    """

    scheduler_class: type[SchedulerMixin]
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def from_config(self, config: Mapping[str, Any]) -> SchedulerMixin:
        """A fresh scheduler of this kind for the noise schedule in `config` (a model's saved scheduler config).

        Examples:
            ```py
            >>> sched = SAMPLERS["ddim-trailing"].from_config(DDPMScheduler().config)
            >>> sched.set_timesteps(4)
            >>> sched.timesteps.tolist()
            [999, 749, 499, 249]
            ```
        """
        return self.scheduler_class.from_config(config, **self.overrides)

    @property
    def uses_eta(self) -> bool:
        """Whether the call's `eta` (DDIM's noise weight) changes what this sampler draws."""
        return issubclass(self.scheduler_class, DDIMScheduler)


_DPM_SOLVER_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2, "timestep_spacing": "linspace"}
# The samplers `PunkDiffPipeline` runs by name (`pipe(sampler=...)`, `punkdiff sample --scheduler ...`). DPM-Solver++
# and UniPC always start at t = T - 1 (diffusers' own "linspace" spacing for them, whatever the saved config says).
SAMPLERS: dict[str, NamedSampler] = {
    # ancestral DDPM (Ho et al. 2020); by default every training step
    "ddpm": NamedSampler(ExactDDPMScheduler),
    # DDIM (Song et al. 2021) with the saved config's spacing; eta from 0 (deterministic) to 1 (DDPM-like)
    "ddim": NamedSampler(ExactDDIMScheduler),
    # DDIM from t = T - 1 (Lin et al. 2024): the few-step choice, and a distilled student's sampler
    "ddim-trailing": NamedSampler(ExactDDIMScheduler, {"timestep_spacing": "trailing"}),
    # DPM-Solver++ 2M (Lu et al. 2022), with the noise levels of Karras et al. 2022 or without
    "dpm++": NamedSampler(DPMSolverMultistepScheduler, _DPM_SOLVER_2M),
    "dpm++-karras": NamedSampler(DPMSolverMultistepScheduler, {**_DPM_SOLVER_2M, "use_karras_sigmas": True}),
    # UniPC of order 2 (Zhao et al. 2023), with Karras et al. 2022 noise levels or without
    "unipc": NamedSampler(UniPCMultistepScheduler, {"timestep_spacing": "linspace"}),
    "unipc-karras": NamedSampler(UniPCMultistepScheduler, {"timestep_spacing": "linspace", "use_karras_sigmas": True}),
}
# What `sampler=None` runs for a saved stock scheduler (and no recommendation): the exact version of its class.
_EXACT = {DDPMScheduler: ExactDDPMScheduler, DDIMScheduler: ExactDDIMScheduler}


@dataclass(frozen=True)
class _Guidance:
    """One call's condition: None for an unconditional model; else the encoded request, the null condition and w."""

    batch_size: int
    condition: torch.Tensor | None = None
    null_condition: torch.Tensor | None = None
    scale: float = 1.0


def _is_conditional(unet: UNet2DModel) -> bool:
    """Whether the UNet has a class embedding, i.e. needs `class_labels`."""
    return unet.config.class_embed_type is not None or unet.config.num_class_embeds is not None


def _check_conditional_parts(
    unet: UNet2DModel, attribute_encoder: AttributeEncoder | None, condition: ConditionVocabulary | None
) -> None:
    """Refuse a condition, an encoder and a UNet that do not fit together, saying what each has."""
    if condition is None:
        if attribute_encoder is not None:
            raise ValueError("an attribute_encoder needs the condition vocabulary it encodes: pass condition=")
        return
    config = unet.config
    if condition.encoding == CLASS_INDEX:
        if attribute_encoder is not None or config.class_embed_type is not None \
                or config.num_class_embeds != condition.null_class + 1:
            raise ValueError(
                f"a condition of {condition.null_class} classes needs a UNet with its own class embedding, "
                f"num_class_embeds={condition.null_class + 1} (the last the null class) and no attribute_encoder; "
                f"got num_class_embeds={config.num_class_embeds}, class_embed_type={config.class_embed_type!r}"
            )
        return
    if attribute_encoder is None or config.class_embed_type != "identity":
        raise ValueError(f"a condition of attributes ({condition._describe_columns()}) needs an attribute_encoder "
                         f"and a UNet with class_embed_type='identity'; got class_embed_type="
                         f"{config.class_embed_type!r} and {'an' if attribute_encoder else 'no'} encoder")
    if attribute_encoder.config.num_attributes != condition.width:
        raise ValueError(f"the attribute_encoder takes {attribute_encoder.config.num_attributes} attributes but the "
                         f"condition is {condition.width} wide")


@dataclass(frozen=True)
class SamplingConfig:
    """How a model is meant to be sampled, saved beside it as `sampling.json` and used by calls that leave it out.

    Args:
        sampler: A name in `SAMPLERS`.
        num_inference_steps: Steps (network evaluations) per image.
        eta: DDIM's noise weight, in [0, 1] (0 deterministic, 1 DDPM-like).
        distilled_steps: For a distilled student, the step count it was trained to sample in; other counts warn.

    Examples:
        ```py
        >>> SamplingConfig.from_dict({"sampler": "ddim", "num_inference_steps": 50, "eta": 1.0})
        SamplingConfig(sampler='ddim', num_inference_steps=50, eta=1.0, distilled_steps=None)
        >>> SamplingConfig("ddim", 50, 1.0).fill("dpm++", None, None)  # another sampler keeps its own defaults
        ('dpm++', None, None)
        ```
    """

    sampler: str
    num_inference_steps: int
    eta: float = 0.0
    distilled_steps: int | None = None

    @classmethod
    def from_dict(cls, data: object) -> SamplingConfig:
        """Check a `sampling.json` object; `ValueError` names each wrong field and what it must be."""
        if not isinstance(data, dict):
            raise ValueError('must hold a JSON object, e.g. {"sampler": "ddim", "num_inference_steps": 50, "eta": 1}')

        def count(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        known = {"sampler", "num_inference_steps", "eta", "distilled_steps"}
        problems = [f"unknown key {key!r} (known: {', '.join(sorted(known))})" for key in sorted(set(data) - known)]
        if not (isinstance(data.get("sampler"), str) and data["sampler"] in SAMPLERS):
            problems.append(f"sampler must be one of {', '.join(SAMPLERS)}, got {data.get('sampler')!r}")
        if not count(data.get("num_inference_steps")):
            problems.append(f"num_inference_steps must be a positive integer, got {data.get('num_inference_steps')!r}")
        eta = data.get("eta", 0.0)
        if not (isinstance(eta, (int, float)) and not isinstance(eta, bool) and math.isfinite(eta) and 0 <= eta <= 1):
            problems.append(f"eta must be a number in [0, 1], got {eta!r}")
        if data.get("distilled_steps") is not None and not count(data["distilled_steps"]):
            problems.append(f"distilled_steps must be a positive integer, got {data['distilled_steps']!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return cls(data["sampler"], data["num_inference_steps"], float(eta), data.get("distilled_steps"))

    def fill(
        self, sampler: str | SchedulerMixin | None, num_inference_steps: int | None, eta: float | None
    ) -> tuple[str | SchedulerMixin, int | None, float | None]:
        """A call's sampler, steps and eta, with those left `None` taken from this recommendation.

        Steps and eta were chosen with the sampler, so they are filled only when the call samples with the
        recommended sampler (or leaves it out); another sampler keeps its own defaults.
        """
        if sampler is not None and not (isinstance(sampler, str) and sampler.lower() == self.sampler):
            return sampler, num_inference_steps, eta
        return (
            self.sampler,
            self.num_inference_steps if num_inference_steps is None else num_inference_steps,
            self.eta if eta is None else eta,
        )


def read_sampling_config(path: str | os.PathLike[str]) -> SamplingConfig:
    """A `sampling.json` -> `SamplingConfig`; `ValueError` (with the path) if it is not one."""
    try:
        return SamplingConfig.from_dict(json.loads(Path(path).read_text()))
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: {err}") from err


def write_sampling_config(path: str | os.PathLike[str], config: SamplingConfig) -> None:
    """Write `config` as `sampling.json`, the form `read_sampling_config` reads (no `distilled_steps` if None)."""
    data = {k: v for k, v in asdict(config).items() if v is not None}
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


@dataclass
class PunkDiffPipelineOutput(ImagePipelineOutput):
    """Images, plus, with `return_trajectory=True`, x_t and the predicted x_0 after every step (for GIFs).

    Args:
        images: The final images as PIL images, a `(B, H, W, C)` array or a `(B, C, H, W)` tensor in [0, 1].
        trajectory: One entry per denoising step, each a batch of x_t in the same `output_type` as `images`.
        pred_original_samples: One entry per step, each a batch of the predicted x_0 at that step.
    """

    trajectory: list[Any] | None = None
    pred_original_samples: list[Any] | None = None


class PunkDiffPipeline(DiffusionPipeline):
    r"""Pipeline for image generation, reconstruction and inpainting with one DDPM-trained UNet.

    The sampler is chosen per call (a name in `SAMPLERS`: `"ddpm"`, `"ddim"`, `"ddim-trailing"`, `"dpm++"`,
    `"dpm++-karras"`, `"unipc"`, `"unipc-karras"`; or a scheduler instance) and built with `from_config` from the
    saved scheduler, so a call never changes `self.scheduler` or its config. DDPM and DDIM use
    [`ExactDDPMScheduler`] and [`ExactDDIMScheduler`], which give the reference result for every
    `timestep_spacing`; a saved stock `DDPMScheduler`/`DDIMScheduler` runs as its exact version too.

    A model saved with a `sampling.json` (`SamplingConfig`, in `self.sampling_config`) says how it is meant to be
    sampled: a call that leaves out the sampler, steps or eta takes them from it. A distilled student records
    the step count it was distilled for, and sampling it at another count warns.

    Pixel art (CryptoPunks) is drawn from a small palette, which a denoiser only approximates: a pipeline with a
    `palette` (uint8 `[P, C]`, the training images' colours, saved beside the model as `palette.json`) snaps
    every pixel of its final images to the nearest palette colour, unless a call passes `snap_to_palette=False`.

    A conditional model (classifier-free guidance, Ho & Salimans 2022) carries its `condition`, the vocabulary it
    was trained on (saved as `condition.json`): a single-label model (digits) uses the UNet's own class embedding,
    whose last class is the null condition; an attribute model (punk type and accessories) also has an
    `attribute_encoder` that maps the multi-hot condition to the UNet's class embedding (`class_embed_type=
    "identity"`). Calls then take `labels=` or `attributes=` and a `guidance_scale`.

    Args:
        unet ([`UNet2DModel`]): The denoiser, trained in [-1, 1] pixel space with 1 (grayscale) or 3 channels.
        scheduler ([`SchedulerMixin`]): The training noise schedule, usually a [`DDPMScheduler`].
        attribute_encoder ([`AttributeEncoder`], *optional*): For attribute models: multi-hot -> class embedding.
        condition ([`ConditionVocabulary`], *optional*): What a conditional model is told; None for an
            unconditional model.

    Examples:
        ```py
        >>> from diffusers import DDPMScheduler, UNet2DModel
        >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        ...                    norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
        ...                    up_block_types=("UpBlock2D",) * 2)
        >>> pipe = PunkDiffPipeline(unet=unet, scheduler=DDPMScheduler())
        >>> pipe(batch_size=2, sampler="ddim", num_inference_steps=5).images[0].size
        (8, 8)
        ```
    """

    model_cpu_offload_seq = "attribute_encoder->unet"
    _optional_components = ["attribute_encoder"]
    _callback_tensor_inputs = ["latents", "pred_original_sample"]

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: SchedulerMixin,
        attribute_encoder: AttributeEncoder | None = None,
        condition: ConditionVocabulary | None = None,
    ):
        super().__init__()
        # an absent encoder is registered as None (diffusers' `components` expects every optional component) and
        # left out of `model_index.json` by `save_pretrained`, so unconditional folders stay stock ones
        self.register_modules(unet=unet, scheduler=scheduler, attribute_encoder=attribute_encoder)
        if unet is not None and condition is not None:
            _check_conditional_parts(unet, attribute_encoder, condition)
        self.condition = condition
        grayscale = unet is not None and unet.config.in_channels == 1
        # No resizing: the model works at its own resolution, and a wrong-sized input is an error, not a guess.
        self.image_processor = VaeImageProcessor(
            vae_scale_factor=1, do_resize=False, do_convert_rgb=not grayscale, do_convert_grayscale=grayscale
        )
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=1, do_resize=False, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )
        self.palette: torch.Tensor | None = None
        self.sampling_config: SamplingConfig | None = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], **kwargs: Any) -> PunkDiffPipeline:
        """diffusers' `from_pretrained`, plus the folder's `palette.json` when the model is pixel art, its
        `sampling.json` (the recommended sampling) if any, and its `condition.json` and `attribute_encoder` when it
        is conditional."""
        revision = kwargs.get("revision")
        path = _model_file(pretrained_model_name_or_path, CONDITION_FILE, revision)
        if path is not None and "condition" not in kwargs:
            kwargs["condition"] = ConditionVocabulary.from_json(path.read_text())
        if kwargs.get("condition") is not None and kwargs["condition"].encoding == MULTI_HOT:
            # loaded here, so the component's module name in `model_index.json` never has to be importable
            encoder_kwargs = {k: kwargs[k] for k in ("cache_dir", "token", "local_files_only", "use_safetensors")
                              if k in kwargs}
            dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
            if isinstance(dtype, Mapping):  # diffusers' per-component dtypes
                dtype = dtype.get("attribute_encoder", dtype.get("default"))
            if dtype is not None:
                encoder_kwargs["dtype"] = dtype
            kwargs.setdefault("attribute_encoder", AttributeEncoder.from_pretrained(
                pretrained_model_name_or_path, subfolder="attribute_encoder", revision=revision, **encoder_kwargs
            ))
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        path = _model_file(pretrained_model_name_or_path, PALETTE_FILE, revision)
        if path is not None:
            pipe.palette = read_palette(path)
        path = _model_file(pretrained_model_name_or_path, SAMPLING_FILE, kwargs.get("revision"))
        if path is not None:
            pipe.sampling_config = read_sampling_config(path)
        return pipe

    def register_to_config(self, **kwargs: Any) -> None:
        """diffusers' `register_to_config`. When `from_pretrained` records where the pipeline came from (every
        route: this class's and diffusers' `custom_pipeline=`), a class-conditional UNet's `condition.json` is read
        from there, so a Hub user without punkdiff gets the vocabulary too."""
        super().register_to_config(**kwargs)
        source = kwargs.get("_name_or_path")
        if source is None or getattr(self, "condition", None) is not None or not _is_conditional(self.unet):
            return
        path = _model_file(source, CONDITION_FILE, None)
        if path is not None:
            condition = ConditionVocabulary.from_json(path.read_text())
            _check_conditional_parts(self.unet, self.attribute_encoder, condition)
            self.condition = condition

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int | None = None,
        labels: Labels = None,
        attributes: Attributes = None,
        guidance_scale: float = 1.0,
        generator: Generator = None,
        num_inference_steps: int | None = None,
        eta: float | None = None,
        sampler: str | SchedulerMixin | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        return_trajectory: bool = False,
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        snap_to_palette: bool = True,
    ) -> PunkDiffPipelineOutput | tuple:
        r"""Sample images from pure noise, of what `labels` or `attributes` ask for when the model is conditional.

        Args:
            batch_size: Number of images; by default one per request of a list of `labels`/`attributes`, else 1.
            labels: For a single-label model (digits): one label (name or index) for the whole batch, or a list
                with one per image, e.g. `[3, 7]`; None leaves the label unspecified.
            attributes: For an attribute model: one request for the whole batch, e.g. `{"type": "Ape",
                "accessories": ["Cap", "3D Glasses"]}`, or a list with one per image. A column left out is
                unspecified; an empty list asks for none of that column's names.
            guidance_scale: Classifier-free guidance weight w, as in diffusers: the prediction is `uncond + w *
                (cond - uncond)`, so 1 is the conditional model alone (one forward per step), 0 the unconditional
                one, and w > 1 follows the condition more closely (both predictions from one forward on a doubled
                batch). A conditional model called without `labels`/`attributes` samples its null condition,
                unguided.
            generator: One `torch.Generator`, or a list with one per image; with a list, image i depends only on
                `generator[i]`, so it is the same whatever the batch size.
            num_inference_steps: Denoising steps (network evaluations); `None` means the model's recommended
                count (`sampling_config`) when sampling with its recommended sampler, else every training step for
                DDPM and 50 otherwise.
            eta: DDIM noise weight (0 is deterministic DDIM, 1 is DDPM-like); ignored by other samplers. `None`
                means the recommended eta with the recommended sampler, else 0.
            sampler: A name in `SAMPLERS` (`"ddpm"`, `"ddim"`, `"ddim-trailing"`, `"dpm++"`, `"dpm++-karras"`,
                `"unipc"`, `"unipc-karras"`), a scheduler instance, or `None` for the model's recommended sampler
                (`sampling_config`), else the saved scheduler's class. It is built from the saved scheduler's
                config for this call only.
            output_type: `"pil"`, `"np"` or `"pt"`; arrays and tensors are in [0, 1].
            return_dict: Return a [`PunkDiffPipelineOutput`] rather than a tuple.
            return_trajectory: Also return x_t and the predicted x_0 after each step.
            callback_on_step_end: Called as `callback(pipe, step_index, timestep, callback_kwargs)` after each
                step, like other diffusers pipelines; a `"latents"` entry in the returned dict replaces x_t.
            callback_on_step_end_tensor_inputs: Which of `"latents"` and `"pred_original_sample"` go into
                `callback_kwargs` (default `["latents"]`).
            snap_to_palette: Snap the final images to `self.palette` when the pipeline has one (pixel art).

        Examples:
            ```py
            >>> pipe = PunkDiffPipeline.from_pretrained("path/to/export")
            >>> generator = [torch.Generator().manual_seed(i) for i in range(4)]
            >>> images = pipe(batch_size=4, generator=generator, sampler="ddim", num_inference_steps=50).images
            >>> images = pipe(batch_size=4, generator=generator).images  # as the model's sampling.json says
            >>> images = pipe(batch_size=4, sampler="dpm++-karras", num_inference_steps=10).images
            >>> digits = PunkDiffPipeline.from_pretrained("path/to/digits")  # a conditional model
            >>> sevens = digits(labels=7, batch_size=4, guidance_scale=3.0).images
            >>> punks = PunkDiffPipeline.from_pretrained("path/to/punks")
            >>> apes = punks(attributes={"type": "Ape", "accessories": ["Cap"]}, batch_size=4, guidance_scale=3.0)
            ```
        """
        # 1. check the inputs, encode the condition, and build this call's sampler from the saved config
        guidance = self._prepare_condition(labels, attributes, guidance_scale, batch_size)
        batch_size = guidance.batch_size
        self._check_generator(generator, batch_size)
        sampler, num_inference_steps, eta = self._recommended(sampler, num_inference_steps, eta)
        sched = self._make_sampler(sampler)
        sched.set_timesteps(self._default_steps(sched, num_inference_steps))
        # 2. x_T ~ N(0, I), scaled as the sampler expects
        latents = randn_tensor(
            self._image_shape(batch_size), generator=generator, device=self._execution_device, dtype=self.unet.dtype
        )
        latents = latents * sched.init_noise_sigma
        # 3. denoise from x_T to x_0
        return self._denoise(
            sched, sched.timesteps, latents, guidance, generator=generator, eta=eta, output_type=output_type,
            return_dict=return_dict, return_trajectory=return_trajectory, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, snap_to_palette=snap_to_palette,
        )

    @torch.no_grad()
    def reconstruct(
        self,
        image: ImageInput,
        t_start: int,
        labels: Labels = None,
        attributes: Attributes = None,
        guidance_scale: float = 1.0,
        generator: Generator = None,
        num_inference_steps: int | None = None,
        eta: float = 0.0,
        sampler: str | SchedulerMixin | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        return_trajectory: bool = False,
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        snap_to_palette: bool = True,
    ) -> PunkDiffPipelineOutput | tuple:
        r"""Noise `image` to timestep `t_start` with the forward process, then denoise it back to t = 0.

        Comparing the result with the input (MSE, SSIM) as a function of `t_start` shows how much of an image the
        model can recover from a given noise level. The image is noised to the largest scheduled timestep that is
        not above `t_start` (exactly `t_start` for full-length DDPM). Unlike `__call__`, it does not use the
        model's recommended sampling: `sampler=None` is the saved scheduler's class, and eta is 0 unless given.

        Args:
            image: Images in [0, 1] at the model's resolution (PIL, `(B, H, W, C)` array or `(B, C, H, W)` tensor).
            t_start: Training timestep to noise to, in `[0, num_train_timesteps)`.
            labels, attributes, guidance_scale: The condition to denoise towards, as in `__call__` (one request,
                or one per image).
            generator: As in `__call__`; draws the forward noise first, then the sampler's noise.
            Other arguments: As in `__call__`.

        Examples:
            ```py
            >>> digit = PIL.Image.open("digit.png")  # at the model's resolution
            >>> pipe.reconstruct(digit, t_start=300, sampler="ddim", num_inference_steps=50).images[0]
            ```
        """
        # 1. check the inputs and encode the condition
        original = self._preprocess(image)
        guidance = self._prepare_condition(labels, attributes, guidance_scale, original.shape[0])
        self._check_generator(generator, original.shape[0])
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        if not 0 <= t_start < num_train_timesteps:
            raise ValueError(f"`t_start` must be in [0, {num_train_timesteps}), got {t_start}.")
        # 2. the sampler's timesteps from the largest one <= t_start
        sched = self._make_sampler(sampler)
        sched.set_timesteps(self._default_steps(sched, num_inference_steps))
        begin = int((sched.timesteps > t_start).sum())
        if begin == len(sched.timesteps):
            raise ValueError(f"No scheduled timestep is <= t_start={t_start}; use more inference steps.")
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(begin)
        timesteps = sched.timesteps[begin:]
        # 3. x_t ~ q(x_t | x_0), the forward process
        noise = randn_tensor(original.shape, generator=generator, device=original.device, dtype=original.dtype)
        latents = sched.add_noise(original, noise, timesteps[:1])
        # 4. denoise from x_t to x_0
        return self._denoise(
            sched, timesteps, latents, guidance, generator=generator, eta=eta, output_type=output_type,
            return_dict=return_dict, return_trajectory=return_trajectory, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, snap_to_palette=snap_to_palette,
        )

    @torch.no_grad()
    def inpaint(
        self,
        image: ImageInput,
        mask: ImageInput,
        labels: Labels = None,
        attributes: Attributes = None,
        guidance_scale: float = 1.0,
        num_inference_steps: int = 250,
        jump_length: int = 10,
        jump_n_sample: int = 10,
        eta: float = 0.0,
        generator: Generator = None,
        output_type: str = "pil",
        return_dict: bool = True,
        snap_to_palette: bool = True,
    ) -> PunkDiffPipelineOutput | tuple:
        r"""Fill the masked region of `image` with the model (RePaint, Lugmayr et al. 2022), guided by a condition.

        Uses [`ExactRePaintScheduler`] (diffusers' RePaint, starting at t = T - 1 for any step count): at each step
        the known region is the forward-noised original and the masked region comes from the model; jumping back
        `jump_length` steps `jump_n_sample` times lets the two harmonise. At the last step the known region is the
        original image exactly. Unlike diffusers' `RePaintPipeline`, a list of generators is used per image
        throughout, not just for the initial noise.

        Args:
            image: Images in [0, 1] at the model's resolution.
            mask: Same size; 1 (white) marks the pixels to generate, 0 (black) those to keep, as in diffusers'
                inpainting pipelines. Binarised at 0.5; one mask may serve a whole batch.
            labels, attributes, guidance_scale: What the filled region should make of the image, as in `__call__`
                ("give this punk a cap": `attributes={"type": "Male", "accessories": ["Cap"]}`).
            num_inference_steps: Denoising steps before resampling jumps.
            jump_length: Steps to go back in time per jump ("j" in the paper).
            jump_n_sample: How many times each jump is repeated ("r" in the paper).
            eta: DDIM-style noise weight of the RePaint step (0 deterministic, 1 DDPM-like).
            generator, output_type, return_dict, snap_to_palette: As in `__call__`.

        Examples:
            ```py
            >>> punk = PIL.Image.open("punk.png")  # 24x24, composited on the training background
            >>> hat = PIL.Image.new("L", punk.size, 0)
            >>> hat.paste(255, (4, 0, 20, 8))  # white: regenerate the top rows
            >>> pipe.inpaint(punk, hat, num_inference_steps=100, generator=torch.Generator().manual_seed(0)).images[0]
            >>> capped = pipe.inpaint(punk, hat, attributes={"type": "Male", "accessories": ["Cap"]}, guidance_scale=3)
            ```
        """
        # 1. check the inputs and encode the condition; the mask becomes "known" = 1 where the original is kept
        prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"RePaint inpainting needs an epsilon- or v-prediction model, not {prediction_type!r}.")
        original = self._preprocess(image)
        guidance = self._prepare_condition(labels, attributes, guidance_scale, original.shape[0])
        self._check_generator(generator, original.shape[0])
        known = 1.0 - self.mask_processor.preprocess(mask).to(original.device, original.dtype)
        # 2. the RePaint schedule from t = T - 1, with its jumps back in time
        sched = ExactRePaintScheduler.from_config(self.scheduler.config, eta=eta)
        sched.use_schedule_of(self.scheduler)
        sched.set_timesteps(num_inference_steps, jump_length, jump_n_sample)
        # 3. x_T ~ N(0, I)
        latents = randn_tensor(original.shape, generator=generator, device=original.device, dtype=original.dtype)
        # 4. walk the schedule: a lower t denoises (known region re-noised from the original), a higher t
        #    re-noises the sample (a jump back)
        t_last = sched.timesteps[0] + 1
        for t in self.progress_bar(sched.timesteps):
            if t < t_last:
                model_output = self._model_output(latents, t, guidance)
                latents = sched.step(model_output, t, latents, original, known, generator).prev_sample
            else:
                latents = sched.undo_step(latents, t_last, generator)
            t_last = t
        # 5. to images
        images = self._postprocess(latents, output_type, snap_to_palette)
        self.maybe_free_model_hooks()
        return PunkDiffPipelineOutput(images=images) if return_dict else (images,)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        safe_serialization: bool = True,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        """Save like any diffusers pipeline (safetensors by default), loadable by stock diffusers.

        `model_index.json` names the stock `DDPMPipeline`, so `DiffusionPipeline.from_pretrained(folder)` works
        without running code shipped with the model, and this file is saved beside it as `pipeline.py`, so
        `DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)` gives a
        `PunkDiffPipeline` to a user without punkdiff installed. A pixel-art model's palette is saved as
        `palette.json`, and a recommended sampling (`sampling_config`) as `sampling.json`. A conditional model also
        saves its vocabulary as `condition.json` and, for attributes, the `attribute_encoder` component
        (safetensors); stock `DDPMPipeline` loads such a folder but cannot sample it (its UNet needs class labels):
        load it with this class, or with `custom_pipeline=` as above. `push_to_hub=True` (with diffusers' `repo_id`,
        `private`, `token`, `commit_message`, `create_pr`) uploads the finished folder with diffusers' own Hub code
        and model card.

        Examples:
            ```py
            >>> pipe.save_pretrained("my-model")
            >>> DDPMPipeline.from_pretrained("my-model")  # stock diffusers, no remote code
            ```
        """
        if "model_card" in kwargs:  # diffusers would drop it silently
            raise TypeError(
                "save_pretrained writes no model card; add punkdiff's to the saved folder with "
                "`punkdiff.hub.write_model_card(folder, info)`, or export with `punkdiff.hub.export_pipeline`."
            )
        push_kwargs = {k: kwargs.pop(k) for k in _PUSH_KWARGS if k in kwargs}
        # 1. diffusers' own save; its push would upload before steps 2 and 3, so it comes last
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, **kwargs)
        # 2. stock metadata: any diffusers install loads the folder as a DDPMPipeline; an absent encoder has no entry
        index = Path(save_directory) / "model_index.json"
        config = json.loads(index.read_text())
        config["_class_name"] = "DDPMPipeline"
        if self.attribute_encoder is None:
            config.pop("attribute_encoder", None)
        index.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        # 3. this file (the opt-in custom-pipeline route), a pixel-art model's palette, the recommended sampling,
        #    a conditional model's vocabulary
        shutil.copyfile(__file__, Path(save_directory) / CUSTOM_PIPELINE_FILE)
        if self.attribute_encoder is not None:  # diffusers' custom-component route reads `<library>.py` there
            library = config["attribute_encoder"][0]
            shutil.copyfile(__file__, Path(save_directory) / "attribute_encoder" / f"{library}.py")
        if self.palette is not None:
            write_palette(Path(save_directory) / PALETTE_FILE, self.palette)
        if self.condition is not None:
            (Path(save_directory) / CONDITION_FILE).write_text(self.condition.to_json() + "\n")
        if self.sampling_config is not None:
            write_sampling_config(Path(save_directory) / SAMPLING_FILE, self.sampling_config)
        # 4. diffusers' push, as its `save_pretrained(push_to_hub=True)` does it, of the finished folder
        if push_to_hub:
            self._push_folder(save_directory, **push_kwargs)

    def _denoise(
        self,
        sched: SchedulerMixin,
        timesteps: torch.Tensor,
        latents: torch.Tensor,
        guidance: _Guidance,
        *,
        generator: Generator,
        eta: float,
        output_type: str,
        return_dict: bool,
        return_trajectory: bool,
        callback_on_step_end: StepCallback | None,
        callback_on_step_end_tensor_inputs: list[str] | None,
        snap_to_palette: bool,
    ) -> PunkDiffPipelineOutput | tuple:
        """The reverse process shared by sampling and reconstruction: x_t at `timesteps[0]` -> images."""
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        unknown = set(tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs must be in {self._callback_tensor_inputs}.")
        step_kwargs = _extra_step_kwargs(sched, generator=generator, eta=eta)
        need_x0 = return_trajectory or "pred_original_sample" in tensor_inputs
        trajectory, pred_x0s = [], []
        # the UNet's timesteps copied to the device once, not once per step (CUDA graphs also need device inputs);
        # the sampler keeps the host ones, so it never reads a device value back
        unet_timesteps = timesteps.to(latents.device)
        for i, t in enumerate(self.progress_bar(timesteps)):
            # 1. the model's output at (x_t, t), guided where there is a condition
            model_input = sched.scale_model_input(latents, t)
            model_output = self._model_output(model_input, unet_timesteps[i], guidance)
            # 2. x_t -> x_{t'}: one sampler step
            out = sched.step(model_output, t, latents, **step_kwargs)
            latents = out.prev_sample
            # 3. the predicted x_0, where someone looks at it
            pred_original_sample = None
            if need_x0:
                pred_original_sample = getattr(out, "pred_original_sample", None)
                if pred_original_sample is None:  # e.g. DPM-Solver does not report x_0
                    pred_original_sample = _predict_x0(sched, model_output, t, model_input)
            # 4. the step callback, which may replace x_{t'}
            if callback_on_step_end is not None:
                local = {"latents": latents, "pred_original_sample": pred_original_sample}
                callback_outputs = callback_on_step_end(self, i, t, {k: local[k] for k in tensor_inputs})
                latents = callback_outputs.pop("latents", latents)
            if return_trajectory:
                trajectory.append(self.image_processor.postprocess(latents, output_type))
                pred_x0s.append(self.image_processor.postprocess(pred_original_sample, output_type))
        images = self._postprocess(latents, output_type, snap_to_palette)
        self.maybe_free_model_hooks()
        output = PunkDiffPipelineOutput(
            images=images,
            trajectory=trajectory if return_trajectory else None,
            pred_original_samples=pred_x0s if return_trajectory else None,
        )
        return output if return_dict else output.to_tuple()

    def _postprocess(self, latents: torch.Tensor, output_type: str, snap: bool) -> Any:
        """Model-space images in [-1, 1] -> `output_type`, snapped to the palette first where there is one."""
        if snap and self.palette is not None:
            colours = self.palette.to(latents.device, latents.dtype) / 127.5 - 1
            latents = nearest_colour(latents, colours)
        return self.image_processor.postprocess(latents, output_type)

    def _prepare_condition(
        self, labels: Labels, attributes: Attributes, guidance_scale: float, batch_size: int | None
    ) -> _Guidance:
        """This call's condition and guidance, checked before any work; `batch_size` None: from the request."""
        scale = check_guidance_scale(guidance_scale)
        requested = labels is not None or attributes is not None
        if self.condition is None:
            if requested:
                raise ConditionError(
                    "this model is unconditional: it takes no labels= or attributes= (no condition.json was saved "
                    "with it); sample it without them, or load a conditional model"
                )
            if scale != 1.0:
                raise ValueError(f"guidance_scale={scale} needs a condition, and this model is unconditional; "
                                 "leave guidance_scale at 1")
            if _is_conditional(self.unet):
                raise ValueError("this UNet is class-conditional but the pipeline has no condition vocabulary: "
                                 f"put the model's {CONDITION_FILE} beside it, or pass condition=ConditionVocabulary")
            return _Guidance(batch_size or 1)
        device = self._execution_device
        if not requested:  # the null condition, which guidance would only extrapolate from itself
            if scale != 1.0:
                raise ValueError(f"guidance_scale={scale} needs a condition to guide towards: give labels= or "
                                 "attributes=, or leave guidance_scale at 1 to sample the null condition")
            null = self.condition.null(batch_size or 1, device)
            return _Guidance(null.shape[0], null, null, 1.0)
        condition = self.condition.encode_request(labels, attributes)
        one_for_all = isinstance(labels, (str, numbers.Integral)) or isinstance(attributes, Mapping)
        if one_for_all:
            condition = condition.repeat(batch_size or 1, *([1] * (condition.ndim - 1)))
        elif batch_size is not None and condition.shape[0] != batch_size:
            raise ValueError(f"got {condition.shape[0]} requests for a batch of {batch_size} images; give one per "
                             "image, or a single label or attributes mapping for the whole batch")
        condition = condition.to(device)
        null = self.condition.null(condition.shape[0], device)
        return _Guidance(condition.shape[0], condition, null, scale)

    def _model_output(self, sample: torch.Tensor, timestep: torch.Tensor, guidance: _Guidance) -> torch.Tensor:
        """The UNet's output at (x_t, t): as is for an unconditional model, else classifier-free guided."""
        if guidance.condition is None:
            return self.unet(sample, timestep).sample
        return guided_prediction(
            self.unet, sample, timestep, guidance.condition, guidance.null_condition, guidance.scale,
            encode=self.attribute_encoder,
        )

    def _make_sampler(self, sampler: str | SchedulerMixin | None) -> SchedulerMixin:
        """A fresh scheduler for one call, so `self.scheduler` (what gets saved) is never mutated."""
        if isinstance(sampler, SchedulerMixin):
            return sampler
        if sampler is None:
            cls = _EXACT.get(type(self.scheduler), type(self.scheduler))
            return cls.from_config(self.scheduler.config)
        if sampler.lower() not in SAMPLERS:
            raise ValueError(f"Unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")
        return SAMPLERS[sampler.lower()].from_config(self.scheduler.config)

    def _default_steps(self, sched: SchedulerMixin, num_inference_steps: int | None) -> int:
        """The call's step count (every training step for DDPM, else 50), warning when a student is sampled at
        another count than it was distilled for."""
        if num_inference_steps is None:
            num_inference_steps = sched.config.num_train_timesteps if isinstance(sched, DDPMScheduler) else 50
        distilled = self.sampling_config.distilled_steps if self.sampling_config is not None else None
        if distilled is not None and num_inference_steps != distilled:
            warnings.warn(
                f"This model was distilled to sample in {distilled} steps ({self.sampling_config.sampler}); its "
                f"quality is only guaranteed there, and this call asks for {num_inference_steps}.",
                UserWarning,
                stacklevel=2,
            )
        return num_inference_steps

    def _recommended(
        self, sampler: str | SchedulerMixin | None, num_inference_steps: int | None, eta: float | None
    ) -> tuple[str | SchedulerMixin | None, int | None, float]:
        """A call's sampler, steps and eta, those left `None` taken from `sampling_config` (eta 0 without one)."""
        if self.sampling_config is not None:
            sampler, num_inference_steps, eta = self.sampling_config.fill(sampler, num_inference_steps, eta)
        return sampler, num_inference_steps, 0.0 if eta is None else eta

    def _image_shape(self, batch_size: int) -> tuple[int, ...]:
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, self.unet.config.in_channels, *size)

    def _preprocess(self, image: ImageInput) -> torch.Tensor:
        """Images in [0, 1] (any diffusers format) -> model-space tensor in [-1, 1], checked against the UNet."""
        x = self.image_processor.preprocess(image).to(self._execution_device, self.unet.dtype)
        expected = self._image_shape(x.shape[0])
        if tuple(x.shape) != expected:
            raise ValueError(f"Expected images of shape {expected[1:]} (C, H, W), got {tuple(x.shape[1:])}.")
        return x

    @staticmethod
    def _check_generator(generator: Generator, batch_size: int) -> None:
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for a batch of {batch_size}; pass one per image.")

    def _push_folder(
        self,
        folder: str | os.PathLike[str],
        repo_id: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
    ) -> None:
        """diffusers' `save_pretrained(push_to_hub=True)` upload: the repo, diffusers' model card, one commit."""
        repo_id = create_repo(repo_id or Path(folder).name, exist_ok=True, private=private, token=token).repo_id
        model_card = populate_model_card(load_or_create_model_card(repo_id, token=token, is_pipeline=True))
        model_card.save(Path(folder) / "README.md")
        self._upload_folder(folder, repo_id, token=token, commit_message=commit_message, create_pr=create_pr)


def _model_file(model: str | os.PathLike[str], name: str, revision: str | None) -> Path | None:
    """A file beside the model's components (`palette.json`, `condition.json`): in a local folder, or fetched
    from a Hub repo (None when it has none)."""
    if Path(model).is_dir():
        path = Path(model) / name
        return path if path.is_file() else None
    try:
        return Path(hf_hub_download(str(model), name, revision=revision))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None


def _extra_step_kwargs(sched: SchedulerMixin, **kwargs: Any) -> dict[str, Any]:
    """Those of `kwargs` (`generator`, `eta`) that `sched.step` takes: UniPC takes neither, only DDIM takes eta.

    diffusers' pipelines do the same in `prepare_extra_step_kwargs`.
    """
    accepted = inspect.signature(sched.step).parameters
    return {name: value for name, value in kwargs.items() if name in accepted}


def _predict_x0(sched: SchedulerMixin, model_output: torch.Tensor, t: torch.Tensor, sample: torch.Tensor):
    """x_0 implied by the model output at timestep t, for schedulers whose step does not return it."""
    alpha_prod_t = sched.alphas_cumprod[int(t)].to(sample.device, sample.dtype)
    return predicted_x0_and_epsilon(model_output, sample, alpha_prod_t, sched.config.prediction_type)[0]
