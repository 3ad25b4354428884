#!/usr/bin/env bash
# One host, every local GPU, one process: FSDP over all of them (the mesh comes from the config).
#   launch/single_host.sh configs/ghostvis_1p5b_sft.py --config.init_checkpoint=... --config.workdir=...
set -euo pipefail
config=${1:?usage: launch/single_host.sh CONFIG [--config.key=value ...]}
shift
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}                 # keep NVLink multicast off on shared hosts
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/ghostvis_jax/xla}  # reruns skip compiling
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
exec python -m ghostvis_jax.train --config "$config" "$@"
