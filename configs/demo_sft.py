"""Offline demo, stage 3 (SFT): from the align stage's model, short-answer VQA / OCR / chart questions, on a CPU.

  python -m ghostvis_jax.train --config configs/demo_sft.py \
      --config.init_checkpoint=runs/demo/align/model --config.workdir=runs/demo/sft
"""

from ghostvis_jax.train.config import base_config


def get_config():
    c = base_config()
    c.stage = "sft"
    c.init_checkpoint = "runs/demo/align/model"
    c.workdir = "runs/demo/sft"
    c.num_trainable_layers = 2
    c.compute_dtype = c.frozen_param_dtype = "float32"
    c.num_steps = 300
    c.log_every, c.eval_every, c.eval_batches, c.checkpoint_every = 10, 100, 4, 100
    c.optim.warmup_steps = 20
    c.optim.projector_lr, c.optim.resampler_lr, c.optim.llm_lr = 2e-3, 2e-3, 1e-3
    c.data.recipe = "synthetic_sft"
    c.data.batch_size, c.data.max_length, c.data.num_threads = 16, 96, 2
    c.data.synthetic.num_examples, c.data.synthetic.eval_examples = 20000, 200
    c.data.eval.max_examples_per_dataset = 64
    return c
