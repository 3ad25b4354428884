"""Test-wide setup: 8 fake CPU devices for sharding tests, offline HF, float32 matmuls."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="ghostvis_hf_home_"))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """One tiny converted GhostVis checkpoint per test session (random HF Qwen2 + SigLIP through the converter)."""
    from ghostvis_jax.config import ProjectorConfig, ResamplerConfig
    from ghostvis_jax.testing import tiny_models
    from ghostvis_jax.weights.convert import convert

    root = tmp_path_factory.getbasetemp() / "tiny_generate_ckpt"
    if not (root / "ckpt" / "ghostvis_config.json").exists():
        tiny_models.build_qwen(str(root / "qwen"))
        tiny_models.build_siglip(str(root / "siglip"))
        convert(str(root / "qwen"), str(root / "siglip"), str(root / "ckpt"),
                resampler=ResamplerConfig(num_latents=4, num_heads=4), projector=ProjectorConfig(hidden_size=48))
    return str(root / "ckpt")
