"""Offline demo, stage 2 (align): the tiny converted model learns to describe synthetic shapes, on a CPU.

  python -m ghostvis_jax.train --config configs/demo_align.py \
      --config.init_checkpoint=runs/demo/converted --config.workdir=runs/demo/align

(`make demo` → tools/demo.py builds runs/demo/converted with tools/make_tiny_models.py --patch-size 8 +
tools/convert_torch_weights.py --resampler avgpool --num-image-tokens 64: all 8×8 patch tokens reach the decoder.)
"""

from ghostvis_jax.train.config import base_config


def get_config():
    c = base_config()
    c.stage = "align"
    c.init_checkpoint = "runs/demo/converted"
    c.workdir = "runs/demo/align"
    c.mesh.fsdp = -1
    c.compute_dtype = c.frozen_param_dtype = "float32"  # CPUs have no fast bf16
    c.num_steps = 100
    c.log_every, c.eval_every, c.eval_batches, c.checkpoint_every = 10, 50, 4, 50
    c.optim.warmup_steps = 10
    c.optim.projector_lr, c.optim.resampler_lr = 2e-3, 2e-3
    c.data.recipe = "synthetic_pretrain"
    c.data.batch_size, c.data.max_length, c.data.num_threads = 16, 128, 2  # 64 image slots + text
    c.data.synthetic.num_examples, c.data.synthetic.eval_examples = 20000, 200
    c.data.eval.max_examples_per_dataset = 64
    return c
