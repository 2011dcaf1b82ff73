"""Inference code that travels to the Hub next to a model: imports torch and diffusers only."""
