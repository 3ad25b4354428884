"""Throughput of the data pipeline on the synthetic set: examples/s with read threads and with worker processes.

    .venv/bin/python tools/bench_data.py --image-size 256 --batches 40

Not a test: prints one line per setting. Worker processes use spawn, hence the `__main__` guard and the
module-level transforms in ghostvis_jax.data.batching.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def run(setting: str, data_config: dict, tokenizer, model_config, batches: int, warmup: int) -> float:
    from ghostvis_jax.data import pipeline

    it = pipeline.make_train_iterator(data_config, tokenizer, model_config, seed=0, process_index=0, process_count=1)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - start
    rate = batches * data_config["batch_size"] / seconds
    print(f"{setting:34s} {rate:8.1f} examples/s  ({batches} batches of {data_config['batch_size']} in {seconds:.2f} s)",
          flush=True)
    return rate


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--augment", action="store_true")
    args = parser.parse_args()

    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags
    import transformers

    from ghostvis_jax.config import GhostVisConfig, SiglipConfig
    from ghostvis_jax.testing.tiny_tokenizer import build_tiny_tokenizer

    tokenizer = transformers.AutoTokenizer.from_pretrained(build_tiny_tokenizer(tempfile.mkdtemp()))
    model_config = GhostVisConfig(vision=SiglipConfig(image_size=args.image_size),
                                  image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"))
    base = {"recipe": "synthetic_sft", "batch_size": args.batch_size, "max_length": 160, "augment": args.augment,
            "prefetch_buffer_size": 32, "token_estimate_samples": 64, "synthetic": {"num_examples": 100_000}}
    print(f"synthetic_sft at {args.image_size} px, 64 image tokens, max_length 160, augment={args.augment}, "
          f"{os.cpu_count()} CPUs")
    for n in args.threads:
        run(f"threads={n} workers=0", dict(base, num_threads=n, worker_count=0), tokenizer, model_config,
            args.batches, args.warmup)
    for n in args.workers:
        run(f"threads=1 workers={n}", dict(base, num_threads=1, worker_count=n, worker_buffer_size=4), tokenizer,
            model_config, args.batches, args.warmup + 4)


if __name__ == "__main__":
    main()
