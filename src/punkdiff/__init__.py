"""punkdiff: train and ship unconditional DDPM models with Hugging Face Diffusers.

Heavy imports (torch, diffusers) are deferred so that `punkdiff presets` and `--help` stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["PunkDiffPipeline", "__version__"]

if TYPE_CHECKING:
    from punkdiff.pipelines.punkdiff_pipeline import PunkDiffPipeline


def __getattr__(name: str) -> Any:
    if name == "PunkDiffPipeline":
        from punkdiff.pipelines.punkdiff_pipeline import PunkDiffPipeline

        return PunkDiffPipeline
    raise AttributeError(f"module 'punkdiff' has no attribute {name!r}")
