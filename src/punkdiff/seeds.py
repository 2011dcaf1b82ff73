"""One CPU random generator per image, so image i of a seed is the same whatever the batch, the count or the device."""

from __future__ import annotations

import torch


def image_generators(seed: int, count: int, first: int = 0) -> list[torch.Generator]:
    """Generators for images `first` to `first + count - 1`, image i's seeded `seed + i`.

    A pipeline given a list of generators draws image i's noise from `generator[i]` only, so a batch cut anywhere
    (`first`) gives the same images as one long batch; CPU generators draw the same numbers on every device.

    Examples:
        ```py
        >>> a = [torch.randn(2, generator=g) for g in image_generators(7, 4)]
        >>> b = [torch.randn(2, generator=g) for g in image_generators(7, 2, first=2)]
        >>> torch.equal(a[3], b[1])
        True
        ```
    """
    return [torch.Generator().manual_seed(seed + first + i) for i in range(count)]
