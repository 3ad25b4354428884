"""generate with the KV cache against repeated full forwards, left padding, stops, sampling, streaming, images."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import ghostvis_jax as gv
from ghostvis_jax.data.chat import render_prompt
from ghostvis_jax.data.images import ImageDecodeError
from ghostvis_jax.generate import decoder_for, filter_logits
from ghostvis_jax.generate.sampling import sampled_tokens

REFERENCE_LEN = 64  # the full-forward reference runs at one padded length, so it compiles once


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return gv.load(tiny_checkpoint)


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (24 + 8 * i, 40, 3), dtype=np.uint8)) for i in range(n)]


def greedy_by_full_forwards(model, messages, imgs, num_tokens):
    """argmax of the full forward (no cache) at the last real position, token after token."""
    ids = render_prompt(model.tokenizer, messages, model.config.num_image_tokens)
    px = model.preprocess_images(imgs) if imgs else None
    out = []
    for _ in range(num_tokens):
        seq = np.zeros((1, REFERENCE_LEN), np.int32)  # right padding: causal attention never sees it
        seq[0, : len(ids)] = ids
        logits = np.asarray(model.forward(seq, px))
        out.append(int(np.argmax(logits[0, len(ids) - 1])))
        ids = ids + [out[-1]]
    return out


def user(text):
    return [{"role": "user", "content": text}]


def test_greedy_with_cache_equals_full_forwards_text_and_images(model):
    imgs = images(2)
    prompts = [user("<image>\nWhat color are the shapes?"), user("How many shapes are there?"),
               user("Compare <image> with <image>.")]
    per_prompt = [imgs[:1], None, imgs]
    got = model.generate(prompts, per_prompt, max_new_tokens=6, stop=[], return_tokens=True)
    for prompt, imgs_i, g in zip(prompts, per_prompt, got):
        assert g.token_ids == greedy_by_full_forwards(model, prompt, imgs_i or [], 6)
        assert g.finish_reason == "length"


def test_left_padding_output_does_not_depend_on_the_batch(model):
    short = "What is in the picture?"
    alone = model.generate([short], max_new_tokens=8, stop=[], return_tokens=True)[0]
    batch = model.generate(["Describe the image. " * 4, short, "hi"], max_new_tokens=8, stop=[],
                           return_tokens=True)
    assert batch[1].token_ids == alone.token_ids
    assert batch[0].token_ids != alone.token_ids  # the rows really differ


def test_stop_tokens_end_rows_independently_and_max_new_tokens_holds(model):
    prompts = ["What color are the shapes?", "Write a short caption.", "hi"]
    free = model.generate(prompts, max_new_tokens=8, stop=[], return_tokens=True)
    assert all(len(g.token_ids) == 8 and g.finish_reason == "length" for g in free)
    stop_id = free[0].token_ids[2]
    stopped = model.generate(prompts, max_new_tokens=8, stop=[stop_id], return_tokens=True)
    for f, s in zip(free, stopped):
        if stop_id in f.token_ids:
            cut = f.token_ids.index(stop_id)
            assert (s.token_ids, s.finish_reason) == (f.token_ids[:cut], "stop")
        else:
            assert (s.token_ids, s.finish_reason) == (f.token_ids, "length")
    short = model.generate(prompts, max_new_tokens=3, stop=[], return_tokens=True)
    assert [g.token_ids for g in short] == [f.token_ids[:3] for f in free]


def test_repeated_calls_reuse_compiled_functions(model):
    """Greedy and sampled decoding are one program each; new lengths, knobs and seeds compile nothing."""
    jitted = decoder_for(model).jitted
    model.generate(["hi", "What is in the picture?"], max_new_tokens=5)
    model.generate(["hi", "What is in the picture?"], max_new_tokens=5, temperature=0.5)
    sizes = jitted.loop._cache_size(), jitted.prefill._cache_size()
    model.generate(["Describe the image.", "a b c"], max_new_tokens=7, temperature=0.7, top_k=3, seed=2)
    model.generate(["Describe the image.", "a b c"], max_new_tokens=6)
    assert (jitted.loop._cache_size(), jitted.prefill._cache_size()) == sizes


def test_sampling_repeats_for_a_seed_and_top_k_1_is_greedy(model):
    kw = dict(max_new_tokens=8, stop=[], return_tokens=True)
    prompts = ["Write a short caption.", "hi"]
    a = model.generate(prompts, temperature=1.0, top_p=0.9, seed=7, **kw)
    b = model.generate(prompts, temperature=1.0, top_p=0.9, seed=7, **kw)
    c = model.generate(prompts, temperature=1.0, top_p=0.9, seed=8, **kw)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    greedy = model.generate(prompts, **kw)
    top1 = model.generate(prompts, temperature=1.0, top_k=1, seed=3, **kw)
    assert [g.token_ids for g in top1] == [g.token_ids for g in greedy]


def test_filter_logits_top_k_and_top_p():
    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.4]], np.float32))
    keep = lambda k, p: np.isfinite(np.asarray(filter_logits(logits, np.int32(k), np.float32(p))))[0].tolist()
    assert keep(2, 1.0) == [False, False, True, True]
    assert keep(0, 0.4) == [False, False, False, True]   # 0.4 alone reaches 0.4
    assert keep(0, 0.5) == [False, False, True, True]    # 0.4 < 0.5, so 0.3 joins
    assert keep(0, 0.75) == [False, True, True, True]
    assert keep(3, 1.0) == [False, True, True, True]


def test_sampling_draws_from_bfloat16_logits_as_from_their_float32_values():
    """Decoding picks from logits in the compute dtype; a draw must not depend on it (the Gumbel noise takes
    the logits' dtype, so bfloat16 noise would pick other tokens)."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(0, 2, (64, 512)), jnp.bfloat16)
    keys = jax.random.split(jax.random.key(3), 64)
    from_bf16 = sampled_tokens(logits, keys, 0.7, 0, 1.0)
    from_f32 = sampled_tokens(logits.astype(jnp.float32), keys, 0.7, 0, 1.0)
    np.testing.assert_array_equal(from_bf16, from_f32)


def test_bfloat16_model_decodes_in_its_own_dtype(tiny_checkpoint):
    """A bfloat16 model decodes in its own dtype: the prefill hands over bfloat16 logits (no float32 copy), and
    greedy and sampled decoding through the streamed steps pick what the device loop picks."""
    model = gv.load(tiny_checkpoint, dtype="bfloat16")
    prompts = ["What is in the picture?", "hi"]
    for knobs in (dict(), dict(temperature=0.8, top_p=0.9, seed=4)):
        plain = model.generate(prompts, max_new_tokens=6, stop=[], return_tokens=True, **knobs)
        streamed = model.generate(prompts, max_new_tokens=6, stop=[], return_tokens=True,
                                  stream=lambda row, text: None, **knobs)
        assert [g.token_ids for g in streamed] == [g.token_ids for g in plain]
        assert all(len(g.token_ids) == 6 for g in plain)
    decoder = decoder_for(model)
    ids = jnp.ones((1, 16), jnp.int32)
    images = jnp.zeros((1, model.config.num_image_tokens, model.config.llm.hidden_size), jnp.float32)
    _, logits = decoder.jitted.prefill(decoder.leaves, ids, jnp.ones((1, 16), bool), images, cache_len=32)
    assert logits.dtype == jnp.bfloat16


def test_streaming_gives_the_same_text_as_the_device_loop(model):
    pieces = {}
    streamed = model.generate(["What is in the picture?", "hi"], max_new_tokens=6,
                              stream=lambda row, text: pieces.setdefault(row, []).append(text))
    plain = model.generate(["What is in the picture?", "hi"], max_new_tokens=6)
    assert streamed == plain
    assert ["".join(pieces.get(r, [])) for r in range(2)] == plain


def test_n_tokens_cost_n_minus_1_decoder_steps(model, monkeypatch):
    """The first token comes from the prefill's logits, and decoding stops right after a pick: no decoder step
    runs on a token whose logits nobody reads (the last one, or a stop). Counted on the streaming path, whose
    steps are calls from Python; the loop runs the same pieces."""
    from ghostvis_jax.generate.decoding import Sampling, decode

    decoder, prompts = decoder_for(model), [[5, 6, 7, 8, 9], [10, 11]]
    calls = []
    real_step = decoder.jitted.step
    monkeypatch.setattr(decoder.jitted, "step", lambda *a, **k: calls.append(1) or real_step(*a, **k))

    def run(max_new, stops=()):
        calls.clear()
        out = decode(decoder, model.config, prompts, None, max_new_tokens=max_new, sampling=Sampling(),
                     stop_ids=list(stops), on_step=lambda tokens, done: None)
        return out, len(calls)

    free, steps = run(5)
    assert steps == 4 and all(len(d.tokens) == 5 for d in free)
    assert run(1)[1] == 0
    looped = decode(decoder, model.config, prompts, None, max_new_tokens=5, sampling=Sampling(), stop_ids=[])
    assert [d.tokens for d in looped] == [d.tokens for d in free]
    # Row 1 stops at its first token (from the prefill), row 0 at its second: one decoder step, not two.
    stops = {free[0].tokens[1], free[1].tokens[0]}
    assert free[0].tokens[0] not in stops  # the tiny model's tokens make this case
    stopped, steps = run(5, stops)
    assert [(d.tokens, d.finish_reason) for d in stopped] == [(free[0].tokens[:1], "stop"), ([], "stop")]
    assert steps == 1


def test_image_embedding_cache_counts_hits_by_content(model):
    model.image_cache.clear()
    img = images(1, seed=5)[0]
    first = model.generate("<image>\nDescribe the image.", img, max_new_tokens=3, return_tokens=True)
    assert model.image_cache.info()["misses"] == 1 and model.image_cache.info()["hits"] == 0
    copy = Image.fromarray(np.asarray(img).copy())
    again = model.generate("<image>\nDescribe the image.", copy, max_new_tokens=3, return_tokens=True)
    assert model.image_cache.info() == {"hits": 1, "misses": 1, "size": 1, "capacity": 256}
    assert again[0].token_ids == first[0].token_ids


def test_bad_images_and_placeholder_mismatch_give_clear_errors(model, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ImageDecodeError, match="broken.png"):
        model.generate("<image>\nWhat is this?", str(bad), max_new_tokens=2)
    with pytest.raises(ValueError, match="2 <image> placeholder"):
        model.generate("<image><image> two?", images(1), max_new_tokens=2)


def test_length_buckets_pad_at_most_half():
    from ghostvis_jax.generate.decoding import length_bucket

    assert [length_bucket(n) for n in (1, 2, 3, 4, 5, 7, 12, 13, 192, 193, 320, 385)] == \
        [1, 2, 3, 4, 6, 8, 12, 16, 192, 256, 384, 512]
    assert length_bucket(5, 16) == 16
    assert all(n <= length_bucket(n) <= 1.5 * n for n in range(2, 3000))


@pytest.mark.parametrize("unroll", [2, 3])
def test_unrolled_loop_gives_the_same_tokens(model, unroll):
    """Steps per loop iteration change only speed: same tokens, stops and lengths as the default loop."""
    from flax import nnx

    from ghostvis_jax.generate.decoding import Decoder, Sampling, decode

    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    default = decoder_for(model)
    free = decode(default, model.config, prompts, None, max_new_tokens=7, sampling=Sampling(), stop_ids=[])
    other = Decoder(*nnx.split(model.model), unroll=unroll)
    assert other.unroll == unroll != default.unroll
    got = decode(other, model.config, prompts, None, max_new_tokens=7, sampling=Sampling(), stop_ids=[])
    assert [d.tokens for d in got] == [d.tokens for d in free]
    stop = free[0].tokens[2]
    a = decode(default, model.config, prompts, None, max_new_tokens=7, sampling=Sampling(), stop_ids=[stop])
    b = decode(other, model.config, prompts, None, max_new_tokens=7, sampling=Sampling(), stop_ids=[stop])
    assert [(d.tokens, d.finish_reason) for d in a] == [(d.tokens, d.finish_reason) for d in b]
    assert a[0].finish_reason == "stop"


def test_fused_pallas_decode_step_gives_the_same_tokens(monkeypatch):
    """The Pallas decode step (RoPE, cache write and attention in one kernel; interpret mode off the GPU) decodes
    what the XLA path decodes, with left padding and a stop token."""
    import dataclasses

    import jax
    from flax import nnx

    from ghostvis_jax.generate.decoding import Decoder, Sampling, decode
    from ghostvis_jax.model import qwen2
    from ghostvis_jax.model.attention import KeyRange
    from ghostvis_jax.model.vlm import GhostVisModel
    from ghostvis_jax.testing.tiny_training import tiny_model_config

    config = tiny_model_config(num_layers=2)
    config = dataclasses.replace(config, llm=dataclasses.replace(config.llm, head_dim=32))  # the kernel's minimum
    graph, state = nnx.split(GhostVisModel(config, rngs=nnx.Rngs(params=jax.random.key(3))))
    prompts = [[15, 16, 17, 18, 19, 20, 21, 22, 23], [10, 11], [40, 41, 42]]

    def run(decoder, stop_ids=()):
        return decode(decoder, config, prompts, None, max_new_tokens=9, sampling=Sampling(), stop_ids=list(stop_ids))

    want = run(Decoder(graph, state))
    # As on a GPU with enough rows: decode steps pick Pallas (prefill keeps its own choice).
    default_choice = qwen2.pick_implementation
    monkeypatch.setattr(qwen2, "pick_implementation",
                        lambda q, k, mask: "pallas" if isinstance(mask, KeyRange) else default_choice(q, k, mask))
    fused = Decoder(graph, state, unroll=2)  # its own compiled functions, traced with the patch
    assert [d.tokens for d in run(fused)] == [d.tokens for d in want]
    row, at = next((r, i) for r, d in enumerate(want) for i, t in enumerate(d.tokens) if i and t not in d.tokens[:i])
    got = run(fused, [want[row].tokens[at]])
    assert got[row].finish_reason == "stop" and got[row].tokens == want[row].tokens[:at]


def test_prefill_runs_the_prompts_bucket_and_the_loop_at_least_min_decode_rows(model, monkeypatch):
    """One prompt is prefilled as one row (prefill cost grows with rows x prompt length); the decode loop runs
    MIN_DECODE_ROWS rows, and the tokens are those of the prompt decoded alone in a full batch."""
    import jax

    from ghostvis_jax.generate.decoding import MIN_DECODE_ROWS, Sampling, decode

    decoder = decoder_for(model)
    rows = {}
    for name in ("prefill", "loop"):
        fn = getattr(decoder.jitted, name)
        monkeypatch.setattr(decoder.jitted, name, lambda leaves, x, *a, _fn=fn, _name=name, **k: (
            rows.__setitem__(_name, jax.tree.leaves(x)[0].shape[0]), _fn(leaves, x, *a, **k))[1])
    one = decode(decoder, model.config, [[5, 6, 7, 8]], None, max_new_tokens=6, sampling=Sampling(), stop_ids=[])
    assert rows == {"prefill": 1, "loop": MIN_DECODE_ROWS} and MIN_DECODE_ROWS > 1
    full = decode(decoder, model.config, [[5, 6, 7, 8]] + [[9, 10]] * (MIN_DECODE_ROWS - 1), None,
                  max_new_tokens=6, sampling=Sampling(), stop_ids=[])
    assert one[0].tokens == full[0].tokens and len(one) == 1
