import numpy as np
import pytest
from PIL import Image

from ghostvis_jax.data import chat

N = 4


def _ids(tok, *names):
    return [tok.convert_tokens_to_ids(n) for n in names]


def _two_image_conversation():
    blank = Image.new("RGB", (8, 8))
    return {
        "images": [blank, blank],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "<image>\nWhat color are the shapes?"},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "And here? <image>"},
            {"role": "assistant", "content": "Two blue circles."},
        ],
    }


def test_two_image_conversation_exact_ids_and_mask(tokenizer):
    tok = tokenizer
    im_start, im_end, vs, ve, pad_img, pad = _ids(
        tok, "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|endoftext|>")
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    image = [vs] + [pad_img] * N + [ve]
    nl = enc("\n")
    # (tokens, supervised) pieces written out from the ChatML spec.
    pieces = [
        ([im_start] + enc("system\n") + enc("Be brief.") + [im_end] + nl, False),
        ([im_start] + enc("user\n") + image + enc("\nWhat color are the shapes?") + [im_end] + nl, False),
        ([im_start] + enc("assistant\n"), False),
        (enc("red") + [im_end], True),
        (nl, False),
        ([im_start] + enc("user\n") + enc("And here? ") + image + [im_end] + nl, False),
        ([im_start] + enc("assistant\n"), False),
        (enc("Two blue circles.") + [im_end], True),
        (nl, False),
    ]
    expected_ids = [t for p, _ in pieces for t in p]
    expected_sup = [s for p, s in pieces for _ in p]

    r = chat.render_conversation(tok, _two_image_conversation(), N)
    assert r.input_ids.tolist() == expected_ids
    assert r.supervised.tolist() == expected_sup
    assert r.num_images == 2

    # Independent check: the HF tokenizer on the full ChatML string gives the same ids.
    text = ("<|im_start|>system\nBe brief.<|im_end|>\n"
            "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * N + "<|vision_end|>\nWhat color are the shapes?"
            "<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"
            "<|im_start|>user\nAnd here? <|vision_start|>" + "<|image_pad|>" * N + "<|vision_end|><|im_end|>\n"
            "<|im_start|>assistant\nTwo blue circles.<|im_end|>\n")
    assert tok.encode(text, add_special_tokens=False) == expected_ids
    assert tok.decode(r.input_ids) == text

    T = len(expected_ids) + 5
    arrays = chat.to_training_arrays(r, T, pad)
    ids, targets, mask = arrays["input_ids"], arrays["targets"], arrays["loss_mask"]
    assert ids.dtype == np.int32 and targets.dtype == np.int32 and mask.dtype == np.float32
    assert ids.tolist() == expected_ids + [pad] * 5
    assert targets.tolist() == expected_ids[1:] + [pad] * 6
    # Loss exactly on targets that are assistant content / assistant <|im_end|>.
    answer = set(enc("red") + enc("Two blue circles."))
    want = [1.0 if (t < len(expected_ids) - 1 and expected_sup[t + 1]) else 0.0 for t in range(T)]
    assert mask.tolist() == want
    assert sorted(targets[mask == 1].tolist()) == sorted(enc("red") + [im_end] + enc("Two blue circles.") + [im_end])
    assert set(targets[mask == 1].tolist()) <= answer | {im_end}
    # Never on image slots, padding or user/system text.
    assert not np.any(mask[(targets == pad_img) | (targets == vs) | (targets == ve) | (targets == pad)])


def test_truncation_cuts_text_after_last_image_only(tokenizer):
    conv = {"images": [Image.new("RGB", (8, 8))],
            "messages": [{"role": "user", "content": "<image>\nDescribe."},
                         {"role": "assistant", "content": "A red circle in the top left. " * 6}]}
    full = chat.render_conversation(tokenizer, conv, N)
    vs_end = full.input_ids.tolist().index(tokenizer.convert_tokens_to_ids("<|vision_end|>")) + 1
    cut = chat.render_conversation(tokenizer, conv, N, max_length=vs_end + 12)
    assert len(cut.input_ids) == vs_end + 12
    assert cut.input_ids.tolist() == full.input_ids[: vs_end + 12].tolist()
    assert cut.supervised[1:].any()
    # A cut that would split the image block (or leave no answer) drops the example.
    for max_length in range(1, vs_end + 1):
        with pytest.raises(chat.RenderError) as e:
            chat.render_conversation(tokenizer, conv, N, max_length=max_length)
        assert e.value.reason in ("too_long", "no_supervised_tokens")
    # No length in between ever yields a partial image block.
    pad_img = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for max_length in range(vs_end, len(full.input_ids) + 1):
        try:
            r = chat.render_conversation(tokenizer, conv, N, max_length=max_length)
        except chat.RenderError:
            continue
        assert int((r.input_ids == pad_img).sum()) == N


def test_render_prompt_shares_training_rendering(tokenizer):
    conv = _two_image_conversation()
    prompt = chat.render_prompt(tokenizer, conv["messages"][:-1], N)
    full = chat.render_conversation(tokenizer, conv, N).input_ids.tolist()
    assert full[: len(prompt)] == prompt
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")


def test_render_prompt_with_system_prompt_and_placeholder_mismatch(tokenizer):
    ids = chat.render_prompt(tokenizer, [{"role": "user", "content": "hi"}], N, system_prompt="Be brief.")
    assert tokenizer.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi")
    bad = {"images": [Image.new("RGB", (8, 8))] * 2,
           "messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}]}
    with pytest.raises(chat.RenderError, match="1 <image> placeholders but 2 images"):
        chat.render_conversation(tokenizer, bad, N)
    with pytest.raises(chat.RenderError, match="role"):
        chat.render_prompt(tokenizer, [{"role": "tool", "content": "x"}], N)


def test_ensure_image_placeholders_puts_images_at_first_user_turn():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "user", "content": "r"}]
    out = chat.ensure_image_placeholders(msgs, 2)
    assert out[1]["content"] == "<image><image>\nq" and out[2]["content"] == "r"
    assert msgs[1]["content"] == "q"
