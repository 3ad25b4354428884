#!/usr/bin/env python
"""Export a GhostVis JAX checkpoint back to HF / PyTorch files.

    python tools/export_hf.py --checkpoint CKPT --out DIR [--dtype float32|bfloat16] [--force]

DIR/llm/: HF Qwen2ForCausalLM folder (config.json, model.safetensors, the checkpoint's tokenizer files).
DIR/vision/: HF SiglipVisionModel folder (config.json, preprocessor_config.json, model.safetensors).
DIR/adapters.safetensors and DIR/adapters.pt: resampler + projector in the original GhostVis key layout.
--dtype defaults to the dtype the checkpoint stores. tools/convert_torch_weights.py reads these files back.
"""

import argparse
import logging
import sys

from ghostvis_jax.weights.export import ExportError, convert_back_command, export


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="GhostVis checkpoint folder (converted or trained)")
    ap.add_argument("--out", required=True, help="output folder (must be empty unless --force)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: the checkpoint's stored dtype")
    ap.add_argument("--force", action="store_true", help="overwrite an earlier export in --out")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        report = export(args.checkpoint, args.out, dtype=args.dtype, force=args.force)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {report.llm_dir} (Qwen2ForCausalLM), {report.vision_dir} (SiglipVisionModel)"
          + "".join(f", {f}" for f in report.adapter_files) + f" in {report.dtype}")
    print(f"to convert back: {convert_back_command(report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
