"""Hand-worked cases for the eval metrics (issue 5): VQA normalization and accuracy, ChartQA relaxed accuracy,
CIDEr-D, multiple-choice extraction, and the accumulator the eval script sums across processes."""

from collections import Counter
import math

import numpy as np
import pytest

from ghostvis_jax.eval.metrics import (
    MetricAccumulator,
    caption_tokens,
    cider,
    cider_scores,
    extract_choice,
    multiple_choice_accuracy,
    normalize_vqa_answer,
    relaxed_accuracy,
    relaxed_accuracy_any,
    vqa_accuracy,
)

# ------------------------------------------------------------------------------------------ VQA normalization


@pytest.mark.parametrize(
    "raw, normalized",
    [
        # case and whitespace (tabs and newlines included)
        ("Yes", "yes"),
        ("  Red\tand\nWhite  ", "red and white"),
        # periods: dropped unless a digit follows, so decimals survive
        ("Yes.", "yes"),
        ("3.5", "3.5"),
        ("5.", "5"),
        ("e.g.", "eg"),
        # the digit-comma rule: a comma between digits is deleted, not turned into a space
        ("1,000", "1000"),
        ("2,500,000", "2500000"),
        # ...and it makes every mark of the text deleted rather than spaced
        ("1,000 t-shirts", "1000 tshirts"),
        # a mark touching a space is deleted; one between letters becomes a space
        ("black-and-white", "black and white"),
        ("yes,no", "yes no"),
        ("hello, world", "hello world"),
        ("t-shirt, red", "t shirt red"),
        ("What?!", "what"),
        ('"stop"', "stop"),
        ("(left)", "left"),
        # marks outside the official list are kept
        ("50%", "50%"),
        ("3:00", "3:00"),
        # number words zero..ten (and "none") become digits; others stay words
        ("Two", "2"),
        ("ten", "10"),
        ("zero", "0"),
        ("none", "0"),
        ("eleven", "eleven"),
        ("two dogs", "2 dogs"),
        # articles are dropped as whole words only
        ("The Dog", "dog"),
        ("an apple", "apple"),
        ("a", ""),
        ("theater", "theater"),
        ("A Man Riding A Horse", "man riding horse"),
        # contractions get their apostrophe back; words that are real words are left alone
        ("dont", "don't"),
        ("Isnt", "isn't"),
        ("doesnt know", "doesn't know"),
        ("don't", "don't"),
        ("its", "its"),
        ("oclock", "o'clock"),
        # everything together
        ("  The TWO dogs, I think.\n", "2 dogs i think"),
        ("", ""),
        ("?", ""),
    ],
)
def test_normalize_vqa_answer(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


# ------------------------------------------------------------------------------------------------ VQA accuracy


def _ten_answers(matching: int, answer: str = "2") -> list[str]:
    others = ["one", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "many"]
    return [answer] * matching + others[: 10 - matching]


@pytest.mark.parametrize(
    "matching, expected",
    [
        # (k·min((k-1)/3, 1) + (10-k)·min(k/3, 1)) / 10
        (0, 0.0),
        (1, 0.3),  # (1·0 + 9·1/3) / 10
        (2, 0.6),  # (2·1/3 + 8·2/3) / 10 = (2/3 + 16/3) / 10
        (3, 0.9),  # (3·2/3 + 7·1) / 10
        (4, 1.0),  # (4·1 + 6·1) / 10
        (10, 1.0),
    ],
)
def test_vqa_accuracy_leave_one_out_over_ten_answers(matching, expected):
    answers = _ten_answers(matching)
    assert vqa_accuracy("2", answers) == pytest.approx(expected)
    # A plain average of min(k/3, 1) without leave-one-out would give 1/3, 2/3, 1, 1: different for k = 1..3.


def test_vqa_accuracy_matches_after_normalization():
    answers = ["2", "2", "two", "Two.", "3", "3", "3", "3", "3", "3"]
    # All four of "2", "2", "two", "Two." normalize to "2".
    assert vqa_accuracy("The two", answers) == pytest.approx(1.0)
    answers = ["t-shirt", "t shirt", "T-Shirt", "shirt", "shirt", "shirt", "shirt", "shirt", "shirt", "shirt"]
    assert vqa_accuracy("T shirt", answers) == pytest.approx(0.9)
    assert vqa_accuracy("Shirt.", answers) == pytest.approx(1.0)


def test_vqa_accuracy_empty_prediction_scores_zero():
    assert vqa_accuracy("", ["yes"] * 10) == 0.0
    # "the" and "." normalize to "", and still score 0 against human answers that also normalize to "".
    assert vqa_accuracy("the", ["", "a", "the"] + ["yes"] * 7) == 0.0
    assert vqa_accuracy(" . ", [""] * 10) == 0.0


def test_vqa_accuracy_with_fewer_than_ten_answers():
    # One answer: no subset is left after leaving it out, so the rule is exact match after normalization.
    assert vqa_accuracy("Two", ["2"]) == 1.0
    assert vqa_accuracy("three", ["2"]) == 0.0
    # Two or more: the official leave-one-out formula unchanged.
    assert vqa_accuracy("yes", ["yes", "yes"]) == pytest.approx(1 / 3)  # each subset: 1 match / 3
    assert vqa_accuracy("yes", ["yes", "no"]) == pytest.approx(1 / 6)  # (0 + 1/3) / 2
    assert vqa_accuracy("yes", ["yes"] * 4) == pytest.approx(1.0)  # each subset: 3 matches
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


# ------------------------------------------------------------------------------------------ ChartQA relaxed accuracy


@pytest.mark.parametrize(
    "prediction, target, expected",
    [
        # 5% relative tolerance around 100
        ("100", "100", 1.0),
        ("105", "100", 1.0),  # exactly 5%
        ("104.9", "100", 1.0),
        ("105.1", "100", 0.0),
        ("95", "100", 1.0),
        ("94.9", "100", 0.0),
        # relative to the target, not the prediction: 0.95/1 is 5% off, 1/0.95 is 5.26% off
        ("0.95", "1", 1.0),
        ("1", "0.95", 0.0),
        # negative numbers use |target|
        ("-3.1", "-3", 1.0),
        ("-3.2", "-3", 0.0),
        # a target of 0 needs an exact 0
        ("0", "0", 1.0),
        ("0.0", "0", 1.0),
        ("0.001", "0", 0.0),
        # percent signs, thousands commas, dollar signs, trailing periods, whitespace
        ("45%", "45", 1.0),
        ("44%", "45%", 1.0),
        ("50%", "45", 0.0),
        ("45 %", "45", 1.0),
        ("$1,200", "1200", 1.0),
        ("1,260", "1200", 1.0),
        ("1,261", "1200", 0.0),
        (" 12. ", "12", 1.0),
        # text answers: exact match after lowercasing, stripping and dropping a trailing period
        ("Yes", "yes", 1.0),
        (" Blue. ", "blue", 1.0),
        ("blue", "light blue", 0.0),
        ("12 million", "12", 0.0),
        ("twelve", "12", 0.0),
        ("2019", "Line A", 0.0),
    ],
)
def test_relaxed_accuracy(prediction, target, expected):
    assert relaxed_accuracy(prediction, target) == expected


def test_relaxed_accuracy_custom_tolerance():
    assert relaxed_accuracy("110", "100", tolerance=0.1) == 1.0
    assert relaxed_accuracy("110", "100") == 0.0


def test_relaxed_accuracy_any_takes_the_best_label():
    assert relaxed_accuracy_any("True", ["Yes", "True"]) == 1.0
    assert relaxed_accuracy_any("No", ["Yes", "True"]) == 0.0
    assert relaxed_accuracy_any("51", ["100", "50"]) == 1.0
    with pytest.raises(ValueError):
        relaxed_accuracy_any("1", [])


# -------------------------------------------------------------------------------------------------------- CIDEr-D


def test_caption_tokens():
    assert caption_tokens("A man's dog, running!  FAST.") == ["a", "mans", "dog", "running", "fast"]
    assert caption_tokens("black-and-white") == ["black", "and", "white"]


def test_cider_hand_worked_corpus():
    # Two images, so idf = log 2 - log(max(1, df)): log 2 for n-grams in one image's references (or in none),
    # 0 for n-grams in both ("the"). Every nonzero weight is count · log 2, and log 2 cancels in the cosines.
    predictions = ["dog dog runs fast", "the cat sleeps"]
    references = [["The dog runs."], ["the cat sleeps", "a cat naps"]]

    # Image 1, one reference "the dog runs" (3 tokens); the candidate has 4 tokens.
    #   n=1: candidate {dog: 2, runs: 1, fast: 1}, norm √6; reference {the: 0, dog: 1, runs: 1}, norm √2.
    #        clipped dot = min(2,1)·1 + 1·1 = 2  ->  2 / (√6·√2) = 1/√3
    #   n=2: candidate {dog dog, dog runs, runs fast}, norm √3; reference {the dog, dog runs}, norm √2.
    #        dot = 1  ->  1/√6
    #   n=3: no common trigram -> 0;  n=4: the reference has none -> 0.
    #   length penalty exp(-(4-3)² / (2·6²)) = exp(-1/72)
    image_1 = 10 * math.exp(-1 / 72) * (1 / math.sqrt(3) + 1 / math.sqrt(6)) / 4  # ≈ 2.4300

    # Image 2: the candidate equals its first reference.
    #   vs "the cat sleeps": cosine 1 for n = 1, 2, 3 (the weight of "the" is 0, on both sides), 0 for n=4,
    #     same length -> (1 + 1 + 1 + 0) / 4 = 3/4.
    #   vs "a cat naps": n=1 candidate {the: 0, cat: 1, sleeps: 1} norm √2, reference {a, cat, naps} norm √3,
    #     dot 1 -> 1/√6; nothing in common for n >= 2 -> (1/√6) / 4.
    image_2 = 10 * (3 / 4 + (1 / math.sqrt(6)) / 4) / 2  # ≈ 4.2603

    assert cider_scores(predictions, references) == pytest.approx([image_1, image_2], rel=1e-9)
    assert cider(predictions, references) == pytest.approx((image_1 + image_2) / 2, rel=1e-9)
    assert image_1 == pytest.approx(2.4300, abs=1e-4) and image_2 == pytest.approx(4.2603, abs=1e-4)


def test_cider_perfect_candidate_with_a_single_reference():
    # Each candidate equals its only reference; no n-gram is shared across images, so every cosine is 1 for
    # the orders the caption has: 4 tokens -> orders 1..4 -> 10; 2 tokens -> orders 1, 2 -> 10 · 2/4 = 5.
    predictions = ["a red bus parked outside", "two dogs"]
    references = [["a red bus parked outside"], ["two dogs"]]
    assert cider_scores(predictions, references) == pytest.approx([10.0, 5.0])


def test_cider_single_image_corpus_is_zero():
    # log(#images) = log 1 = 0 and every reference n-gram has df = 1: all idf weights vanish.
    assert cider_scores(["a cat"], [["a cat"]]) == [0.0]


def _reference_cider(predictions, references, sigma=6.0):
    """CIDEr-D written out directly: dense vectors over the corpus vocabulary of n-grams, one matrix per n."""

    def ngrams(tokens, n):
        return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))

    tokens_pred = [caption_tokens(p) for p in predictions]
    tokens_refs = [[caption_tokens(r) for r in refs] for refs in references]
    num_images = len(predictions)
    per_n = []
    for n in range(1, 5):
        vocabulary = sorted(
            {g for t in tokens_pred for g in ngrams(t, n)} | {g for ts in tokens_refs for t in ts for g in ngrams(t, n)}
        )
        index = {g: i for i, g in enumerate(vocabulary)}
        df = np.zeros(len(vocabulary))
        for ts in tokens_refs:
            for g in set().union(*(ngrams(t, n) for t in ts)):
                df[index[g]] += 1
        idf = np.log(num_images) - np.log(np.maximum(df, 1))

        def vector(tokens):
            v = np.zeros(len(vocabulary))
            for g, c in ngrams(tokens, n).items():
                v[index[g]] = c
            return v * idf

        sims = np.zeros((num_images, max(len(r) for r in references)))
        for i in range(num_images):
            cand = vector(tokens_pred[i])
            for j, ref_tokens in enumerate(tokens_refs[i]):
                ref = vector(ref_tokens)
                denominator = np.linalg.norm(cand) * np.linalg.norm(ref)
                cos = np.minimum(cand, ref) @ ref / denominator if denominator > 0 else 0.0
                penalty = np.exp(-((len(tokens_pred[i]) - len(ref_tokens)) ** 2) / (2 * sigma**2))
                sims[i, j] = cos * penalty
        per_n.append(sims)
    total = sum(per_n) / 4  # mean over n, per (image, reference)
    return [10 * total[i, : len(references[i])].mean() for i in range(num_images)]


