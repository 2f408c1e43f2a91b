#!/usr/bin/env python
"""Write a random-weight checkpoint of a real architecture's shape, one tensor in memory at a time.

    python scripts/dev/make_synthetic_checkpoint.py /tmp/llama7b-2l --shape llama-2-7b --layers 2

Time grows with the bytes written, about 25 seconds a GiB on 2 CPU cores (a 2-layer Llama-2-7B shape is 1.3 GB,
the 32-layer one 13.5 GB). `--device cuda` draws the numbers on the GPU.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

from quantkit.errors import QuantkitError
from quantkit.tools.estimate import BUILTIN_CONFIGS
from quantkit.tools.synthetic import shape_config, write_synthetic_checkpoint
from quantkit.write.shards import parse_size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", default="llama-2-7b", choices=sorted(BUILTIN_CONFIGS))
    ap.add_argument("--layers", type=int, help="number of decoder layers (default: the real model's)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-shard-size", default="2GB")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the random numbers are drawn")
    args = ap.parse_args()
    t0 = time.perf_counter()
    try:
        config = shape_config(args.shape, args.layers)
        size = write_synthetic_checkpoint(args.out, config, getattr(torch, args.dtype), args.seed,
                                          parse_size(args.max_shard_size), device=args.device)
    except (QuantkitError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {args.shape} shape, {config['num_hidden_layers']} layers, {size / 2**30:.2f} GiB of "
          f"{args.dtype} weights in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
