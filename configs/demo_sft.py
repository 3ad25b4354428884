"""Offline demo, stage 3 (SFT): from the align stage's model, short-answer VQA / OCR / chart questions, on a CPU.

Tuned for `make demo` (docs/LOG.md): 900 steps of a mix that is 70% (of answer tokens) the shapes questions
(recipe synthetic_sft_demo), every decoder layer of the 4-layer tiny model trainable, 128-token rows (64 image
slots). On the 2-core CPU this reaches >= 90% held-out shapes-VQA accuracy; OCR and bar charts stay near chance.

  python -m ghostvis_jax.train --config configs/demo_sft.py \
      --config.init_checkpoint=runs/demo/align/model --config.workdir=runs/demo/sft
"""

from ghostvis_jax.train.config import base_config


def get_config():
    c = base_config()
    c.stage = "sft"
    c.init_checkpoint = "runs/demo/align/model"
    c.workdir = "runs/demo/sft"
    c.num_trainable_layers = 4
    c.compute_dtype = c.frozen_param_dtype = "float32"
    c.num_steps = 900
    c.log_every, c.eval_every, c.eval_batches, c.checkpoint_every = 10, 300, 4, 300
    c.optim.warmup_steps = 20
    c.optim.projector_lr, c.optim.resampler_lr, c.optim.llm_lr = 2e-3, 2e-3, 1e-3
    c.data.recipe = "synthetic_sft_demo"
    c.data.batch_size, c.data.max_length, c.data.num_threads = 16, 128, 2  # 64 image slots + text
    c.data.synthetic.num_examples, c.data.synthetic.eval_examples = 20000, 200
    c.data.eval.max_examples_per_dataset = 64
    return c