def test_cider_agrees_with_a_direct_dense_computation():
    predictions = [
        "a man riding a horse on a beach",
        "two dogs play with a red ball in the grass",
        "a plate of food",
        "a red bus",
    ]
    references = [
        ["a man rides a horse along the beach", "a person on a horse near the ocean", "man riding horse"],
        ["two dogs playing with a ball", "a pair of dogs chase a red ball on the grass"],
        ["a plate with broccoli and rice", "a white plate of food on a table", "food on a plate", "dinner"],
        ["a red double decker bus on a street", "a bus driving down the road"],
    ]
    expected = _reference_cider(predictions, references)
    scores = cider_scores(predictions, references)
    assert scores == pytest.approx(expected, rel=1e-9)
    assert all(s > 0 for s in scores)
    assert cider(predictions, references) == pytest.approx(np.mean(expected), rel=1e-9)


def test_cider_rejects_malformed_input():
    with pytest.raises(ValueError):
        cider_scores(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError):
        cider_scores(["a", "b"], [["a"], []])
    with pytest.raises(ValueError):
        cider_scores(["a"], ["a"])  # a bare string instead of a list of references
    with pytest.raises(ValueError):
        cider([], [])


# ----------------------------------------------------------------------------------------------- multiple choice


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("B", "B"),
        ("b", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        (" [C] ", "C"),
        ("**D**", "D"),
        ("The answer is B", "B"),
        ("The correct answer is: (D).", "D"),
        ("Answer: C) blue", "C"),
        ("answer is option A", "A"),
        ("Option A looks wrong and so does B, so the answer is D.", "D"),
        ("C) blue", "C"),
        ("(D) red", "D"),
        ("C. The sky is blue", "C"),
        ("I pick B", "B"),
        ("I would choose B because it is larger", "B"),
        # no choice, several choices, or a letter outside the options
        ("A dog sits on the mat", None),
        ("B or C", None),
        ("", None),
        ("I don't know", None),
        ("E", None),
        ("The answer is E", None),
    ],
)
def test_extract_choice_four_options(prediction, expected):
    assert extract_choice(prediction, num_options=4) == expected


