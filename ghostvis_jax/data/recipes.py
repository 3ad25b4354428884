"""Data recipes: dataset name -> {"weight": share of ANSWER TOKENS, "split": split name}.

Weights are shares of supervised (answer) tokens, not rows; `mixing.py` turns them into sampling
probabilities. The real-data recipes are the roadmap's §4.2; the synthetic ones drive the offline demo.
Plain dicts, so they drop into an ml_collections ConfigDict as `data.datasets`.
"""

from __future__ import annotations

import copy


def _recipe(**weights: float) -> dict[str, dict]:
    return {name.replace("__", "-"): {"weight": w, "split": "train"} for name, w in weights.items()}


RECIPES: dict[str, dict[str, dict]] = {
    # Stage 2: vision-language alignment.
    "vision_pretrain": _recipe(coco_captions=0.1, laion_filtered=0.9),
    # Stage 3: instruction tuning (full).
    "vision_sft": _recipe(llava_instruct_150k=0.45, a__okvqa=0.05, vqav2=0.15, okvqa=0.05, textvqa=0.10,
                          stvqa=0.02, docvqa=0.03, chartqa=0.10, smoltalk=0.05),
    "vision_sft_minimal": _recipe(llava_instruct_150k=0.50, vqav2=0.20, textvqa=0.12, chartqa=0.10, smoltalk=0.08),
    "vision_sft_premium": _recipe(sharegpt4v=0.30, llava_instruct_150k=0.20, vqav2=0.20, textvqa=0.12,
                                  chartqa=0.10, smoltalk=0.08),
    # Offline demo / tests (ghostvis_jax.data.synthetic).
    "synthetic_pretrain": _recipe(synthetic_shapes_caption=1.0),
    "synthetic_sft": _recipe(synthetic_shapes_vqa=0.4, synthetic_words_ocr=0.2, synthetic_bar_chart=0.2,
                             synthetic_shapes_caption=0.2),
    # The `make demo` SFT mix: mostly the short-answer shapes questions the demo's accuracy claim is about.
    "synthetic_sft_demo": _recipe(synthetic_shapes_vqa=0.7, synthetic_words_ocr=0.1, synthetic_bar_chart=0.1,
                                  synthetic_shapes_caption=0.1),
}


def get_recipe(name: str) -> dict[str, dict]:
    """A fresh copy of a named recipe."""
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
    return copy.deepcopy(RECIPES[name])


def normalized_weights(recipe: dict[str, dict]) -> dict[str, float]:
    """Weights rescaled to sum to 1 (the §4.2 full recipe sums to exactly 1.0 already)."""
    total = sum(float(spec["weight"]) for spec in recipe.values())
    if total <= 0:
        raise ValueError(f"recipe weights must sum to a positive number, got {total}")
    for name, spec in recipe.items():
        if float(spec["weight"]) < 0:
            raise ValueError(f"recipe weight of {name!r} is negative: {spec['weight']}")
    return {name: float(spec["weight"]) / total for name, spec in recipe.items()}
