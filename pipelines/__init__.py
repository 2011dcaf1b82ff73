"""Inference code that travels to the Hub next to a model: imports torch and diffusers only."""

from .punkdiff_pipeline import PunkDiffPipeline

__all__ = ["PunkDiffPipeline"]
