"""A conditional run's extra parts: the condition's vocabulary, the attribute encoder and its EMA, the per-batch
guidance drops, and the fixed requests its preview grids show.

The loader gives a conditional run's batches as `{"images", "condition"[, "loss_weight"]}` (`batches.condition_rows`);
`batch_inputs` turns one into the loss's inputs: x_0, a forward told the condition (whole conditions and single
groups dropped for classifier-free guidance, from the run's saved noise generator), and the loss, weighted per
image where `train.balance_conditions` is `"loss"`. An unconditional batch goes through exactly as before.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from punkdiff.conditions import CLASS_INDEX, MULTI, SINGLE, ConditionVocabulary, drop_conditions
from punkdiff.data import to_model_input
from punkdiff.pipelines.punkdiff_pipeline import AttributeEncoder
from punkdiff.training.ema import averaged_weights
from punkdiff.training.loss import LossFn

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel

# a preview grid's columns: at least this many images per class row
GRID_COLUMNS = 4


@dataclass
class TrainingCondition:
    """What a conditional run adds to its UNet: the vocabulary, and for multi-hot conditions the attribute encoder
    (as prepared, and the module itself) with its EMA."""

    vocabulary: ConditionVocabulary
    encoder: torch.nn.Module | None = None  # as prepared (DDP on several processes); None for class indices
    attribute_encoder: AttributeEncoder | None = None  # the module itself: EMA, previews and the export use it
    ema: EMAModel | None = None

    def class_labels(self, condition: torch.Tensor) -> torch.Tensor:
        """The UNet's `class_labels` for a condition: class indices as they are, multi-hot through the encoder."""
        return condition if self.encoder is None else self.encoder(condition)

    @contextlib.contextmanager
    def averaged(self) -> Iterator[dict[str, Any]]:
        """`PunkDiffPipeline` kwargs for the condition, with the encoder's EMA weights swapped in (eval mode)."""
        if self.attribute_encoder is None:
            yield {"condition": self.vocabulary}
            return
        with averaged_weights(self.attribute_encoder, self.ema) as encoder:
            yield {"condition": self.vocabulary, "attribute_encoder": encoder}

    def exported_encoder(self) -> AttributeEncoder | None:
        """A copy of the encoder with its EMA weights (its own without EMA), for the export."""
        if self.attribute_encoder is None:
            return None
        exported = copy.deepcopy(self.attribute_encoder).eval()
        if self.ema is not None:
            self.ema.copy_to(exported.parameters())
        return exported


def build_attribute_encoder(vocabulary: ConditionVocabulary | None, block_out_channels: tuple[int, ...]
                            ) -> AttributeEncoder | None:
    """The encoder of a multi-hot condition, into the UNet's time-embedding width; None for class indices."""
    if vocabulary is None or vocabulary.encoding == CLASS_INDEX:
        return None
    # keywords: diffusers takes positional arguments of a config class for defaults, and from_config then fails
    return AttributeEncoder(num_attributes=vocabulary.width, embedding_dim=4 * block_out_channels[0])


def batch_inputs(batch: torch.Tensor | dict[str, torch.Tensor], random_flip: bool, generator: torch.Generator,
                 forward: Callable[..., Any], loss_fn: LossFn, condition: TrainingCondition | None
                 ) -> tuple[torch.Tensor, Callable[..., Any], LossFn]:
    """`(x_0 in [-1, 1], the forward the loss calls, the loss)` for one batch.

    Unconditional: the flips are the only draws, as they always were. Conditional: the flips, then the guidance
    drops, both from `generator` (saved with every checkpoint, so a resumed run drops what the uninterrupted one
    would); the forward passes the dropped condition as `class_labels`.
    """
    if condition is None:
        return to_model_input(batch, random_flip, generator), forward, loss_fn
    clean = to_model_input(batch["images"], random_flip, generator)
    dropped = drop_conditions(batch["condition"], condition.vocabulary, generator)

    def conditioned(sample: torch.Tensor, timesteps: torch.Tensor) -> Any:
        return forward(sample, timesteps, class_labels=condition.class_labels(dropped))

    if "loss_weight" in batch:
        loss_fn = functools.partial(loss_fn, weights=batch["loss_weight"])
    return clean, conditioned, loss_fn


def grid_requests(vocabulary: ConditionVocabulary, num_images: int) -> tuple[dict[str, Any], int]:
    """The fixed requests of a conditional run's preview grids: one row per class of the first single-label column,
    and across each row, for a multi-label column, its names left unspecified, none of them, then its most frequent
    ones alone and in pairs. Returns `(generate/pipeline kwargs: labels=... or attributes=..., columns)`.

    Examples:
        ```py
        >>> grid_requests(digits, 16)
        ({'labels': [0, 0, 1, 1, ...]}, 2)
        ```
    """
    single = next((g for g in vocabulary.groups if g.kind == SINGLE), None)
    rows = list(single.names) if single is not None else [None]
    columns = max(GRID_COLUMNS, math.ceil(num_images / len(rows)))
    if vocabulary.encoding == CLASS_INDEX:
        return {"labels": [label for label in rows for _ in range(columns)]}, columns
    multi = next((g for g in vocabulary.groups if g.kind == MULTI), None)
    combos: list[list[str] | None] = [None]
    if multi is not None:
        frequent = [name for _, name in sorted(zip(multi.counts or [0] * len(multi.names), multi.names,
                                                   strict=True), key=lambda c: -c[0])]
        combos += [[], *([name] for name in frequent[:2])]
        if len(frequent) >= 2:
            combos.append(frequent[:2])
    combos = (combos * columns)[:columns]
    requests = []
    for row in rows:
        for combo in combos:
            request = {} if row is None else {single.column: row}
            if multi is not None and combo is not None:
                request[multi.column] = combo
            requests.append(request)
    return {"attributes": requests}, columns
