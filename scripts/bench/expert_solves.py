#!/usr/bin/env python
"""Seconds of one Mixture-of-Experts layer's expert solves, each expert alone against the batches the pipeline
forms (run.solves: experts of one shape together, one column sweep per batch), side by side in one process.

    python scripts/bench/expert_solves.py --shape qwen3-30b-a3b --experts 16 [--device cuda]
    python scripts/bench/expert_solves.py --hidden 256 --intermediate 128 --experts 32   # small experts

For --experts of the shape's experts (random weights, Hessians of 2048 random tokens each; GPTQ's cost depends
on the shapes, not the values) it times the gate/up solves and the down solves both ways, checks that both give
the same codes, and prints one JSON line per kind of solve with both times and their ratio. The batch sizes are
the pipeline's own (run.solves.batch_limit: on a CPU only small experts batch).
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # quantkit from this checkout

from quantkit.config import QuantSpec  # noqa: E402
from quantkit.run.solves import batch_limit  # noqa: E402
from quantkit.solve.gptq import gptq_quantize_batched, gptq_quantize_shared  # noqa: E402
from quantkit.tools.estimate import ModelShape, load_model_config  # noqa: E402


def timed(device: torch.device, solve: Callable[[], list]) -> tuple[float, list]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = solve()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def each_alone(weights: list[list[torch.Tensor]], hessians: list[torch.Tensor], spec: QuantSpec) -> list:
    return [gptq_quantize_shared(w, h.clone(), spec, consume_hessian=True) for w, h in zip(weights, hessians)]


def in_batches(weights: list[list[torch.Tensor]], hessians: list[torch.Tensor], spec: QuantSpec, size: int) -> list:
    return [r for s in range(0, len(weights), size)
            for r in gptq_quantize_batched(weights[s:s + size], [h.clone() for h in hessians[s:s + size]], spec)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", help="a built-in name of `quantkit estimate` or a config.json of an MoE model")
    ap.add_argument("--hidden", type=int, help="instead of --shape: the hidden size")
    ap.add_argument("--intermediate", type=int, help="instead of --shape: each expert's intermediate size")
    ap.add_argument("--experts", type=int, default=16, help="experts to solve (default 16)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.shape:
        shape = ModelShape.from_config(load_model_config(args.shape)[3])
        if shape.moe is None:
            ap.error(f"{args.shape} has no experts")
        hidden, intermediate = shape.hidden, shape.moe.expert_intermediate
    elif args.hidden and args.intermediate:
        hidden, intermediate = args.hidden, args.intermediate
    else:
        ap.error("give --shape, or --hidden and --intermediate")
    device = torch.device(args.device)
    spec = QuantSpec(bits=args.bits, group_size=args.group_size)
    g = torch.Generator(device=device).manual_seed(0)
    for name, rows, n_in in (("gate/up", 2 * intermediate, hidden), ("down", hidden, intermediate)):
        weights = [[torch.randn(rows, n_in, generator=g, device=device) * 0.02] for _ in range(args.experts)]
        hessians = []
        for _ in range(args.experts):
            x = torch.randn(2048, n_in, generator=g, device=device)
            hessians.append(2 * x.t() @ x / x.shape[0])
        size = batch_limit(rows, n_in, device.type == "cuda")
        alone_s, alone = timed(device, functools.partial(each_alone, weights, hessians, spec))
        batched_s, batched = timed(device, functools.partial(in_batches, weights, hessians, spec, size))
        same = all(torch.equal(a[0].codes, b[0].codes) for a, b in zip(alone, batched))
        print(json.dumps({"solve": name, "experts": args.experts, "rows": rows, "in_features": n_in,
                          "batch": size, "device": device.type, "alone_s": round(alone_s, 3),
                          "batched_s": round(batched_s, 3), "speedup": round(alone_s / batched_s, 2),
                          "same_codes": same}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
