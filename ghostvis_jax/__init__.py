"""GhostVis in JAX: SigLIP tower → Perceiver resampler → MLP projector → Qwen2.5 decoder."""

from ghostvis_jax.api import GhostVis, load
from ghostvis_jax.config import GhostVisConfig, preset

__all__ = ["GhostVis", "GhostVisConfig", "load", "preset"]
