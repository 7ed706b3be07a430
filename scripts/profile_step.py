"""Profile one stage's training step: ms per step, peak GPU memory, the top operations by time.

Usage: python scripts/profile_step.py PRESET STAGE [KEY=VALUE ...]   (KEY=VALUE as `train --set`)
"""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from procgenie.bench import prepare, training_setup
from procgenie.timing import sync as _sync
from procgenie.train import set_act_ckpt, train_step

preset, stage = sys.argv[1], sys.argv[2]
stages, dev = prepare(preset, sys.argv[3:])
t = stages[stage].train
model, opt, batch = training_setup(stage, stages, dev)
set_act_ckpt(model, t.act_ckpt)
for _ in range(2):
    train_step(model, model, opt, batch, t, dev)
_sync(dev)
t0 = time.perf_counter()
for _ in range(3):
    train_step(model, model, opt, batch, t, dev)
_sync(dev)
print(f"{preset} {stage} {sys.argv[3:]}: {1000 * (time.perf_counter() - t0) / 3:.1f} ms/step")
if dev.type == "cuda":
    print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
with profile(activities=acts) as prof:
    for _ in range(2):
        train_step(model, model, opt, batch, t, dev)
    _sync(dev)
for key in ["self_device_time_total", "self_cuda_time_total"] if dev.type == "cuda" else ["self_cpu_time_total"]:
    try:
        print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60))
        break
    except Exception as e:  # the sort key's name differs between torch versions
        print(f"sort by {key}: {e}")
