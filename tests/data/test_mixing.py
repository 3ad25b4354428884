"""Token-balanced mixing on two fixture datasets whose answers differ ~30x in length."""

import datasets
import numpy as np
import pytest

from ghostvis_jax.data import mixing, pipeline
from ghostvis_jax.data.chat import answer_token_count

SHORT_WORDS = [str(d) for d in range(10)]  # one token each (+ <|im_end|>)
LONG_TEXT = ("The picture shows a small red circle in the top left and a blue square below it, "
             "with three green triangles on the right side of a white background near the center. ")


def _write(path, answers):
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": a}]}
            for i, a in enumerate(answers)]
    datasets.Dataset.from_list(rows).to_parquet(str(path / "train-00000.parquet"))


@pytest.fixture(scope="module")
def fixture_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(0)
    (root / "short").mkdir()
    (root / "long").mkdir()
    _write(root / "short", [str(rng.choice(SHORT_WORDS)) for _ in range(300)])
    words = (LONG_TEXT * 2).split()
    _write(root / "long", [" ".join(words[: int(rng.integers(39, 46))]) + "." for _ in range(300)])
    return {
        "recipe": None,
        "datasets": {"short_answers": {"path": str(root / "short"), "schema": "smoltalk", "weight": 0.3},
                     "long_answers": {"path": str(root / "long"), "schema": "smoltalk", "weight": 0.7}},
        "batch_size": 8, "max_length": 96, "num_threads": 2, "token_estimate_samples": 200,
    }


def test_token_shares_within_two_points_and_row_mix_misses(tokenizer, tiny_model_config, fixture_config):
    it = pipeline.make_train_iterator(fixture_config, tokenizer, tiny_model_config, seed=0,
                                      process_index=0, process_count=1)
    mean = it.info["mean_answer_tokens"]
    assert 27 <= mean["long_answers"] / mean["short_answers"] <= 33  # ~30x
    for _ in range(2000 // 8):
        next(it)
    counts = it.counts()
    assert sum(counts["rows"].values()) == 2000
    shares = mixing.answer_token_shares(counts["answer_tokens"])
    assert abs(shares["short_answers"] - 0.3) <= 0.02, it.mix_report()
    assert abs(shares["long_answers"] - 0.7) <= 0.02, it.mix_report()

    # The same 2,000 draws with row-based probabilities (p = weight) miss the recipe by far more.
    cfg = pipeline.resolve_data_config(fixture_config)
    mix, info = pipeline.build_mixture(cfg, tokenizer, seed=0, process_index=0, process_count=1, image_size=16)
    tokens = {"short_answers": 0, "long_answers": 0}
    row_mix = mixing.TokenBalancedSelection([0.3, 0.7], seed=0)
    parents = mix._parents  # the same sharded, shuffled datasets
    for i in range(2000):
        k, j = row_mix[i]
        conv = parents[k][j]
        tokens[info["datasets"][k]] += answer_token_count(tokenizer, conv)
    row_shares = mixing.answer_token_shares(tokens)
    assert abs(row_shares["short_answers"] - 0.3) > 0.2
    print("\n" + it.mix_report())


def test_selection_is_deterministic_and_counts_each_dataset_in_order():
    sel = mixing.TokenBalancedSelection([0.5, 0.3, 0.2], seed=7, block_size=100)
    again = mixing.TokenBalancedSelection([0.5, 0.3, 0.2], seed=7, block_size=100)
    picks = [sel[i] for i in range(1000)]
    assert picks == [again[i] for i in range(1000)]
    for k in range(3):  # within a dataset, indices run 0, 1, 2, ... (no repeats, no gaps)
        assert [j for kk, j in picks if kk == k] == list(range(sum(1 for kk, _ in picks if kk == k)))
    assert [sel[i] for i in range(950, 1000)] == picks[950:]  # random access out of order agrees
    assert [kk for kk, _ in picks].count(2) == 200


def test_dataset_yielding_nothing_is_an_error_naming_it(tokenizer, tmp_path):
    datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "q"}]}]).to_parquet(
        str(tmp_path / "x.parquet"))
    cfg = {"recipe": None, "datasets": {"broken_chat": {"path": str(tmp_path), "schema": "smoltalk"}}}
    with pytest.raises(Exception, match="broken_chat"):
        pipeline.build_mixture(pipeline.resolve_data_config(cfg), tokenizer, seed=0, process_index=0,
                               process_count=1, image_size=16)
