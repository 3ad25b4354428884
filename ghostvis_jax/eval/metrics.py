"""Scores of the eval tasks: VQA accuracy, ChartQA relaxed accuracy, CIDEr-D, multiple-choice accuracy.

Every per-example metric returns a float in [0, 1] (CIDEr-D is unbounded, about 0..10), so the eval script can
average them with `MetricAccumulator`, whose state is a flat dict of floats that adds up across processes.
CIDEr-D is the exception: its document frequencies come from the whole corpus, so gather every prediction
first and call `cider_scores` once.
"""

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
import math
import re
import string

from ghostvis_jax.eval.vqa_normalize import normalize_vqa_answer

__all__ = [
    "normalize_vqa_answer",
    "vqa_accuracy",
    "relaxed_accuracy",
    "relaxed_accuracy_any",
    "caption_tokens",
    "cider_scores",
    "cider",
    "extract_choice",
    "multiple_choice_accuracy",
    "MetricAccumulator",
]

# ---------------------------------------------------------------------------------------------- VQA accuracy

_ANNOTATORS_FOR_FULL_CREDIT = 3


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official VQA accuracy of `prediction` against the human `answers` (VQAv2, TextVQA).

    The prediction and every human answer go through `normalize_vqa_answer` (the official script applies only
    the punctuation step to human answers; for the lowercase, clean human answers of VQAv2/TextVQA the two
    agree, and full normalization is the symmetric choice). Then, for each human answer in turn, that answer
    is left out and the subset scores min(#other answers equal to the prediction / 3, 1); the accuracy is the
    mean over the subsets. With 10 answers of which k match: (k·min((k-1)/3, 1) + (10-k)·min(k/3, 1)) / 10,
    i.e. 0.3, 0.6, 0.9, 1.0 for k = 1, 2, 3, 4.

    Fewer than 10 answers (not produced by VQAv2/TextVQA): with 2 or more the same leave-one-out formula is
    applied unchanged, so e.g. 2 matching answers out of 2 give 1/3. With a single answer there is no subset
    left after leaving one out, so the score is exact match: 1.0 if the normalized strings are equal, else 0.
    An empty prediction (after normalization) scores 0.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    predicted = normalize_vqa_answer(prediction)
    if not predicted:
        return 0.0
    matches = [normalize_vqa_answer(answer) == predicted for answer in answers]
    if len(matches) == 1:
        return float(matches[0])
    total_matches = sum(matches)
    subset_scores = [
        min((total_matches - left_out_matches) / _ANNOTATORS_FOR_FULL_CREDIT, 1.0) for left_out_matches in matches
    ]
    return sum(subset_scores) / len(subset_scores)


# ------------------------------------------------------------------------------------- ChartQA relaxed accuracy

# An optional sign, an optional "$", digits with optional thousands commas and decimals, an optional "%".
_NUMBER = re.compile(r"(?P<sign>[+-]?)\$?(?P<digits>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)\s*%?")


_RELATIVE_ERROR_SLACK = 1e-9


def _normalize_chart_answer(text: str) -> str:
    text = text.strip().lower()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


def _parse_number(text: str) -> float | None:
    match = _NUMBER.fullmatch(text)
    if match is None:
        return None
    return float(match["sign"] + match["digits"].replace(",", ""))


def relaxed_accuracy(prediction: str, target: str, tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy: 1.0 or 0.0.

    Both strings are lowercased, stripped and lose one trailing period. If both then parse as numbers
    ("1,234", "$12.5", "-3", "45%"), the prediction is correct when |pred - target| / |target| <= tolerance,
    or when it equals the target exactly if the target is 0. A "%" sign is dropped, not divided by 100, so
    "45%" and "45" are the same number (ChartQA labels mostly omit the sign). Otherwise the normalized
    strings must be equal.
    """
    predicted = _normalize_chart_answer(prediction)
    expected = _normalize_chart_answer(target)
    predicted_number = _parse_number(predicted)
    expected_number = _parse_number(expected)
    if predicted_number is not None and expected_number is not None:
        if expected_number == 0:
            return float(predicted_number == 0)
        relative_error = abs(predicted_number - expected_number) / abs(expected_number)
        # The slack keeps answers exactly on the boundary (0.95 for 1) from being lost to float rounding.
        return float(relative_error <= tolerance + _RELATIVE_ERROR_SLACK)
    return float(predicted == expected)


def relaxed_accuracy_any(prediction: str, labels: Sequence[str], tolerance: float = 0.05) -> float:
    """The best `relaxed_accuracy` over the acceptable labels (ChartQA's `label` is a list)."""
    if not labels:
        raise ValueError("relaxed_accuracy_any needs at least one label")
    return max(relaxed_accuracy(prediction, label, tolerance) for label in labels)


# ---------------------------------------------------------------------------------------------------- CIDEr-D

_CIDER_MAX_N = 4
_CIDER_SIGMA = 6.0
_CIDER_SCALE = 10.0
_APOSTROPHES = "'\u2019"
_OTHER_PUNCTUATION = re.compile("[" + re.escape("".join(set(string.punctuation) - set(_APOSTROPHES))) + "]")


def caption_tokens(caption: str) -> list[str]:
    """Caption tokenization for CIDEr: lowercase, apostrophes deleted ("man's" -> "mans"), every other ASCII
    punctuation mark replaced by a space, split on whitespace. (The coco-caption toolkit uses the PTB
    tokenizer and then drops punctuation tokens; on plain captions the two give the same words except for
    possessives and contractions.)"""
    text = caption.lower()
    for apostrophe in _APOSTROPHES:
        text = text.replace(apostrophe, "")
    return _OTHER_PUNCTUATION.sub(" ", text).split()


def _ngram_counts(tokens: Sequence[str]) -> Counter:
    counts = Counter()
    for n in range(1, _CIDER_MAX_N + 1):
        for start in range(len(tokens) - n + 1):
            counts[tuple(tokens[start : start + n])] += 1
    return counts


class _TfIdf:
    """Per n-gram order: the TF-IDF weights of one caption, their L2 norm, and the caption's length."""

    def __init__(self, counts: Counter, document_frequency: Counter, log_num_images: float, length: int):
        self.weights = [dict() for _ in range(_CIDER_MAX_N)]
        for ngram, count in counts.items():
            idf = log_num_images - math.log(max(1.0, document_frequency[ngram]))
            self.weights[len(ngram) - 1][ngram] = count * idf
        self.norms = [math.sqrt(sum(w * w for w in order.values())) for order in self.weights]
        self.length = length


def _cider_similarity(candidate: _TfIdf, reference: _TfIdf) -> float:
    """Mean over n of the clipped cosine similarity, times the gaussian length penalty."""
    length_penalty = math.exp(-((candidate.length - reference.length) ** 2) / (2 * _CIDER_SIGMA**2))
    total = 0.0
    for order in range(_CIDER_MAX_N):
        candidate_weights, reference_weights = candidate.weights[order], reference.weights[order]
        # Clipping (the "-D"): a candidate n-gram counts at most as often as it occurs in the reference. Both
        # weights share the n-gram's idf, so clipping the weights is clipping the counts.
        dot = sum(
            min(weight, reference_weights.get(ngram, 0.0)) * reference_weights.get(ngram, 0.0)
            for ngram, weight in candidate_weights.items()
        )
        norm_product = candidate.norms[order] * reference.norms[order]
        if norm_product > 0:
            total += dot / norm_product
    return length_penalty * total / _CIDER_MAX_N


def cider_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """Per-example CIDEr-D (the coco-caption definition, document frequencies from this corpus).

    For each image: n-gram counts (n = 1..4) of the candidate and of each reference become TF-IDF vectors,
    with idf = log(#images) - log(max(1, #images whose references contain the n-gram)). Against each
    reference and for each n the score is the cosine similarity with candidate weights clipped at the
    reference's, multiplied by exp(-(len_candidate - len_reference)^2 / (2 · 6^2)); it is averaged over n and
    over the references and multiplied by 10. Note that with a single image every idf is 0, so every score is 0.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference sets")
    if not predictions:
        raise ValueError("CIDEr needs at least one image")
    for index, reference_set in enumerate(references):
        if isinstance(reference_set, str) or not reference_set:
            raise ValueError(f"image {index}: references must be a non-empty list of captions")

    candidate_tokens = [caption_tokens(prediction) for prediction in predictions]
    reference_tokens = [[caption_tokens(reference) for reference in reference_set] for reference_set in references]
    candidate_counts = [_ngram_counts(tokens) for tokens in candidate_tokens]
    reference_counts = [[_ngram_counts(tokens) for tokens in token_set] for token_set in reference_tokens]

    document_frequency = Counter()
    for counts_of_image in reference_counts:
        document_frequency.update(set().union(*counts_of_image))
    log_num_images = math.log(len(predictions))

    scores = []
    for tokens, counts, ref_tokens, ref_counts in zip(
        candidate_tokens, candidate_counts, reference_tokens, reference_counts
    ):
        candidate = _TfIdf(counts, document_frequency, log_num_images, len(tokens))
        similarities = [
            _cider_similarity(candidate, _TfIdf(rc, document_frequency, log_num_images, len(rt)))
            for rt, rc in zip(ref_tokens, ref_counts)
        ]
        scores.append(_CIDER_SCALE * sum(similarities) / len(similarities))
    return scores


def cider(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus CIDEr-D: the mean of `cider_scores`."""
    scores = cider_scores(predictions, references)
    return sum(scores) / len(scores)


# ------------------------------------------------------------------------------------------- multiple choice


def _option_letters(num_options: int) -> str:
    if not 1 <= num_options <= 26:
        raise ValueError(f"num_options must be in 1..26, got {num_options}")
    return string.ascii_uppercase[:num_options]


def extract_choice(prediction: str, num_options: int) -> str | None:
    """The option letter (uppercase) a free-form answer chooses, or None if it names none or several.

    Tried in order, only with letters of the first `num_options` options, uppercase in the answer except in 1:
      1. the whole answer is a letter, maybe wrapped: "B", "(B)", "B.", "[B]", "**B**", "b";
      2. an explicit statement, the last one wins: "The answer is B", "Answer: (C) blue", "answer is option D";
      3. a leading letter followed by a delimiter: "C) blue", "(C) blue", "C. blue", "C: blue";
      4. exactly one distinct letter standing alone in the text ("I pick B"), ignoring an "A" or "I" followed
         by a lowercase word, which reads as the article or the pronoun ("A dog sits" is no choice).
    """
    letters = _option_letters(num_options)
    letter = f"[{letters}]"
    text = prediction.replace("*", "").strip()

    whole = re.fullmatch(rf"[\s(\[{{]*({letter})[\s)\]}}.:,]*", text, flags=re.IGNORECASE)
    if whole:
        return whole[1].upper()

    explicit = re.findall(
        rf"(?i:answer)\s*(?:(?i:is)\s*)?[:=]?\s*(?:(?i:option|choice)\s*)?[(\[]?({letter})(?![A-Za-z0-9'])", text
    )
    if explicit:
        return explicit[-1]

    leading = re.match(rf"[(\[]?({letter})[)\].:,]", text)
    if leading:
        return leading[1]

    standalone = set()
    for match in re.finditer(rf"(?<![A-Za-z0-9'])({letter})(?![A-Za-z0-9'])", text):
        reads_as_word = match[1] in "AI" and re.match(r"\s+[a-z]", text[match.end() :])
        if not reads_as_word:
            standalone.add(match[1])
    if len(standalone) == 1:
        return standalone.pop()
    return None


def multiple_choice_accuracy(prediction: str, answer_letter: str, num_options: int) -> float:
    """1.0 when `extract_choice` finds the correct letter, else 0.0 (no letter found counts as wrong)."""
    correct = answer_letter.strip().upper()
    if len(correct) != 1 or correct not in _option_letters(num_options):
        raise ValueError(f"answer letter {answer_letter!r} is not one of the {num_options} options")
    return float(extract_choice(prediction, num_options) == correct)


# ------------------------------------------------------------------------------------------- aggregation


class MetricAccumulator:
    """Running sums of per-example scores and their counts, per metric name.

    `state()` is a flat dict of floats ({"vqav2/sum": 12.5, "vqav2/count": 20.0}); states from several
    processes combine by adding values key by key (`merge`, or a sum in any collective), and `means()` turns
    the combined sums into averages.
    """

    def __init__(self, state: Mapping[str, float] | None = None):
        self._sums: dict[str, float] = {}
        self._counts: dict[str, float] = {}
        if state is not None:
            self.merge(state)

    def add(self, name: str, score: float, count: float = 1.0) -> None:
        """Adds one example's score (or a batch's summed `score` over `count` examples)."""
        self._sums[name] = self._sums.get(name, 0.0) + float(score)
        self._counts[name] = self._counts.get(name, 0.0) + float(count)

    def merge(self, other: "MetricAccumulator | Mapping[str, float]") -> None:
        state = other.state() if isinstance(other, MetricAccumulator) else other
        for key, value in state.items():
            name, _, field = key.rpartition("/")
            if field == "sum":
                self._sums[name] = self._sums.get(name, 0.0) + float(value)
            elif field == "count":
                self._counts[name] = self._counts.get(name, 0.0) + float(value)
            else:
                raise ValueError(f"not an accumulator key: {key!r}")

    def state(self) -> dict[str, float]:
        state = {}
        for name in sorted(self._counts):
            state[f"{name}/sum"] = self._sums.get(name, 0.0)
            state[f"{name}/count"] = self._counts[name]
        return state

    def mean(self, name: str) -> float:
        count = self._counts.get(name, 0.0)
        if count == 0:
            raise KeyError(f"no examples recorded for {name!r}")
        return self._sums[name] / count

    def means(self) -> dict[str, float]:
        return {name: self.mean(name) for name in sorted(self._counts) if self._counts[name] > 0}

    @staticmethod
    def sum_states(states: Iterable[Mapping[str, float]]) -> dict[str, float]:
        total = MetricAccumulator()
        for state in states:
            total.merge(state)
        return total.state()
