"""GhostVis 1.5B, stage 3 (SFT): from the align stage's model; the last 4 decoder layers + resampler + projector
train on the token-balanced vision_sft_minimal mix (LLaVA-Instruct, VQAv2, TextVQA, ChartQA, SmolTalk).

  python -m ghostvis_jax.train --config configs/ghostvis_1p5b_sft.py \
      --config.init_checkpoint=/ckpt/ghostvis-1p5b-align/model --config.workdir=/ckpt/ghostvis-1p5b-sft \
      --config.data.datasets.llava_instruct_150k.image_root=/data/coco/train2017
  # smoke / benchmark shapes without weights: --config.init=random --config.tokenizer=tiny
"""

from ghostvis_jax.train.config import base_config, dataset_slots


def get_config():
    c = base_config()
    c.stage = "sft"
    c.num_trainable_layers = 4
    c.init_checkpoint = ""
    c.model_preset.llm, c.model_preset.vision = "qwen2.5-1.5b", "siglip-large-patch16-256"
    c.workdir = ""
    c.num_steps = 15000                                       # ~3 epochs of the minimal mix at 256 rows/step
    c.optim.llm_lr, c.optim.projector_lr, c.optim.resampler_lr = 1e-6, 3e-5, 3e-5   # roadmap stage 3
    c.optim.weight_decay, c.optim.b1, c.optim.b2 = 0.01, 0.9, 0.95
    c.optim.warmup_steps = 300
    c.data.recipe = "vision_sft_minimal"
    c.data.datasets = dataset_slots(c.data.recipe)  # --config.data.datasets.NAME.path=… / .image_root=…
    c.data.max_length = 2048
    # Each step is cut to the shortest bucket that holds the longest of its 256 rows (one compile per length used;
    # the same losses as at 2048). This mix draws many short VQA rows and a few long conversations, so most steps
    # still hold one long row. --config.data.length_group_steps=4 regroups rows by length within windows of 4
    # steps, so steps of short rows only become common; but then a step's rows are no longer a sample of the
    # token-balanced mix (short-answer sets fill whole steps, as with LLaVA-1.5's group_by_modality_length), so it
    # is off here. Its window and the next one read ahead wait in host memory (~1.6 GB per 8-GPU host at 256 px).
    c.data.length_buckets = (256, 512, 1024)
    c.data.length_group_steps = 0
    # 256 rows per step on any device count: 8 rows per GPU per micro-batch (37.9 GiB on an H100 at sft), the
    # rest by accumulation (4 micro-batches on one 8-GPU host, 1 on four). The run log prints the split.
    c.data.batch_size, c.rows_per_device, c.global_batch_size = 0, 8, 256
    # The frozen weights (decoder, tower) are 3.3-3.7 GB in bf16: a whole copy per GPU takes less memory
    # than their gather buffers and skips their all-gathers each step; trainable weights, gradients and optimizer
    # state stay sharded (ZeRO-3). 2 GPUs: 96.1-97.8% of one GPU's speed per GPU vs 93.6-95.3% (docs/LOG.md).
    c.mesh.shard_frozen = False
    c.checkpoint_every, c.eval_every, c.log_every = 1000, 1000, 10
    return c
