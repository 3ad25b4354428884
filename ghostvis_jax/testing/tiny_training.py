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


def tiny_train_config(workdir: str, **overrides):
    """A complete training config for a tiny random model on the synthetic set (CPU, seconds per run)."""
    import ml_collections

    from ghostvis_jax.train.config import base_config

    c = base_config()
    c.stage, c.init, c.tokenizer, c.workdir = "sft", "random", "tiny", workdir
    c.model = ml_collections.ConfigDict({
        "llm": {"vocab_size": 640, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4,
                "num_kv_heads": 2, "head_dim": 16, "rope_theta": 10000.0},
        "vision": {"image_size": 16, "patch_size": 8, "hidden_size": 64, "intermediate_size": 128, "num_layers": 1,
                   "num_heads": 4},
        "resampler": {"num_latents": 4, "num_layers": 1, "num_heads": 4},
        "projector": {"hidden_size": 64}})
    c.num_trainable_layers = 1
    c.compute_dtype = c.frozen_param_dtype = "float32"
    c.num_steps, c.log_every, c.eval_every, c.eval_batches, c.checkpoint_every = 6, 2, 100, 2, 3
    c.progress_bar = False
    c.compilation_cache_dir = ""
    c.optim.warmup_steps = 1
    c.optim.projector_lr = c.optim.resampler_lr = c.optim.llm_lr = 1e-3
    c.data.recipe, c.data.batch_size, c.data.max_length, c.data.num_threads = "synthetic_sft", 8, 64, 2
    c.data.synthetic.num_examples, c.data.synthetic.eval_examples = 200, 32
    c.data.eval.max_examples_per_dataset = 16
    for key, value in overrides.items():
        target = c
        *parents, last = key.split(".")
        for p in parents:
            target = target[p]
        target[last] = value
    return c
