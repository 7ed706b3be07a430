"""Time one stage's training step as `procgenie bench` does, without the other stages and play.

Usage: python scripts/time_stage.py PRESET STAGE [KEY=VALUE ...]   (KEY=VALUE as `train --set`)

Prints one JSON line: the step (bench.time_training) and matmul_peak_share against a bf16 or fp32
matmul peak measured in the same process. On a GPU, compiling makes `bench --set compile=true` compile
all three stages; this compiles one, e.g. the H200 figures of docs/benchmarks.md:
    python scripts/time_stage.py genie dynamics compile=true dynamics.act_ckpt=false
"""

import json
import sys

import torch

from procgenie.bench import prepare, time_training
from procgenie.timing import matmul_flops_per_s

preset, stage = sys.argv[1], sys.argv[2]
stages, dev = prepare(preset, sys.argv[3:])
bf16 = stages[stage].train.precision == "bf16"  # prepare() resolved "auto"
peak, n = matmul_flops_per_s(dev, torch.bfloat16 if bf16 else torch.float32, 3)
if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
r = time_training(stage, stages, dev, 4)
r.update(
    preset=preset,
    stage=stage,
    overrides=sys.argv[3:],
    matmul_flops_per_s=peak,
    matmul_size=n,
    matmul_peak_share=r["flops_per_s"] / peak,
    peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
)
print(json.dumps(r))
