#!/usr/bin/env python
"""Seconds of each GPTQ solve of one decoder layer of a real shape, on random weights and Hessians.

    python scripts/bench/solve.py --shape llama-2-7b [--bits 4 --group-size 64] [--device cpu]

A layer's Linears that read one input are solved stacked (q/k/v, gate/up), as the pipeline does, so a layer is
four solves; this times each (`gptq_quantize_shared` with the Hessian consumed, the quantize defaults: act-order
and clip search) and prints one JSON line per solve and the layer's total. GPTQ's cost depends on the shapes,
not on the values. To compare a solver change side by side, run it again with the other checkout first on the
path: `PYTHONPATH=/path/to/other/checkout python scripts/bench/solve.py`. On a GPU each line also gives the
memory the solve needs beyond its inputs; `QUANTKIT_CUDA_GRAPHS=0` runs the column sweeps without CUDA graphs.
At the 7B shape: about 25 s on a CPU with AVX512-BF16, 2 minutes on 2 AVX2 cores, a few seconds on a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "1048576")  # as `quantkit quantize` runs (quantkit.memory.heap)

import torch  # noqa: E402

from quantkit.config import QuantSpec  # noqa: E402
from quantkit.solve.gptq import gptq_quantize_shared  # noqa: E402
from quantkit.tools.estimate import ModelShape, load_model_config  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-2-7b", help="a built-in name of `quantkit estimate` or a config.json")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    shape = ModelShape.from_config(load_model_config(args.shape)[3])
    spec = QuantSpec(bits=args.bits, group_size=args.group_size)
    device = torch.device(args.device)
    # the solves written out here, not taken from ModelShape.solves(): older checkouts, run through PYTHONPATH
    # for a side-by-side figure, do not have that method
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    solves = {"q/k/v": (q + 2 * kv, shape.hidden), "o": (shape.hidden, q),
              "gate/up": (2 * shape.intermediate, shape.hidden), "down": (shape.hidden, shape.intermediate)}
    total = 0.0
    for name, (rows, k) in solves.items():
        g = torch.Generator(device=device).manual_seed(0)
        weight = torch.randn(rows, k, generator=g, device=device) * 0.02
        x = torch.randn(2048, k, generator=g, device=device)
        hessian = 2 * x.t() @ x / x.shape[0]
        del x
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            inputs = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        gptq_quantize_shared([weight], hessian, spec, consume_hessian=True)
        row = {"solve": name, "rows": rows, "in_features": k}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            # GPU memory the solve needs beyond its inputs (the float32 weight and the Hessian it consumes)
            row["gpu_mb_beyond_inputs"] = round((torch.cuda.max_memory_allocated(device) - inputs) / 2**20)
        seconds = time.perf_counter() - start
        total += seconds
        print(json.dumps({**row, "seconds": round(seconds, 2)}), flush=True)
        del weight, hessian
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"shape": args.shape, "layer_solve_seconds": round(total, 2), "peak_rss_mb": round(peak),
                      "torch_threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
