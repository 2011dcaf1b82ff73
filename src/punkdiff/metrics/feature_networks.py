"""The pretrained feature networks of FID, KID, IS and FD-DINOv2, read from local files only.

Nothing here downloads, and nothing is unpickled. The Inception network is torch-fidelity's
`FeatureExtractorInceptionV3` (the TensorFlow FID Inception that torchmetrics' FID, KID and IS wrap), with its
weights read from a **safetensors** file; torch-fidelity's own loader would download a `.pth` and open it with
`torch.load(weights_only=False)`, which can run arbitrary code. DINOv2 is a transformers `Dinov2Model` folder,
loaded with `use_safetensors=True, local_files_only=True`.

Where the weights live is a flag or an environment variable (`resolve_weights`): `PUNKDIFF_INCEPTION_WEIGHTS`
(the FID Inception state dict as safetensors) and `PUNKDIFF_DINOV2` (a DINOv2 folder, e.g. a local copy of
`facebook/dinov2-base`). The official torch-fidelity weights convert once, in an environment you trust, with
the one-liner `CONVERT_INCEPTION` (also in docs/evaluation.md and in every error about them).

Both networks take uint8 images at any resolution, as the standard protocols do: grayscale is repeated to three
channels; Inception upsamples to 299 px itself (torch-fidelity's TensorFlow-compatible bilinear resize); DINOv2
images are resized to 224 px (bicubic) and normalised with the ImageNet mean and std, its CLS token (after the
final layer norm) being the feature, as in Stein et al. 2023 (dgm-eval), who introduced FD-DINOv2.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from punkdiff.hub import PICKLE_SUFFIXES

if TYPE_CHECKING:
    from transformers import Dinov2Model

    from punkdiff.metrics.inception import InceptionFeatures

INCEPTION_ENV = "PUNKDIFF_INCEPTION_WEIGHTS"
DINOV2_ENV = "PUNKDIFF_DINOV2"
CONVERT_INCEPTION = (
    "python -c \"import torch, safetensors.torch as st; st.save_file(torch.load("
    "'weights-inception-2015-12-05-6726825d.pth', weights_only=True), 'inception-fid.safetensors')\""
)
DINOV2_SIZE = 224
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class WeightsError(ValueError):
    """Feature-network weights that punkdiff will not load; the message says what was wrong and what to do."""


def resolve_weights(path: str | os.PathLike | None, env: str) -> Path | None:
    """The weights location: `path` if given, else the environment variable `env`, else None (not computed).

    A location that is given but does not exist is an error, never a silent "not computed".

    Examples:
        >>> resolve_weights(None, "PUNKDIFF_UNSET_VARIABLE") is None
        True
    """
    origin = "given" if path is not None else f"${env}"
    path = path if path is not None else os.environ.get(env) or None
    if path is None:
        return None
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsError(f"{path} ({origin}) does not exist; fix the path, or leave it out to skip the metric")
    return path


def load_inception(path: str | os.PathLike) -> InceptionFeatures:
    """The FID Inception from a safetensors state dict; a pickle (`.pth`, `.bin` ...) is refused, never opened.

    Examples:
        ```py
        >>> network = load_inception("inception-fid.safetensors")
        >>> pool, logits = inception_features(network, images)  # uint8 [N, C, H, W] at any resolution
        ```
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        from punkdiff.metrics.inception import InceptionFeatures
    except ImportError as err:
        raise WeightsError(f"FID, KID and IS need torch-fidelity ({err}): pip install 'punkdiff[fid]'") from None

    path = Path(path)
    convert = f"convert the official weights once, in an environment you trust: {CONVERT_INCEPTION}"
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightsError(f"{path} is a pickle file, and punkdiff never unpickles (that can run code); {convert}")
    if not path.is_file():
        raise WeightsError(f"{path} is not a file; give the Inception weights as a .safetensors file ({convert})")
    try:
        state_dict = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{path} is not a readable safetensors file ({err}); {convert}") from None
    _check_finite(path, state_dict.items(), convert)
    try:
        return InceptionFeatures(state_dict)
    except RuntimeError as err:  # torch's load_state_dict: missing or unexpected keys, shape mismatches
        detail = " ".join(str(err).split())[:400]
        raise WeightsError(f"{path} does not hold the FID InceptionV3 weights ({detail}); {convert}") from None


