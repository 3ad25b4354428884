"""Generation with a fixed-size KV cache: `decode` (token ids in, token ids out) and `generate` (text)."""

from ghostvis_jax.generate.decoding import Decoded, Decoder, Sampling, bucket, decode
from ghostvis_jax.generate.image_cache import ImageEmbeddingCache, image_key
from ghostvis_jax.generate.sampling import filter_logits, greedy_tokens, sampled_tokens
from ghostvis_jax.generate.text import Generation, decoder_for, embed_images, generate, stop_token_ids

__all__ = ["Decoded", "Decoder", "Generation", "ImageEmbeddingCache", "Sampling", "bucket", "decode",
           "decoder_for", "embed_images", "filter_logits", "generate", "greedy_tokens", "image_key",
           "sampled_tokens", "stop_token_ids"]
