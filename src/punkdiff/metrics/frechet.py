"""Fréchet and kernel (KID) distances between two sets of feature vectors, and the Inception Score of a set of
logits, in float64, through torchmetrics.

torchmetrics' `FrechetInceptionDistance` and `KernelInceptionDistance` accept any feature module; handing them
a pass-through module lets every feature space punkdiff uses (its digit and punk classifiers, pixels, Inception,
DINOv2) share the one upstream implementation: float64 sums and covariances, and the trace of the
matrix square root from the eigenvalues of `sigma_1 @ sigma_2`.
"""

from __future__ import annotations

import numpy as np
import torch


class PrecomputedFeatures(torch.nn.Module):
    """The identity, with the `num_features` torchmetrics reads: `update` then takes feature vectors."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(features_a: np.ndarray | torch.Tensor, features_b: np.ndarray | torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between Gaussians fitted to `[N, D]` features.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> a, b = rng.normal(size=(2000, 4)), rng.normal(size=(2000, 4))
        >>> frechet_distance(a, b) < 0.05 < frechet_distance(a, b + 1.0)
        True
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    a, b = _as_features(features_a, features_b)
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(a.shape[1]), normalize=True)
    metric.update(a, real=True)
    metric.update(b, real=False)
    return float(metric.compute())


def kernel_distance(
    features_a: np.ndarray | torch.Tensor,
    features_b: np.ndarray | torch.Tensor,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel distance (KID: squared MMD, cubic polynomial kernel) as `(mean, std)` over random subsets.

    torchmetrics' `KernelInceptionDistance` on precomputed float64 features; its subsets are drawn from the global
    torch generator, which is forked and seeded here, so the same seed gives the same numbers and the caller's
    random state is left untouched. `subset_size` is capped at the smaller set.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> a, b = rng.normal(size=(500, 4)), rng.normal(size=(500, 4))
        >>> kernel_distance(a, b)[0] < 0.01 < kernel_distance(a, b + 1.0)[0]
        True
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    a, b = _as_features(features_a, features_b)
    size = min(subset_size, len(a), len(b))
    metric = KernelInceptionDistance(feature=PrecomputedFeatures(a.shape[1]), subsets=subsets, subset_size=size)
    metric.update(a, real=True)
    metric.update(b, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def inception_score(logits: np.ndarray | torch.Tensor, *, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """Inception Score, exp(E[KL(p(y|x) || p(y))]), as `(mean, std)` over `splits` random splits of `[N, K]` logits.

    torchmetrics' `InceptionScore` on precomputed float64 logits (the FID Inception's 1008 unbiased logits, as
    torch-fidelity and torchmetrics use); its split permutation is drawn from a forked, seeded torch generator.
    Each split keeps at least 10 images (a split of one image would score exactly 1), so small sets use fewer.

    Example:
        >>> import numpy as np
        >>> confident_and_varied = np.eye(10)[np.arange(100) % 10] * 50.0
        >>> round(inception_score(confident_and_varied, splits=1)[0], 3)  # 10 classes, each predicted surely
        10.0
    """
    import warnings

    from torchmetrics.image.inception import InceptionScore

    (logits,) = _as_features(logits)
    with warnings.catch_warnings():  # "will save all extracted features in buffer": that is the point here
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        splits = max(1, min(splits, len(logits) // 10))
        metric = InceptionScore(feature=PrecomputedFeatures(logits.shape[1]), splits=splits)
    metric.update(logits)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*degrees of freedom.*")  # one split: its std is nan
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def _as_features(*arrays: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, ...]:
    out = tuple(torch.as_tensor(np.asarray(f), dtype=torch.float64) for f in arrays)
    if any(f.ndim != 2 for f in out) or len({f.shape[1] for f in out}) != 1:
        raise ValueError(f"expected [N, D] feature arrays of the same D, got {[tuple(f.shape) for f in out]}")
    if min(len(f) for f in out) < 2:
        raise ValueError("a distance between feature sets needs at least 2 feature vectors on each side")
    return out
