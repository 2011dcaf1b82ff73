"""The FID Inception network (torch-fidelity's, as wrapped by torchmetrics' FID, KID and IS), from tensors in memory.

Needs the `fid` extra (`pip install 'punkdiff[fid]'`: torch-fidelity, which brings torchvision); imported only
when Inception metrics are asked for. `punkdiff.metrics.feature_networks.load_inception` reads the tensors from a
safetensors file and builds this module.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator

import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3


class InceptionFeatures(FeatureExtractorInceptionV3):
    """torch-fidelity's FID InceptionV3 built from a state dict in memory: `forward` returns the 2048-d pool
    features (FID, KID) and the 1008 unbiased logits (IS) of uint8 RGB images `[N, 3, H, W]`, resized to 299.

    torch-fidelity reads weights only from a file, with `torch.load(weights_only=False)`. The state dict is
    handed to it as bytes serialised here, and torch's weights-only unpickler is forced for that call, so even
    those bytes are read as plain tensors.
    """

    def __init__(self, state_dict: dict[str, torch.Tensor]) -> None:
        buffer = io.BytesIO()
        torch.save(dict(state_dict), buffer)
        buffer.seek(0)
        with _weights_only_torch_load():
            super().__init__("inception-v3-compat", ["2048", "logits_unbiased"],
                             feature_extractor_weights_path=buffer)


@contextlib.contextmanager
def _weights_only_torch_load() -> Iterator[None]:
    """Force `torch.load(weights_only=True)` inside the block, whatever the caller asks for."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous
