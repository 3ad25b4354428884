import dataclasses
import json
import pickle

import grain
import numpy as np
import pytest

from ghostvis_jax.data import pipeline
from ghostvis_jax.data.batching import (ImageBudgetBatchIterDataset, bucket_length, check_length_buckets,
                                        join_batches, trim_to_length)

DATA = {"recipe": "synthetic_sft", "batch_size": 4, "max_length": 48, "num_threads": 2,
        "prefetch_buffer_size": 4, "token_estimate_samples": 32,
        "synthetic": {"num_examples": 200, "eval_examples": 12}}


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_contract(tokenizer, tiny_model_config):
    it = pipeline.make_train_iterator(DATA, tokenizer, tiny_model_config, seed=0, process_index=0, process_count=1)
    b = next(it)
    assert b["input_ids"].shape == (4, 48) and b["input_ids"].dtype == np.int32
    assert b["targets"].shape == (4, 48) and b["targets"].dtype == np.int32
    assert b["loss_mask"].shape == (4, 48) and b["loss_mask"].dtype == np.float32
    assert b["pixel_values"].shape == (4, 16, 16, 3) and b["pixel_values"].dtype == np.float32
    assert b["num_images"].tolist() == [1, 1, 1, 1]
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert ((b["input_ids"] == image_pad).sum(1) == 4 * b["num_images"]).all()
    np.testing.assert_array_equal(b["targets"][:, :-1], b["input_ids"][:, 1:])
    assert (b["loss_mask"][b["targets"] == image_pad] == 0).all()
    assert (b["loss_mask"].sum(1) > 0).all()
    pad = tokenizer.pad_token_id
    for row, n in zip(b["input_ids"], b["lengths"]):  # lengths: where each row's tokens stop
        assert 4 < n < 48 and row[n - 1] != pad and (row[n:] == pad).all()
    assert all((m[n - 1:] == 0).all() for m, n in zip(b["loss_mask"], b["lengths"]))


def test_length_buckets_cut_only_padding():
    assert [bucket_length(n, (16, 32), 48) for n in (1, 16, 17, 32, 33, 48)] == [16, 16, 32, 32, 48, 48]
    assert bucket_length(20, (), 48) == 48
    with pytest.raises(ValueError, match="a row of 49 tokens is longer than max_length 48"):
        bucket_length(49, (16, 32), 48)
    batch = {"input_ids": np.arange(24).reshape(2, 12), "targets": np.ones((2, 12)), "loss_mask": np.ones((2, 12)),
             "pixel_values": np.zeros((3, 2, 2, 3)), "num_images": np.array([1, 2]), "lengths": np.array([5, 8])}
    cut = trim_to_length(batch, 8)
    assert {k: v.shape for k, v in cut.items() if v.ndim == 2} == {"input_ids": (2, 8), "targets": (2, 8),
                                                                   "loss_mask": (2, 8)}
    np.testing.assert_array_equal(cut["input_ids"], batch["input_ids"][:, :8])
    assert cut["pixel_values"] is batch["pixel_values"] and cut["lengths"] is batch["lengths"]
    with pytest.raises(ValueError, match="cannot cut the batch to 7 tokens: a row holds 8"):
        trim_to_length(batch, 7)


def test_joined_batches_keep_each_rows_images_with_it():
    """Batches of 2 rows and an image budget of 2: the first holds one image and a blank, the second two. Joined,
    the three real images come first, in row order (slots are filled in order), the blank last."""
    def batch(row_ids, images):
        n = np.array([len(i) for i in images], np.int32)
        px = np.zeros((2, 1, 1, 3), np.float32)
        px[:n.sum()] = np.array([v for i in images for v in i], np.float32).reshape(-1, 1, 1, 1)
        return {"input_ids": np.array(row_ids)[:, None], "num_images": n, "lengths": np.ones(2, np.int32),
                "pixel_values": px}

    a, b, c, d = batch([0, 1], [[10], []]), batch([2, 3], [[20, 21], []]), batch([4, 5], []), batch([6, 7], [[], [70]])
    first, second = join_batches([a, b, c, d], 2)
    assert first["input_ids"][:, 0].tolist() == [0, 1, 2, 3] and first["num_images"].tolist() == [1, 0, 2, 0]
    assert first["pixel_values"][:, 0, 0, 0].tolist() == [10, 20, 21, 0]
    assert second["pixel_values"][:, 0, 0, 0].tolist() == [70, 0, 0, 0]
    three = [a, b, c]
    assert join_batches(three, 2) is three  # 2 does not divide 3: left as they are
    assert len(join_batches([a, b, c, d], 8)) == 1 and len(join_batches([a, b, c, d], 3)) == 2


