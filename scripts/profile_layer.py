#!/usr/bin/env python
"""Where one decoder layer's GPTQ time goes: each true-sequential stage's forward + Hessian, solves, propagation.

    python scripts/profile_layer.py demo/SmolLM2-135M-Instruct [SAMPLES] [--no-replay] [--no-spill] [--ops] [--bf16]
                                    [--ieee]

Layer 0 of MODEL_DIR, SAMPLES x 512 calibration tokens (default 128), float32 (or --bf16) on the CPU, the same functions
the pipeline calls, with its capture.BlockMemo: the attention folded into the stored inputs where the layer
allows, o_proj's and down_proj's kept inputs in a scratch file, blocks derived from them checked once. --no-replay disables the memo, --no-spill
keeps o_proj's inputs in memory and down_proj's not at all (the pipeline on a GPU), for before/after
comparisons. --bf16 runs the forwards in bfloat16 (a bfloat16 model on a CPU with native bfloat16 matmuls,
`--compute-dtype auto` there). --ieee keeps float32 matmuls on torch's default BLAS (the pipeline sends them
through oneDNN where precision.onednn_float32_matmuls_are_accurate). --ops also prints the torch operators that took the most time (torch.profiler).
"""
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from quantkit.calibrate.capture import (
    BlockMemo,
    collect_hessians,
    derivable_blocks,
    discover_groups,
    foldable_blocks,
    propagate,
    run_layer,
)
from quantkit.calibrate.precision import fast_float32_matmuls
from quantkit.config import CalibSpec, QuantSpec
from quantkit.memory.heap import release_large_frees_at_once
from quantkit.run.pipeline import layer_zero_inputs
from quantkit.solve.gptq import gptq_quantize_shared
from quantkit.source.calibration import calibration_batch
from quantkit.source.checkpoint import SafetensorsCheckpoint, read_config_dict
from quantkit.source.skeleton import (
    build_skeleton,
    decoder_layers,
    linear_modules,
    load_config,
    materialize,
)

args = [a for a in sys.argv[1:] if not a.startswith("-")]
if not args or {"-h", "--help"} & set(sys.argv):  # before any setting is entered: exit cleanly
    sys.exit(__doc__)
release_large_frees_at_once()  # as quantize() does
matmul_settings = contextlib.ExitStack()  # held for the whole run: a dropped context would restore the setting
if "--ieee" not in sys.argv:
    matmul_settings.enter_context(fast_float32_matmuls(torch.device("cpu")))  # as quantize() does
model_dir, samples = Path(args[0]), int(args[1]) if len(args) > 1 else 128
config = load_config(model_dir, read_config_dict(model_dir))
checkpoint = SafetensorsCheckpoint(model_dir)
skeleton = build_skeleton(config)
prefix, layers = decoder_layers(skeleton, config.num_hidden_layers)
ids = calibration_batch(AutoTokenizer.from_pretrained(str(model_dir)), CalibSpec(samples=samples, seq_len=512))
cpu = torch.device("cpu")
dtype = torch.bfloat16 if "--bf16" in sys.argv else torch.float32  # the compute dtype
batches, calls = layer_zero_inputs(skeleton, layers, prefix, checkpoint, ids, cpu, dtype, dtype)
layer = layers[0]
materialize(layer, f"{prefix}.0", checkpoint, cpu, dtype)
groups = discover_groups(layer, batches[0][:1], calls[0])
modules = linear_modules(layer)
replay = "--no-replay" not in sys.argv
scratch = tempfile.TemporaryDirectory(dir=".") if "--no-spill" not in sys.argv else None  # on disk, as the work dir
memo = BlockMemo(layer, enabled=replay, groups=groups, hidden_size=batches[0].shape[-1],
                 fold=foldable_blocks(layer, groups, batches[0][:1], calls[0], cpu, dtype) if replay else set(),
                 spill_dir=Path(scratch.name) if scratch else None,
                 derivable=derivable_blocks(layer, groups, batches[0][:1], calls[0], cpu, dtype) if replay else None)
profiler = None
if "--ops" in sys.argv:
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    profiler.__enter__()
done, total = set(), 0.0
for group in groups:
    t = time.perf_counter()
    (H,) = collect_hessians(layer, [group], batches, calls[0], cpu, dtype, memo, done)
    t_fwd = time.perf_counter() - t
    t = time.perf_counter()
    solved = gptq_quantize_shared([modules[n].weight.data for n in group], H, QuantSpec(group_size=64))
    for name, res in zip(group, solved):
        modules[name].weight.data.copy_(res.weight)
        done.add(name)
    t_solve = time.perf_counter() - t
    total += t_fwd + t_solve
    print(f"stage {'/'.join(n.split('.')[-1] for n in group):24s} forward + Hessian {t_fwd:6.2f} s   solve {t_solve:5.2f} s")
t = time.perf_counter()
propagate(layer, batches, calls[0], cpu, dtype, memo)
total += time.perf_counter() - t
print(f"propagate {time.perf_counter() - t:6.2f} s      layer total {total:6.2f} s")
memo.close()
if profiler is not None:
    profiler.__exit__(None, None, None)
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
t = time.perf_counter()
for b in batches:
    run_layer(layer, b, calls[0])
print(f"(a plain forward of the layer: {time.perf_counter() - t:.2f} s)")
matmul_settings.close()  # before interpreter shutdown, while torch.backends still exists
