"""Shared fixtures for the data tests: the tiny Qwen-style tokenizer, built once per session."""

import pytest
import transformers

from ghostvis_jax.testing.tiny_tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return build_tiny_tokenizer(str(tmp_path_factory.mktemp("tiny_tokenizer")))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_config(tokenizer):
    from ghostvis_jax.config import GhostVisConfig, ResamplerConfig, SiglipConfig

    return GhostVisConfig(vision=SiglipConfig(image_size=16), resampler=ResamplerConfig(num_latents=4),
                          image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"))