@pytest.mark.parametrize("buckets", [(64,), (32, 16), (16, 16), (0, 16), (16.5,), "16", (True,)])
def test_bad_length_buckets_are_refused_by_name(buckets):
    with pytest.raises(ValueError, match=r"length_buckets must be increasing integers .*max_length \(64\)"):
        check_length_buckets(buckets, 64)
    with pytest.raises(ValueError, match="length_buckets"):
        pipeline.resolve_data_config(dict(DATA, max_length=64, length_buckets=buckets))
    assert check_length_buckets([16, np.int64(32)], 64) == (16, 32)


def test_same_seed_same_batches_and_other_seed_differs(tokenizer, tiny_model_config):
    make = lambda seed: pipeline.make_train_iterator(  # noqa: E731
        DATA, tokenizer, tiny_model_config, seed=seed, process_index=0, process_count=1)
    a, b, c = _take(make(3), 5), _take(make(3), 5), _take(make(4), 5)
    _assert_same(a, b)
    assert not all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


def test_resume_from_saved_state_gives_identical_batches(tokenizer, tiny_model_config):
    it = pipeline.make_train_iterator(DATA, tokenizer, tiny_model_config, seed=1, process_index=0, process_count=1)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what the trainer stores through Orbax
    following = _take(it, 4)
    resumed = pipeline.make_train_iterator(DATA, tokenizer, tiny_model_config, seed=1, process_index=0,
                                           process_count=1)
    resumed.set_state(state)
    _assert_same(following, _take(resumed, 4))
    assert resumed.counts()["rows"] == it.counts()["rows"]
    other = pipeline.make_train_iterator(DATA, tokenizer, tiny_model_config, seed=2, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="different data config"):
        other.set_state(state)


def test_length_grouped_batches_hold_the_same_rows_and_resume(tokenizer, tiny_model_config):
    """Grouping by length within windows of 3 steps (4 rows each) reorders rows only inside each 12-row window, each
    step taking one run of the window's length order; a saved state resumes it exactly, and a state saved without
    grouping is refused."""
    grouped_config = dict(DATA, length_group_steps=3)
    plain = _take(pipeline.make_train_iterator(DATA, tokenizer, tiny_model_config, seed=1, process_index=0,
                                               process_count=1), 6)
    it = pipeline.make_train_iterator(grouped_config, tokenizer, tiny_model_config, seed=1, process_index=0,
                                      process_count=1)
    grouped = _take(it, 6)
    for w in (0, 3):  # two windows of 3 batches: the same rows, sorted by length into batches
        assert sorted(_real_rows(grouped[w:w + 3])) == sorted(_real_rows(plain[w:w + 3]))
        spans = sorted((b["lengths"].min(), b["lengths"].max()) for b in grouped[w:w + 3])
        assert all(hi <= lo_next for (_, hi), (lo_next, _) in zip(spans, spans[1:]))
    state = json.loads(json.dumps(it.get_state()))
    following = _take(it, 4)
    resumed = pipeline.make_train_iterator(grouped_config, tokenizer, tiny_model_config, seed=1, process_index=0,
                                           process_count=1)
    resumed.set_state(state)
    _assert_same(following, _take(resumed, 4))
    ungrouped = pipeline.make_train_iterator(DATA, tokenizer, tiny_model_config, seed=1, process_index=0,
                                             process_count=1)
    with pytest.raises(ValueError, match="different data config"):
        ungrouped.set_state(state)


