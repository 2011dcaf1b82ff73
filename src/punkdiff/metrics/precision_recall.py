"""Precision and recall (Kynkäänniemi et al. 2019), density and coverage (Naeem et al. 2020), in any feature space.

Each real and each generated feature vector gets a ball reaching its k-th nearest neighbour within its own set;
the union of the balls estimates the set's support (its manifold).

- precision: share of generated samples inside the real manifold (are the samples realistic?);
- recall: share of real samples inside the generated manifold (do the samples cover the data?);
- density: how many real balls contain each generated sample, divided by k (about 1 for matching sets, and
  robust to the outliers that inflate precision);
- coverage: share of real samples whose ball contains at least one generated sample (robust recall).

Distances are Euclidean, computed in float64 in row blocks so memory stays bounded for 10,000 samples.
"""

from __future__ import annotations

import numpy as np
import torch


def _distances(a: torch.Tensor, b: torch.Tensor, block: int = 1024):
    """Yield `(start, [block, len(b)] distance block)` between the rows of `a` and of `b`."""
    for start in range(0, len(a), block):
        yield start, torch.cdist(a[start:start + block], b)


def kth_neighbour_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row (the point itself does not count)."""
    if len(features) <= k:
        raise ValueError(f"k={k} nearest neighbours need more than {k} feature vectors, got {len(features)}")
    radii = torch.empty(len(features), dtype=features.dtype)
    for start, d in _distances(features, features):
        radii[start:start + len(d)] = d.kthvalue(k + 1, dim=1).values  # the k+1-th smallest: 0 is the point itself
    return radii


def _inside_counts(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """For each point, how many balls (centre, radius) contain it."""
    counts = torch.empty(len(points), dtype=torch.float64)
    for start, d in _distances(points, centres):
        counts[start:start + len(d)] = (d <= radii[None]).sum(dim=1).double()
    return counts


def precision_recall(
    real_features: np.ndarray | torch.Tensor,
    fake_features: np.ndarray | torch.Tensor,
    *,
    k_pr: int = 3,
    k_dc: int = 5,
) -> dict[str, float]:
    """`precision`, `recall` (k = `k_pr`, the paper's 3), `density` and `coverage` (k = `k_dc`, the paper's 5).

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> real = rng.normal(size=(1000, 8))
        >>> same, collapsed = rng.normal(size=(1000, 8)), 0.1 * rng.normal(size=(1000, 8))
        >>> precision_recall(real, same)["recall"] > 0.9 > 0.3 > precision_recall(real, collapsed)["recall"]
        True
    """
    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float64)
    fake = torch.as_tensor(np.asarray(fake_features), dtype=torch.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected [N, D] features of the same D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    real_radii_pr = kth_neighbour_radii(real, k_pr)
    fake_radii_pr = kth_neighbour_radii(fake, k_pr)
    real_radii_dc = real_radii_pr if k_dc == k_pr else kth_neighbour_radii(real, k_dc)
    in_real = _inside_counts(fake, real, real_radii_pr)
    in_fake = _inside_counts(real, fake, fake_radii_pr)
    in_real_dc = _inside_counts(fake, real, real_radii_dc)
    # coverage: a real ball holds a fake sample iff the real point's nearest fake is within its radius
    nearest_fake = torch.cat([d.min(dim=1).values for _, d in _distances(real, fake)])
    return {
        "precision": float((in_real > 0).double().mean()),
        "recall": float((in_fake > 0).double().mean()),
        "density": float(in_real_dc.mean() / k_dc),
        "coverage": float((nearest_fake <= real_radii_dc).double().mean()),
    }
