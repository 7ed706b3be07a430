#!/bin/bash
# The GPU checks behind docs/benchmarks.md's GPU section: a tiny end-to-end run on the GPU, a one-rank
# NCCL run, `bench --preset genie`, a profile of the dynamics step with and without activation
# checkpointing, and the compiled steps (scripts/time_stage.py). Run from the repository root on a GPU machine:
#   scripts/gpu_checks.sh DATA OUT      (DATA: any dataset from `procgenie collect`; results go to OUT)
set -u
DATA=${1:?usage: scripts/gpu_checks.sh DATA OUT}
OUT=${2:?usage: scripts/gpu_checks.sh DATA OUT}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
P="python3 -m procgenie"
R=$(mktemp -d)
s() { echo; echo "=== $(date +%T) $*"; }
{
s env; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name())"
s tiny train all on the GPU
timeout 120 $P train all --data "$DATA" --run "$R/tiny" --preset tiny 2>&1 | grep -v "it/s\]" | tail -12
s eval of it
timeout 90 $P eval --checkpoint "$R/tiny" --data "$DATA" --out "$R/eval" --episodes 1 --horizon 4 2>&1 | tail -2
s torchrun, 1 rank, NCCL
timeout 90 torchrun --nproc-per-node 1 -m procgenie -- train lam --data "$DATA" --run "$R/ddp" --preset tiny 2>&1 | tail -2
s bench genie
timeout 170 $P bench --preset genie --seconds 4 --json "$OUT/bench_genie.json" 2>&1
s profile genie dynamics, act_ckpt on
timeout 70 python3 scripts/profile_step.py genie dynamics 2>&1 | head -45
s dynamics without act_ckpt
timeout 60 python3 scripts/profile_step.py genie dynamics dynamics.act_ckpt=false 2>&1 | head -3
s compiled: dynamics without act_ckpt, then tokenizer and LAM as their preset
timeout 240 python3 scripts/time_stage.py genie dynamics compile=true dynamics.act_ckpt=false 2>&1 | grep -v "W[0-9]"
for stage in tokenizer lam; do
    timeout 200 python3 scripts/time_stage.py genie $stage compile=true 2>&1 | grep -v "W[0-9]"
done
s done
} 2>&1 | tee "$OUT/log.txt"
