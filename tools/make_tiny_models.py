#!/usr/bin/env python
"""Write a tiny random HF Qwen2 folder (with a tiny Qwen-style tokenizer) and a tiny HF SigLIP folder: the
offline demo's starting point, in exactly the formats tools/convert_torch_weights.py takes for the real models.

  python tools/make_tiny_models.py --out runs/demo/hf     # → runs/demo/hf/qwen, runs/demo/hf/siglip
"""

import argparse
import os

from ghostvis_jax.testing.tiny_models import build_qwen, build_siglip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--llm-hidden", type=int, default=128)
    ap.add_argument("--llm-layers", type=int, default=4)
    ap.add_argument("--vision-hidden", type=int, default=128)
    ap.add_argument("--vision-layers", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--patch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    build_qwen(os.path.join(args.out, "qwen"), hidden_size=args.llm_hidden, num_layers=args.llm_layers,
               seed=args.seed)
    build_siglip(os.path.join(args.out, "siglip"), hidden_size=args.vision_hidden, num_layers=args.vision_layers,
                 image_size=args.image_size, patch_size=args.patch_size, seed=args.seed + 1)
    print(f"wrote {args.out}/qwen and {args.out}/siglip")


if __name__ == "__main__":
    main()
