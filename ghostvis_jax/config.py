"""Model configuration: dataclasses, named presets, and HF config.json import.

Everything here is plain Python (no JAX), so configs can be built, printed and serialized anywhere.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any


@dataclasses.dataclass(frozen=True)
class QwenConfig:
    """The Qwen2 / Qwen2.5 decoder."""

    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_layers: int = 28
    num_heads: int = 12
    num_kv_heads: int = 2
    head_dim: int = 128
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "QwenConfig":
        """Build from an HF Qwen2 `config.json` dict."""
        heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads", heads),
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=float(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
        )

    def to_hf(self) -> dict[str, Any]:
        """The HF Qwen2 `config.json` fields this decoder is equivalent to."""
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
        }


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    """The SigLIP vision tower (patch tokens out, no pooling head)."""

    image_size: int = 256
    patch_size: int = 16
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    layer_norm_eps: float = 1e-6
    num_channels: int = 3
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "SiglipConfig":
        """Build from an HF `SiglipVisionConfig` dict or a full `SiglipConfig` (uses its vision_config)."""
        v = hf.get("vision_config", hf)
        return cls(
            image_size=v["image_size"],
            patch_size=v["patch_size"],
            hidden_size=v["hidden_size"],
            intermediate_size=v["intermediate_size"],
            num_layers=v["num_hidden_layers"],
            num_heads=v["num_attention_heads"],
            layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)),
            num_channels=v.get("num_channels", 3),
        )

    def to_hf(self) -> dict[str, Any]:
        return {
            "architectures": ["SiglipVisionModel"],
            "model_type": "siglip_vision_model",
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "layer_norm_eps": self.layer_norm_eps,
            "num_channels": self.num_channels,
            "hidden_act": "gelu_pytorch_tanh",
        }


@dataclasses.dataclass(frozen=True)
class ResamplerConfig:
    """Reduces [B, P, D_v] patch tokens to [B, num_latents, D_v]."""

    mode: str = "perceiver"  # "perceiver" | "avgpool"
    num_latents: int = 64
    num_layers: int = 2
    num_heads: int = 8
    mlp_ratio: int = 4
    layer_norm_eps: float = 1e-5  # torch nn.LayerNorm default, as in the original

    def __post_init__(self):
        if self.mode not in ("perceiver", "avgpool"):
            raise ValueError(f"resampler mode must be 'perceiver' or 'avgpool', got {self.mode!r}")


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    """Linear(D_v, hidden) -> GELU -> Dropout -> Linear(hidden, D_llm) -> LayerNorm(D_llm)."""

    hidden_size: int = 2048
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class GhostVisConfig:
    llm: QwenConfig = dataclasses.field(default_factory=QwenConfig)
    vision: SiglipConfig = dataclasses.field(default_factory=SiglipConfig)
    resampler: ResamplerConfig = dataclasses.field(default_factory=ResamplerConfig)
    projector: ProjectorConfig = dataclasses.field(default_factory=ProjectorConfig)
    # Token id of the image slot (`<|image_pad|>`); filled in from the tokenizer at conversion time.
    image_token_id: int = 151655

    @property
    def num_image_tokens(self) -> int:
        return self.resampler.num_latents

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GhostVisConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GhostVisConfig keys {sorted(unknown)}; valid: {sorted(known)}")
        vision = dict(d.get("vision", {}))
        for k in ("image_mean", "image_std"):
            if k in vision:
                vision[k] = tuple(vision[k])
        return cls(
            llm=_build(QwenConfig, d.get("llm", {}), "llm"),
            vision=_build(SiglipConfig, vision, "vision"),
            resampler=_build(ResamplerConfig, d.get("resampler", {}), "resampler"),
            projector=_build(ProjectorConfig, d.get("projector", {}), "projector"),
            image_token_id=d.get("image_token_id", 151655),
        )


def _build(cls, d: dict[str, Any], where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown keys in config section {where!r}: {sorted(unknown)}; valid: {sorted(known)}")
    return cls(**d)


QWEN_PRESETS: dict[str, QwenConfig] = {
    "qwen2.5-0.5b": QwenConfig(hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                               num_kv_heads=2, head_dim=64),
    "qwen2.5-1.5b": QwenConfig(),
    "qwen2.5-3b": QwenConfig(hidden_size=2048, intermediate_size=11008, num_layers=36, num_heads=16,
                             num_kv_heads=2, head_dim=128),
}

SIGLIP_PRESETS: dict[str, SiglipConfig] = {
    "siglip-large-patch16-256": SiglipConfig(),
    "siglip-so400m-patch14-384": SiglipConfig(image_size=384, patch_size=14, hidden_size=1152,
                                              intermediate_size=4304, num_layers=27, num_heads=16),
    "siglip-base-patch16-224": SiglipConfig(image_size=224, patch_size=16, hidden_size=768,
                                            intermediate_size=3072, num_layers=12, num_heads=12),
}


def preset(llm: str = "qwen2.5-1.5b", vision: str = "siglip-large-patch16-256", **kw) -> GhostVisConfig:
    """A GhostVis config from named presets, e.g. `preset("qwen2.5-1.5b", "siglip-large-patch16-256")`."""
    if llm not in QWEN_PRESETS:
        raise ValueError(f"unknown LLM preset {llm!r}; known: {sorted(QWEN_PRESETS)}")
    if vision not in SIGLIP_PRESETS:
        raise ValueError(f"unknown vision preset {vision!r}; known: {sorted(SIGLIP_PRESETS)}")
    return GhostVisConfig(llm=QWEN_PRESETS[llm], vision=SIGLIP_PRESETS[vision], **kw)