def load_dinov2(path: str | os.PathLike) -> Dinov2Model:
    """A transformers `Dinov2Model` from a local folder (config.json + model.safetensors), in eval mode.

    Examples:
        ```py
        >>> model = load_dinov2("models/dinov2-base")  # a local copy of facebook/dinov2-base
        >>> features = dinov2_features(model, images)  # [N, 768]
        ```
    """
    from transformers import Dinov2Model

    path = Path(path)
    if not (path / "config.json").is_file():
        raise WeightsError(f"{path} is not a transformers model folder (no config.json); give a local DINOv2 folder "
                           "such as a copy of facebook/dinov2-base")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        found = f"only pickle weights ({', '.join(pickles)}), which punkdiff never unpickles" if pickles else \
            "no weights"
        raise WeightsError(f"{path} has {found}; save the model with `save_pretrained(folder)` (safetensors, the "
                           "default) in an environment you trust, or download model.safetensors")
    for weights in sorted(path.glob("*.safetensors")):
        _check_finite(weights, _safetensors_items(weights), "download or save the model again")
    try:
        model = Dinov2Model.from_pretrained(path, use_safetensors=True, local_files_only=True)
    except (OSError, ValueError) as err:
        raise WeightsError(f"{path} could not be loaded as a DINOv2 model: {err}") from None
    return model.eval().requires_grad_(False)


def _check_finite(path: Path, tensors: Iterable[tuple[str, torch.Tensor]], fix: str) -> None:
    """Refuse weights with NaN or infinite values before a network is built from them: the names and shapes can be
    right while the values are not, and such weights crash the process inside the math library (no report)."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise WeightsError(f"{path}: tensor {name} holds NaN or infinite values, so these are not usable "
                               f"weights; {fix}")


def _safetensors_items(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of a safetensors file, one at a time (a large model is never held twice in memory)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118
                yield key, f.get_tensor(key)
    except (SafetensorError, OSError) as err:
        raise WeightsError(f"{path} is not a readable safetensors file ({err}); download or save it again") from None


def inception_features(
    network: InceptionFeatures, images: np.ndarray, *, batch_size: int = 32, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(2048-d pool features, 1008 unbiased logits) in float64 for uint8 images `[N, C, H, W]`."""
    pools, logits = [], []
    for batch in _rgb_batches(images, batch_size, "Inception features", progress):
        pool, logit = network(batch)
        pools.append(pool.double())
        logits.append(logit.double())
    return torch.cat(pools).numpy(), torch.cat(logits).numpy()


def dinov2_features(
    model: Dinov2Model, images: np.ndarray, *, batch_size: int = 32, progress: bool = True
) -> np.ndarray:
    """The CLS token after the final layer norm (transformers' `pooler_output`), float64, for uint8 `[N, C, H, W]`."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = []
    for batch in _rgb_batches(images, batch_size, "DINOv2 features", progress):
        x = torch.nn.functional.interpolate(batch.float(), size=(DINOV2_SIZE, DINOV2_SIZE), mode="bicubic",
                                            align_corners=False).clamp(0, 255)
        out.append(model(pixel_values=(x / 255 - mean) / std).pooler_output.double())
    return torch.cat(out).numpy()


def _rgb_batches(images: np.ndarray, batch_size: int, what: str, progress: bool) -> Iterator[torch.Tensor]:
    """uint8 `[B, 3, H, W]` batches (grayscale repeated to three channels), under no_grad, with a progress bar."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images [N, 1 or 3, H, W], got {images.dtype} {list(images.shape)}")
    with torch.no_grad():
        for start in tqdm(range(0, len(images), batch_size), desc=what, disable=not progress, leave=False):
            batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
            yield batch.expand(-1, 3, -1, -1).contiguous() if batch.shape[1] == 1 else batch