def _real_rows(batches):
    """The non-padding rows of a run of batches, in order, as token tuples."""
    return [tuple(r) for b in batches for r, n in zip(b["input_ids"], b["loss_mask"].sum(1)) if n > 0]


def test_a_saved_state_resumes_with_another_batch_size(tokenizer, tiny_model_config):
    """Half the rows per batch (half the devices, twice the accumulation) after a restore: the same rows follow,
    in order, none skipped or repeated. The image budgets (3 of 4 rows, 1 of 2) make every batch carry a row over,
    and the state is saved with one carried."""
    make = lambda batch_size, images: pipeline.make_train_iterator(  # noqa: E731
        {**DATA, "batch_size": batch_size, "max_images_per_batch": images}, tokenizer, tiny_model_config, seed=5,
        process_index=0, process_count=1)
    it = make(4, 3)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    following = _take(it, 4)
    halves = make(2, 1)
    halves.set_state(state)
    want, got = _real_rows(following), _real_rows(_take(halves, 12))
    assert len(want) == 12 and got == want
    assert [int(b["num_images"].sum()) for b in following] == [3] * 4


def test_a_state_saved_before_the_batch_shape_left_the_fingerprint_still_resumes(tokenizer, tiny_model_config):
    """Checkpoints written before 2026-11-26 carry a fingerprint of the batch shape too (this formula, frozen):
    they resume at that shape, and are refused by name at another."""
    data = {**DATA, "batch_size": 4}
    cfg = pipeline.resolve_data_config(data)
    older = pipeline._fingerprint([cfg["datasets"], cfg["batch_size"], cfg["max_length"], cfg["max_images_per_batch"],
                                   cfg["synthetic"], 1, 0, 1, 4, 16])
    it = pipeline.make_train_iterator(data, tokenizer, tiny_model_config, seed=1, process_index=0, process_count=1)
    _take(it, 2)
    state = {**it.get_state(), "fingerprint": older}
    following = _take(it, 2)
    same_shape = pipeline.make_train_iterator(data, tokenizer, tiny_model_config, seed=1, process_index=0,
                                              process_count=1)
    same_shape.set_state(state)
    _assert_same(following, _take(same_shape, 2))
    other_shape = pipeline.make_train_iterator({**data, "batch_size": 2}, tokenizer, tiny_model_config, seed=1,
                                               process_index=0, process_count=1)
    with pytest.raises(ValueError, match=f"different data config .*fingerprint '{older}'"):
        other_shape.set_state(state)


def test_two_processes_see_disjoint_shards(tokenizer):
    cfg = pipeline.resolve_data_config(DATA)
    ids = []
    for p in range(2):
        mix, _ = pipeline.build_mixture(cfg, tokenizer, seed=0, process_index=p, process_count=2, image_size=16)
        ids.append({mix[i]["id"] for i in range(300)})
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    for p in range(2):
        held = pipeline.eval_conversations(DATA, process_index=p, process_count=2, image_size=16)
        ids.append({c["id"] for c in held})
    assert not ids[2] & ids[3] and len(ids[2] | ids[3]) == 4 * 12
    assert all("/heldout/" in i for i in ids[2])


def test_eval_iterator_single_pass_with_padded_last_batch(tokenizer, tiny_model_config):
    cfg = dict(DATA, batch_size=5)
    batches = list(pipeline.make_eval_iterator(cfg, tokenizer, tiny_model_config, process_index=0, process_count=1))
    rows = sum(int((b["loss_mask"].sum(1) > 0).sum()) for b in batches)
    assert rows == 48 and len(batches) == 10
    last = batches[-1]
    assert last["num_images"].tolist() == [1, 1, 1, 0, 0] and last["loss_mask"][3:].sum() == 0


def test_image_token_id_mismatch_is_an_error(tokenizer, tiny_model_config):
    bad = dataclasses.replace(tiny_model_config, image_token_id=151655)
    with pytest.raises(ValueError, match="image_token_id"):
        pipeline.make_train_iterator(DATA, tokenizer, bad, seed=0, process_index=0, process_count=1)


