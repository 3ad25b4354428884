"""Tiny model configs and random batches in the training batch format, for tests of the train step."""

from __future__ import annotations

import numpy as np

from ghostvis_jax.config import GhostVisConfig, ProjectorConfig, QwenConfig, ResamplerConfig, SiglipConfig

IMAGE_TOKEN_ID = 5
NUM_IMAGE_TOKENS = 4


def tiny_model_config(num_layers: int = 3) -> GhostVisConfig:
    return GhostVisConfig(
        llm=QwenConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=num_layers, num_heads=4,
                       num_kv_heads=2, head_dim=16, rope_theta=10000.0, tie_word_embeddings=True),
        vision=SiglipConfig(image_size=16, patch_size=8, hidden_size=64, intermediate_size=128, num_layers=1,
                            num_heads=4),
        resampler=ResamplerConfig(num_latents=NUM_IMAGE_TOKENS, num_layers=1, num_heads=4),
        projector=ProjectorConfig(hidden_size=64),
        image_token_id=IMAGE_TOKEN_ID)


def random_batch(seed: int, rows: int = 8, length: int = 16, image_size: int = 16) -> dict[str, np.ndarray]:
    """One micro-batch: every row holds one image (slots at 1..N) and text; loss on a random subset."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, 128, size=(rows, length)).astype(np.int32)
    ids[:, 1:1 + NUM_IMAGE_TOKENS] = IMAGE_TOKEN_ID
    targets = np.concatenate([ids[:, 1:], np.zeros((rows, 1), np.int32)], axis=1)
    mask = (rng.random((rows, length)) < 0.6).astype(np.float32)
    mask[:, :1 + NUM_IMAGE_TOKENS] = 0.0
    mask[:, -1] = 0.0
    px = rng.normal(size=(rows, image_size, image_size, 3)).astype(np.float32)
    return {"input_ids": ids, "targets": targets, "loss_mask": mask, "pixel_values": px,
            "num_images": np.ones((rows,), np.int32)}
