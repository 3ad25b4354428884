"""Answer normalization of the official VQA evaluation (VQAv2 / TextVQA).

The steps, in the official order:
  1. newlines and tabs become spaces; surrounding whitespace is stripped;
  2. punctuation: each mark of `_PUNCTUATION` is deleted when it touches a space anywhere in the text, or when
     the text contains a comma between two digits anywhere ("1,000"); otherwise it becomes a space
     ("black-and-white" -> "black and white"). A period is deleted unless a digit follows it, so "3.5" keeps
     its decimal point while "yes." loses its period;
  3. lowercase, split on whitespace, number words "none"/"zero".."ten" become digits, the articles a/an/the
     are dropped, and apostrophe-less contractions get their apostrophe back ("dont" -> "don't").

Marks not in the official list (apostrophe, colon, "$", "%", "&", "#", "*", ...) are kept as they are.
"""

import re

# The official list; the apostrophe is deliberately absent so that contractions survive.
_PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip

_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
# The official pattern intends "a period that is not part of a number", but as written it only looks ahead,
# so in effect a period is removed unless a digit follows. We match that effective behaviour ("5." -> "5").
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")

_NUMBER_WORDS = {
    "none": "0",  # the official map sends "none" to 0 as well
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

_ARTICLES = frozenset({"a", "an", "the"})

# Contractions written without their apostrophe, mapped to the form the official map restores. Words that are
# also ordinary English words ("its", "well", "were", "id", "ill", "shed", "wed") are absent from the official
# map and therefore here. The official map's capitalised keys ("Im", "Ive") can never match lowercased text,
# so "im" and "ive" are left alone here too.
_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldnt've": "couldn't've",
    "couldn'tve": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "shes": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}


def _process_punctuation(text: str) -> str:
    # The delete-or-space decision for every mark looks at the text as it was before any mark was handled.
    delete_marks = _COMMA_BETWEEN_DIGITS.search(text) is not None
    result = text
    for mark in _PUNCTUATION:
        touches_space = (mark + " ") in text or (" " + mark) in text
        result = result.replace(mark, "" if (delete_marks or touches_space) else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", result)


def _process_words(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_vqa_answer(answer: str) -> str:
    """The official VQA normalization of an answer (see the module docstring); may return ""."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _process_words(_process_punctuation(text))