def test_prepare_transform_is_picklable_for_worker_processes(tokenizer, tiny_model_config):
    from ghostvis_jax.data.batching import ImageSpec, PrepareExample
    from ghostvis_jax.data import synthetic

    prep = PrepareExample(tokenizer, ImageSpec.from_vision_config(tiny_model_config.vision), 4, 48)
    clone = pickle.loads(pickle.dumps(prep))
    ex = synthetic.make_example("shapes_vqa", 0, image_size=16)
    a, b = prep.random_map(ex, np.random.default_rng(0)), clone.random_map(ex, np.random.default_rng(0))
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


# ---- the image-budget batcher on rows with 0..3 images (and one with too many) --------------------------

def _rows(n_rows=40, T=6, H=2):
    rng = np.random.default_rng(0)
    out = []
    for r in range(n_rows):
        n = int(rng.choice([0, 1, 1, 2, 3])) if r != 7 else 5  # row 7 can never fit a budget of 4
        out.append({"input_ids": np.full((T,), r, np.int32), "targets": np.full((T,), r, np.int32),
                    "loss_mask": np.ones((T,), np.float32),
                    "pixel_values": np.stack([np.full((H, H, 3), r * 10 + j, np.float32) for j in range(n)])
                    if n else np.zeros((0, H, H, 3), np.float32),
                    "num_images": n, "length": T, "dataset": "fixture"})
    return out


def _batcher(rows):
    parent = grain.MapDataset.source(rows).to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
    return ImageBudgetBatchIterDataset(parent, batch_size=4, max_images=4, max_length=6, image_size=2, pad_id=0)


def test_image_budget_keeps_order_carries_over_and_drops_oversized():
    rows = _rows()
    batches = list(_batcher(rows))
    seen = []
    for b in batches:
        assert b["pixel_values"].shape == (4, 2, 2, 3) and b["num_images"].sum() <= 4
        k = 0
        for row_ids, n in zip(b["input_ids"][:, 0], b["num_images"]):
            for j in range(n):  # images are in slot order: row-major, then within the row
                assert b["pixel_values"][k, 0, 0, 0] == row_ids * 10 + j
                k += 1
        assert (b["pixel_values"][k:] == 0).all()
        seen += [int(r) for r, m in zip(b["input_ids"][:, 0], b["loss_mask"].sum(1)) if m > 0]
    assert seen == [r for r in range(40) if r != 7]  # nothing lost, nothing reordered
    it = iter(_batcher(rows))
    list(it)
    assert it.counts()["dropped"] == {"fixture": {"more images than max_images_per_batch": 1}}
    assert it.counts()["padding_rows"] > 0  # carry-overs left some batches short


def test_image_budget_resume_at_every_batch_boundary():
    rows = _rows()
    full = list(_batcher(rows))
    it = iter(_batcher(rows))
    for i in range(len(full)):
        state = json.loads(json.dumps(it.get_state()))
        fresh = iter(_batcher(rows))
        fresh.set_state(state)
        _assert_same(full[i:], list(fresh))
        next(it)


def test_worker_processes_match_threads_and_resume(tokenizer, tiny_model_config):
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    workers = dict(DATA, worker_count=1, worker_buffer_size=2)
    threads = pipeline.make_train_iterator(DATA, tokenizer, tiny_model_config, seed=5, process_index=0,
                                           process_count=1)
    it = pipeline.make_train_iterator(workers, tokenizer, tiny_model_config, seed=5, process_index=0, process_count=1)
    expected = _take(threads, 5)
    _assert_same(expected[:2], _take(it, 2))
    state = json.loads(json.dumps(it.get_state()))
    resumed = pipeline.make_train_iterator(workers, tokenizer, tiny_model_config, seed=5, process_index=0,
                                           process_count=1)
    resumed.set_state(state)
    _assert_same(expected[2:], _take(resumed, 3))
