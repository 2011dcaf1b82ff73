"""Where the training loop is: step, epoch, batch within the epoch, images seen and the loss history.

Saved with every checkpoint (beside the resolved config and process count), so a resumed run continues at the
exact batch the interrupted one would have drawn next.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from punkdiff.presets import Preset
from punkdiff.training import TrainingError

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass
class LoopProgress:
    """The loop's position. `history` holds `[step, loss, lr]` per optimizer step.

    Examples:
        ```py
        >>> progress = LoopProgress()
        >>> progress.global_step += 1
        >>> LoopProgress.from_state(progress.to_state(preset, num_processes=1, batches_per_epoch=78)).global_step
        1
        ```
    """

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    images_seen: int = 0
    history: list[list[float]] = field(default_factory=list)

    def to_state(self, preset: Preset, num_processes: int, batches_per_epoch: int) -> dict[str, Any]:
        """The checkpoint's `training_state.json`; a finished epoch is saved as the start of the next one."""
        position = dataclasses.asdict(self)
        if self.batches_in_epoch == batches_per_epoch:
            position.update(epoch=self.epoch + 1, batches_in_epoch=0)
        return {**position, "config": preset.to_dict(), "num_processes": num_processes}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> LoopProgress:
        """The position saved by `to_state`."""
        return cls(**{f.name: state[f.name] for f in dataclasses.fields(cls)})


def steps_per_epoch(batches_per_epoch: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps per epoch per process: the last partial accumulation still steps."""
    if batches_per_epoch == 0:
        raise TrainingError(
            "the dataset has fewer images than one global batch (batch size x processes): lower --batch-size"
        )
    return math.ceil(batches_per_epoch / gradient_accumulation_steps)


def checkpoint_state(progress: LoopProgress, preset: Preset, accelerator: Accelerator, loader: Any, seed: int,
                     streaming: bool) -> dict[str, Any]:
    """What a checkpoint saves beside Accelerate's state: the position, config, process count, seed, and on a
    streamed run every process's position in its shard (a collective, like the checkpoint itself)."""
    state = {**progress.to_state(preset, accelerator.num_processes, len(loader)), "seed": seed}
    if streaming:
        from accelerate.utils import gather_object

        state["stream"] = gather_object([loader.state_dict()])
    return state
