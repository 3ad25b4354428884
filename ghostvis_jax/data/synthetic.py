"""Offline synthetic vision-language data drawn with PIL, deterministic from (seed, split, task, index).

Tasks (each a random-access source of conversations in the common format):
  shapes_caption  stage-2 captions: count, color, shape and (for one shape) position
  shapes_vqa      one-word answers: color / shape / count of the shapes in the picture
  words_ocr       a rendered word; "What word is written in the image?"
  bar_chart       3-4 labelled bars on a grid; "What is the value of bar B?" (a digit)

Every scene uses one color and one shape kind, drawn big on a white background, so a tiny model can learn
the question types. Splits use different random streams ("train" vs "heldout"), and ids carry the split.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
COUNTS = (1, 2, 3, 4)
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
OCR_WORDS = ("cat", "dog", "sun", "tree", "book", "fish", "bird", "moon", "star", "car",
             "ship", "lamp", "door", "cake", "milk", "rain", "snow", "king", "ball", "frog")
BAR_LABELS = ("A", "B", "C", "D")
BAR_MAX_VALUE = 9

TASKS = ("shapes_caption", "shapes_vqa", "words_ocr", "bar_chart")
SPLITS = ("train", "heldout")

SHORT_ANSWER_INSTRUCTION = "Answer with a single word or number."
CAPTION_PROMPTS = ("Describe the image.", "What is in the picture?", "Write a short caption.")
VQA_QUESTIONS = {
    "color": "What color are the shapes?",
    "shape": "What shape are they?",
    "count": "How many shapes are there?",
}
OCR_QUESTION = "What word is written in the image?"

VOCABULARY_WORDS = (
    tuple(COLORS) + SHAPES + tuple(s + "s" for s in SHAPES) + tuple(COUNT_WORDS.values())
    + ("top", "bottom", "left", "right", "center", "in", "the", "a", "an", "of", "bar", "value", "chart",
       "word", "written", "image", "picture", "shapes", "shape", "color", "many", "are", "there", "is",
       "what", "how", "they", "on", "white") + OCR_WORDS + BAR_LABELS
)


def template_sentences() -> list[str]:
    """Every sentence template the generator uses (the tiny tokenizer is trained on these)."""
    out = list(CAPTION_PROMPTS) + list(VQA_QUESTIONS.values()) + [OCR_QUESTION, SHORT_ANSWER_INSTRUCTION]
    for label in BAR_LABELS:
        out.append(f"What is the value of bar {label}?")
    for color in COLORS:
        for shape in SHAPES:
            for n in COUNTS:
                out.append(_caption(n, color, shape, "top left"))
    return out


def _caption(count: int, color: str, shape: str, position: str) -> str:
    if count == 1:
        return f"A {color} {shape} in the {position}."
    return f"{COUNT_WORDS[count].capitalize()} {color} {shape}s on a white background."


def _rng(seed: int, split: str, task: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), TASKS.index(task), index])


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill):
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def draw_shapes(rng: np.random.Generator, image_size: int):
    """A scene of 1-4 same-color same-kind shapes; returns (image, count, color, shape, position)."""
    count = int(rng.choice(COUNTS))
    color = str(rng.choice(list(COLORS)))
    shape = str(rng.choice(SHAPES))
    img = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    half = image_size / 2
    cells = {"top left": (0, 0), "top right": (half, 0), "bottom left": (0, half), "bottom right": (half, half),
             "center": (half / 2, half / 2)}
    if count == 1:
        position = str(rng.choice(POSITIONS))
        chosen = [cells[position]]
    else:
        position = ""
        quads = list(POSITIONS[:4])
        chosen = [cells[quads[i]] for i in sorted(rng.choice(4, size=count, replace=False))]
    for x, y in chosen:
        margin = half * float(rng.uniform(0.08, 0.18))
        _draw_shape(draw, shape, (x + margin, y + margin, x + half - margin, y + half - margin), COLORS[color])
    return img, count, color, shape, position


def draw_word(rng: np.random.Generator, image_size: int):
    word = str(rng.choice(OCR_WORDS))
    img = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(8, int(image_size * float(rng.uniform(0.22, 0.3)))))
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    w, h = right - left, bottom - top
    x = float(rng.uniform(0, max(1.0, image_size - w))) - left
    y = float(rng.uniform(0, max(1.0, image_size - h))) - top
    draw.text((x, y), word, fill=(0, 0, 0), font=font)
    return img, word


def draw_bar_chart(rng: np.random.Generator, image_size: int):
    """Bars on a grid with one line per unit, labels under the bars; returns (image, {label: value})."""
    n = int(rng.integers(3, len(BAR_LABELS) + 1))
    values = {BAR_LABELS[i]: int(v) for i, v in enumerate(rng.integers(1, BAR_MAX_VALUE + 1, size=n))}
    img = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    bottom, top = image_size * 0.85, image_size * 0.05
    unit = (bottom - top) / BAR_MAX_VALUE
    for v in range(BAR_MAX_VALUE + 1):
        y = bottom - v * unit
        draw.line([(0, y), (image_size, y)], fill=(200, 200, 200), width=1)
    slot = image_size / n
    font = ImageFont.load_default(size=max(6, int(image_size * 0.12)))
    color = COLORS[str(rng.choice(list(COLORS)))]
    for i, (label, v) in enumerate(values.items()):
        x0, x1 = i * slot + slot * 0.2, (i + 1) * slot - slot * 0.2
        draw.rectangle((x0, bottom - v * unit, x1, bottom), fill=color)
        draw.text(((x0 + x1) / 2, bottom + 1), label, fill=(0, 0, 0), font=font, anchor="mt")
    return img, values


def _vqa(image, question: str, answer: str, task: str, example_id: str) -> dict:
    return {
        "images": [image],
        "messages": [
            {"role": "user", "content": f"<image>\n{question}\n{SHORT_ANSWER_INSTRUCTION}"},
            {"role": "assistant", "content": answer},
        ],
        "question": question,
        "answers": [answer],
        "task": task,
        "id": example_id,
    }


def make_example(task: str, index: int, *, seed: int = 0, split: str = "train", image_size: int = 64) -> dict:
    """The `index`-th conversation of a synthetic task (pure function of its arguments)."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; known: {TASKS}")
    if split not in SPLITS:
        raise ValueError(f"unknown synthetic split {split!r}; known: {SPLITS}")
    rng = _rng(seed, split, task, index)
    example_id = f"synthetic/{task}/{split}/{seed}/{index}"
    if task in ("shapes_caption", "shapes_vqa"):
        img, count, color, shape, position = draw_shapes(rng, image_size)
        if task == "shapes_caption":
            prompt = str(rng.choice(CAPTION_PROMPTS))
            caption = _caption(count, color, shape, position)
            return {"images": [img], "task": task, "id": example_id, "answers": [caption],
                    "messages": [{"role": "user", "content": f"<image>\n{prompt}"},
                                 {"role": "assistant", "content": caption}]}
        kind = str(rng.choice(list(VQA_QUESTIONS)))
        answer = {"color": color, "shape": shape, "count": str(count)}[kind]
        return _vqa(img, VQA_QUESTIONS[kind], answer, task, example_id)
    if task == "words_ocr":
        img, word = draw_word(rng, image_size)
        return _vqa(img, OCR_QUESTION, word, task, example_id)
    img, values = draw_bar_chart(rng, image_size)
    label = str(rng.choice(list(values)))
    return _vqa(img, f"What is the value of bar {label}?", str(values[label]), task, example_id)


class SyntheticSource:
    """A grain-compatible random-access source (`__len__`, `__getitem__`) of one synthetic task."""

    def __init__(self, task: str, *, split: str = "train", num_examples: int = 10_000, seed: int = 0,
                 image_size: int = 64):
        if task not in TASKS:
            raise ValueError(f"unknown synthetic task {task!r}; known: {TASKS}")
        self.task, self.split, self.num_examples = task, split, int(num_examples)
        self.seed, self.image_size = int(seed), int(image_size)
        self.name = f"synthetic_{task}"

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        conv = make_example(self.task, int(index) % self.num_examples, seed=self.seed, split=self.split,
                            image_size=self.image_size)
        conv["dataset"] = self.name
        return conv

    def __repr__(self) -> str:
        return (f"SyntheticSource({self.task!r}, split={self.split!r}, num_examples={self.num_examples}, "
                f"seed={self.seed}, image_size={self.image_size})")
