"""GhostVis 1.5B, stage 2 (align): Qwen2.5-1.5B-Instruct + SigLIP-L/16-256; resampler + projector train on
COCO captions (10%) + LAION-style pairs (90%), by answer tokens.

  python -m ghostvis_jax.train --config configs/ghostvis_1p5b_align.py \
      --config.init_checkpoint=/ckpt/ghostvis-1p5b-converted --config.workdir=/ckpt/ghostvis-1p5b-align \
      --config.data.datasets.laion_filtered.path=/data/laion_pairs
  # smoke / benchmark shapes without weights: --config.init=random --config.tokenizer=tiny
"""

from ghostvis_jax.train.config import base_config, dataset_slots


def get_config():
    c = base_config()
    c.stage = "align"
    c.init_checkpoint = ""
    c.model_preset.llm, c.model_preset.vision = "qwen2.5-1.5b", "siglip-large-patch16-256"
    c.workdir = ""
    c.num_steps = 20000
    c.optim.projector_lr, c.optim.resampler_lr = 5e-5, 3e-5   # roadmap stage 2
    c.optim.weight_decay, c.optim.b1, c.optim.b2 = 0.01, 0.9, 0.95
    c.optim.warmup_steps = 500
    c.data.recipe = "vision_pretrain"
    c.data.datasets = dataset_slots(c.data.recipe)  # --config.data.datasets.NAME.path=… / .image_root=…
    c.data.max_length = 2048
    # Caption rows are ~100-200 tokens with the 64 image slots: each step is cut to the shortest bucket that holds
    # its longest row instead of running 2048 positions (one compile per length used; docs/LOG.md).
    c.data.length_buckets = (256, 512, 1024)
    # 256 rows per step on any device count: 8 rows per GPU per micro-batch (37.9 GiB on an H100 at sft), the
    # rest by accumulation (4 micro-batches on one 8-GPU host, 1 on four). The run log prints the split.
    c.data.batch_size, c.rows_per_device, c.global_batch_size = 0, 8, 256
    # Captions are ~10% of a step's positions: the LM head runs only on the chunks (4096 of a GPU's 16,384 tokens)
    # that hold loss tokens (H100, 12% loss tokens: 201 ms per step, 207 with 8192, 217 with no skipping).
    c.loss_chunk_tokens = 4096
    # The frozen weights (decoder, tower) are 3.3-3.7 GB in bf16: a whole copy per GPU takes less memory
    # than their gather buffers and skips their all-gathers each step; trainable weights, gradients and optimizer
    # state stay sharded (ZeRO-3). 2 GPUs: 96.1-97.8% of one GPU's speed per GPU vs 93.6-95.3% (docs/LOG.md).
    c.mesh.shard_frozen = False
    c.checkpoint_every, c.eval_every, c.log_every = 1000, 1000, 10
    return c
