"""A tiny Qwen-style tokenizer for tests and the offline demo.

Byte-level BPE (the Qwen2 pre-tokenizer regex + byte-level alphabet) trained in memory on text that covers
the synthetic dataset's vocabulary, plus the Qwen special tokens. Deterministic: same corpus, same merges.
Saved so `transformers.AutoTokenizer.from_pretrained(out_dir)` loads it offline.
"""

from __future__ import annotations

import os

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
)

# The Qwen2 pre-tokenization regex (splits letters, single digits, punctuation runs, newlines, spaces).
_QWEN_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

DEFAULT_VOCAB_SIZE = 640


def _training_corpus() -> list[str]:
    # Imported here so building the tokenizer does not pull PIL in through the package import order.
    from ghostvis_jax.data import synthetic

    words = list(synthetic.VOCABULARY_WORDS)
    lines = [
        "system", "user", "assistant", "You are a helpful assistant.",
        "Describe the image.", "Answer with a single word or number.",
        "What is in the picture? The image shows a photo of a person, a dog and a cat.",
        "Question: How many people are there? Answer: two. Yes, no, maybe.",
        "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 100 3.5 %",
    ]
    lines += synthetic.template_sentences()
    lines += [" ".join(words), " ".join(w.capitalize() for w in words)]
    # Repeat so the frequent words of the synthetic set become single tokens.
    return lines * 4


def build_tiny_tokenizer(out_dir: str, vocab_size: int = DEFAULT_VOCAB_SIZE) -> str:
    """Train the tiny tokenizer, save it to `out_dir` (created if needed) and return `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers import Regex
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        model_max_length=32768,
    )
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir)
    return out_dir
