"""Does the model copy its training images? Nearest training images, near-copy shares, exact copies.

Every figure here is read against the same figure for held-out real images, which the model never saw: a model
that generalises copies no more than real data resembles itself.

- Nearest neighbours in pixel space (and in a feature space, when one is given), with the ratio test of
  data-copying studies: a sample is a near-copy when its nearest training image is much closer than its second
  nearest (`d1 <= copy_ratio * d2`), which adapts to how crowded the data is around it.
- For pixel art (`punkdiff.data.pixel_art_palette`): the share of samples that equal a training image exactly once
  every pixel is snapped to the nearest palette colour.
"""

from __future__ import annotations

import numpy as np
import torch

from punkdiff.pipelines.punkdiff_pipeline import nearest_colour


def nearest_neighbours(queries: np.ndarray, pool: np.ndarray, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distances `[N, 2]` (float64) to the two nearest pool rows, and the index `[N]` of the nearest."""
    q = torch.as_tensor(np.asarray(queries).reshape(len(queries), -1), dtype=torch.float64)
    p = torch.as_tensor(np.asarray(pool).reshape(len(pool), -1), dtype=torch.float64)
    if len(p) < 2:
        raise ValueError("nearest neighbours need a pool of at least 2 images")
    dists, index = [], []
    for start in range(0, len(q), block):
        d, i = torch.cdist(q[start:start + block], p).topk(2, dim=1, largest=False)
        dists.append(d)
        index.append(i[:, 0])
    return torch.cat(dists).numpy(), torch.cat(index).numpy()


def near_copy_share(distances: np.ndarray, copy_ratio: float = 1 / 3) -> float:
    """Share of rows whose nearest distance is at most `copy_ratio` times the second nearest (`[N, 2]` input)."""
    return float(np.mean(distances[:, 0] <= copy_ratio * distances[:, 1]))


def snap_to_palette(images: np.ndarray, palette: np.ndarray, block: int = 256) -> np.ndarray:
    """Replace every pixel of uint8 images `[N, C, H, W]` by the nearest palette colour (the pipeline's rule).

    `block` images at a time bound the distance matrix (256 punks x 576 pixels x 222 colours: about 130 MB).
    """
    colours = torch.as_tensor(palette, dtype=torch.float32)
    images = torch.as_tensor(np.asarray(images))
    snapped = [nearest_colour(images[s:s + block].float(), colours) for s in range(0, len(images), block)]
    return torch.cat(snapped).round().to(torch.uint8).numpy()


def exact_copy_rate(images: np.ndarray, training: np.ndarray) -> float:
    """Share of uint8 images equal, byte for byte, to some training image."""
    known = {image.tobytes() for image in np.asarray(training)}
    return float(np.mean([image.tobytes() in known for image in np.asarray(images)]))


def memorisation(
    samples: np.ndarray,
    training: np.ndarray,
    *,
    features: tuple[np.ndarray, np.ndarray] | None = None,
    copy_ratio: float = 1 / 3,
    palette: np.ndarray | None = None,
) -> dict[str, object]:
    """Nearest training image of each uint8 sample `[N, C, H, W]` and the copy shares, for the report.

    `features` is `(sample_features, training_features)` for the same images in a feature space. Returns
    `nearest_index` and `nearest_distance` (pixel space, [0, 1] pixels), `near_copy_share_pixels`,
    `near_copy_share_features` (when features are given) and, with a pixel-art `palette`, `exact_copy_rate`
    (samples snapped to the palette first).

    Example:
        >>> import numpy as np
        >>> train = np.random.default_rng(0).integers(0, 2, (50, 1, 8, 8), dtype=np.uint8) * 255
        >>> memorisation(train[:5], train)["near_copy_share_pixels"]  # training images fed back are copies
        1.0
    """
    samples, training = np.asarray(samples), np.asarray(training)
    distances, index = nearest_neighbours(samples.astype(np.float64) / 255.0, training.astype(np.float64) / 255.0)
    result: dict[str, object] = {
        "nearest_index": index,
        "nearest_distance": distances[:, 0],
        "near_copy_share_pixels": near_copy_share(distances, copy_ratio),
    }
    if features is not None:
        feature_distances, _ = nearest_neighbours(*features)
        result["near_copy_share_features"] = near_copy_share(feature_distances, copy_ratio)
    if palette is not None:
        result["exact_copy_rate"] = exact_copy_rate(snap_to_palette(samples, palette), training)
    return result
