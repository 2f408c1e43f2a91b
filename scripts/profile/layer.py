#!/usr/bin/env python
"""Where one decoder layer's GPTQ time goes: each true-sequential stage's forward + Hessian, solves, propagation.

    python scripts/profile/layer.py demo/SmolLM2-135M-Instruct [SAMPLES] [--no-replay] [--no-spill] [--ops] [--bf16]
                                    [--ieee]

Layer 0 of MODEL_DIR, SAMPLES x 512 calibration tokens (default 128), float32 (or --bf16) on the CPU, the same
functions the pipeline calls, with its calibrate.memo.BlockMemo: the attention folded into the stored inputs where the
layer allows, o_proj's and down_proj's kept inputs in a scratch file, blocks derived from them checked once.
--no-replay disables the memo, --no-spill keeps o_proj's inputs in memory and down_proj's not at all (the pipeline
on a GPU), for before/after comparisons. --bf16 runs the forwards in bfloat16 (a bfloat16 model on a CPU with
native bfloat16 matmuls, `--compute-dtype auto` there). --ieee keeps float32 matmuls on torch's default BLAS (the
pipeline sends them through oneDNN where precision.onednn_float32_matmuls_are_accurate). --ops also prints the
torch operators that took the most time (torch.profiler). Takes 10 to 40 seconds for SmolLM2-135M at 128 samples
on 2 CPU cores, plus loading.
"""
import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from quantkit.calibrate.forward import run_layer
from quantkit.calibrate.memo import BlockMemo
from quantkit.calibrate.precision import fast_float32_matmuls
from quantkit.calibrate.probes import derivable_blocks, discover_groups, foldable_blocks
from quantkit.calibrate.statistics import collect_hessians, propagate
from quantkit.config import CalibSpec, QuantSpec
from quantkit.memory.heap import release_large_frees_at_once
from quantkit.run.first_inputs import layer_zero_inputs
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


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("samples", type=int, nargs="?", default=128, help="calibration samples of 512 tokens")
    ap.add_argument("--no-replay", action="store_true", help="no BlockMemo: every pass reruns every block")
    ap.add_argument("--no-spill", action="store_true", help="no scratch file for the kept inputs (as on a GPU)")
    ap.add_argument("--ops", action="store_true", help="also print the slowest torch operators")
    ap.add_argument("--bf16", action="store_true", help="forwards in bfloat16")
    ap.add_argument("--ieee", action="store_true", help="float32 matmuls on torch's default BLAS, not oneDNN")
    return ap.parse_args()


def main() -> None:
    opts = parse_args()
    release_large_frees_at_once()  # as quantize() does
    matmul_settings = contextlib.ExitStack()  # held for the whole run: a dropped context would restore the setting
    if not opts.ieee:
        matmul_settings.enter_context(fast_float32_matmuls(torch.device("cpu")))  # as quantize() does
    model_dir, samples = opts.model_dir, opts.samples
    config = load_config(model_dir, read_config_dict(model_dir))
    checkpoint = SafetensorsCheckpoint(model_dir)
    skeleton = build_skeleton(config)
    prefix, layers = decoder_layers(skeleton, config.num_hidden_layers)
    ids = calibration_batch(AutoTokenizer.from_pretrained(str(model_dir)), CalibSpec(samples=samples, seq_len=512))
    cpu = torch.device("cpu")
    dtype = torch.bfloat16 if opts.bf16 else torch.float32  # the compute dtype
    batches, calls = layer_zero_inputs(skeleton, layers, prefix, checkpoint, ids, cpu, dtype, dtype)
    layer = layers[0]
    materialize(layer, f"{prefix}.0", checkpoint, cpu, dtype)
    groups = discover_groups(layer, batches[0][:1], calls[0])
    modules = linear_modules(layer)
    replay = not opts.no_replay
    scratch = tempfile.TemporaryDirectory(dir=".") if not opts.no_spill else None  # on disk, as the work dir
    sample = batches[0][:1]
    memo = BlockMemo(layer, enabled=replay, groups=groups, hidden_size=batches[0].shape[-1],
                     fold=foldable_blocks(layer, groups, sample, calls[0], cpu, dtype) if replay else set(),
                     spill_dir=Path(scratch.name) if scratch else None,
                     derivable=derivable_blocks(layer, groups, sample, calls[0], cpu, dtype) if replay else None)
    profiler = None
    if opts.ops:
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
        stage = "/".join(n.split(".")[-1] for n in group)
        print(f"stage {stage:24s} forward + Hessian {t_fwd:6.2f} s   solve {t_solve:5.2f} s")
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


if __name__ == "__main__":
    main()