def test_extract_choice_respects_num_options():
    assert extract_choice("E", num_options=5) == "E"
    assert extract_choice("Answer: E", num_options=5) == "E"
    assert extract_choice("C", num_options=2) is None
    with pytest.raises(ValueError):
        extract_choice("A", num_options=0)


def test_multiple_choice_accuracy():
    assert multiple_choice_accuracy("The answer is C", "C", 4) == 1.0
    assert multiple_choice_accuracy("(c)", "C", 4) == 1.0
    assert multiple_choice_accuracy("B", "c", 4) == 0.0
    assert multiple_choice_accuracy("no idea", "A", 4) == 0.0
    with pytest.raises(ValueError):
        multiple_choice_accuracy("A", "F", 4)
    with pytest.raises(ValueError):
        multiple_choice_accuracy("A", "", 4)


# --------------------------------------------------------------------------------------------------- accumulator


def test_metric_accumulator_sums_across_processes():
    process_0, process_1 = MetricAccumulator(), MetricAccumulator()
    for score in (1.0, 0.0, 0.6):
        process_0.add("vqav2", score)
    process_0.add("chartqa", 1.0)
    process_1.add("vqav2", 0.9)
    process_1.add("chartqa", 0.0)
    process_1.add("mmmu", 3.0, count=4)  # a batch: summed score over 4 examples

    state = process_0.state()
    assert state == {"chartqa/count": 1.0, "chartqa/sum": 1.0, "vqav2/count": 3.0, "vqav2/sum": 1.6}
    assert all(isinstance(v, float) for v in state.values())

    combined = MetricAccumulator.sum_states([process_0.state(), process_1.state()])
    assert combined["vqav2/sum"] == pytest.approx(2.5) and combined["vqav2/count"] == 4.0
    means = MetricAccumulator(combined).means()
    assert means == pytest.approx({"vqav2": 2.5 / 4, "chartqa": 0.5, "mmmu": 0.75})

    process_0.merge(process_1)
    assert process_0.means() == pytest.approx(means)
    with pytest.raises(KeyError):
        MetricAccumulator().mean("vqav2")
    with pytest.raises(ValueError):
        MetricAccumulator({"vqav2": 1.0})
