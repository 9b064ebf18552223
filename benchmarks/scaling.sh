#!/usr/bin/env bash
# The README's 2-GPU scaling table in one go: tokens/s of the 12-layer d = 768 benchmark (bench_distributed.py) on
# 1 and 2 GPUs, per mode and learner batch. Usage: bash benchmarks/scaling.sh [iters]  (needs 2 GPUs and
# TransformerLens; prints one line per run: mode, GPUs, learner batch, then the benchmark's own summary lines).
set -u
iters=${1:-10}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name --format=csv,noheader
nvidia-smi topo -m | head -4
for b in 4096 16384; do
  for run in "none 1" "data 1" "data 2" "hooks 2"; do
    set -- $run
    echo "=== mode $1, $2 GPU(s), learner batch $b"
    python -m torch.distributed.run --nproc_per_node="$2" benchmarks/bench_distributed.py --mode "$1" \
      --iters "$iters" --batch-size "$b" 2>&1 | grep -v -i "warn" | tail -6
  done
done
