"""Real shapes, abstractly: the 1.5B model builds from presets and its counts match HF's."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from ghostvis_jax.checkpoint import abstract_model
from ghostvis_jax.config import GhostVisConfig, QwenConfig, SiglipConfig, preset


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_qwen25_1p5b_parameter_count_matches_hf():
    model = abstract_model(preset("qwen2.5-1.5b", "siglip-large-patch16-256"))
    assert _count(nnx.state(model.llm, nnx.Param)) == 1_543_714_304
    assert model.vision.position_embedding.shape == (256, 1024)
    assert model.resampler.latents.shape == (64, 1024)
    assert model.projector.fc2.kernel.shape == (2048, 1536)


@pytest.mark.parametrize("name,count", [("qwen2.5-0.5b", 494_032_768), ("qwen2.5-3b", 3_085_938_688)])
def test_other_qwen_presets(name, count):
    model = abstract_model(GhostVisConfig(llm=preset(name).llm))
    assert _count(nnx.state(model.llm, nnx.Param)) == count


@pytest.mark.parametrize("name,patches,width", [("siglip-so400m-patch14-384", 729, 1152),
                                                ("siglip-base-patch16-224", 196, 768)])
def test_vision_presets(name, patches, width):
    cfg = preset(vision=name)
    assert cfg.vision.num_patches == patches and cfg.vision.hidden_size == width
    feats = jax.eval_shape(lambda m, x: m.vision_features(x), abstract_model(cfg),
                           jax.ShapeDtypeStruct((2, cfg.vision.image_size, cfg.vision.image_size, 3), np.float32))
    assert feats.shape == (2, patches, width)


def test_hf_config_round_trip_and_unknown_keys():
    hf = {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
          "num_attention_heads": 12, "num_key_value_heads": 2, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
          "tie_word_embeddings": True, "max_position_embeddings": 32768}
    assert QwenConfig.from_hf(hf) == preset().llm
    assert SiglipConfig.from_hf({"vision_config": preset().vision.to_hf()}) == preset().vision
    cfg = preset()
    assert GhostVisConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ValueError, match="unknown keys in config section 'llm'.*hiden_size"):
        GhostVisConfig.from_dict({"llm": {"hiden_size": 3}})
    with pytest.raises(ValueError, match="unknown LLM preset"):
        preset("qwen9")
