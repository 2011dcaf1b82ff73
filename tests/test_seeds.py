"""Per-image generators: image i's noise depends on the seed and i only."""

from __future__ import annotations

import torch

from punkdiff.seeds import image_generators


def draws(generators: list[torch.Generator]) -> list[torch.Tensor]:
    return [torch.randn(3, generator=g) for g in generators]


def test_image_i_is_seeded_seed_plus_i_whatever_the_cut():
    whole = draws(image_generators(40, 6))
    halves = draws(image_generators(40, 2)) + draws(image_generators(40, 4, first=2))
    assert all(torch.equal(a, b) for a, b in zip(whole, halves, strict=True))
    assert torch.equal(whole[5], torch.randn(3, generator=torch.Generator().manual_seed(45)))
    assert len({tuple(d.tolist()) for d in whole}) == 6  # every image its own noise
    assert all(g.device.type == "cpu" for g in image_generators(0, 2))


def test_no_images_no_generators():
    assert image_generators(3, 0) == []
