"""sdray: distributed batch and online image generation with diffusion models on Ray."""

__version__ = "0.1.0"
