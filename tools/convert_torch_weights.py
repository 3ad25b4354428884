#!/usr/bin/env python
"""Convert PyTorch / HF weights into a GhostVis JAX checkpoint.

    python tools/convert_torch_weights.py --llm QWEN_DIR --vision SIGLIP_DIR [--adapters ADAPTERS] \
        --out OUT_DIR [--dtype bfloat16|float32] [--resampler perceiver|avgpool]

QWEN_DIR: HF Qwen2 folder (config.json + safetensors, sharded or not, or pytorch_model.bin); its tokenizer
files are copied beside the checkpoint. SIGLIP_DIR: HF SigLIP folder (full SiglipModel or SiglipVisionModel).
ADAPTERS: resampler + projector in the original GhostVis key layout (.pt or .safetensors); without it they are
initialized with --seed.
"""

import argparse
import logging
import sys

from ghostvis_jax.config import ProjectorConfig, ResamplerConfig
from ghostvis_jax.weights.convert import ConversionError, convert
from ghostvis_jax.weights.readers import WeightFileError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm", required=True, help="HF Qwen2 / Qwen2.5 model folder")
    ap.add_argument("--vision", required=True, help="HF SigLIP model folder")
    ap.add_argument("--adapters", help="original GhostVis resampler + projector state dict (.pt / .safetensors)")
    ap.add_argument("--out", required=True, help="output checkpoint folder")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--resampler", default="perceiver", choices=["perceiver", "avgpool"])
    ap.add_argument("--num-image-tokens", type=int, default=64)
    ap.add_argument("--projector-hidden", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0, help="seed of freshly initialized adapters")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        report = convert(args.llm, args.vision, args.out, adapters=args.adapters, dtype=args.dtype,
                         resampler=ResamplerConfig(mode=args.resampler, num_latents=args.num_image_tokens),
                         projector=ProjectorConfig(hidden_size=args.projector_hidden), seed=args.seed)
    except (ConversionError, WeightFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for k in report.ignored_keys:
        print(f"ignored (not part of GhostVis): {k}")
    if report.adapters_initialized:
        print(f"resampler + projector freshly initialized (seed {args.seed})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
