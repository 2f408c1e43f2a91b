#!/usr/bin/env python
"""How fast and how accurate this CPU's matmuls are in each mode quantkit may use.

    python scripts/bench/matmul.py

Rows: float32 as torch runs it by default (its BLAS); float32 through oneDNN (torch routes it there when allowed to
use bfloat16, `torch.backends.mkldnn.matmul.fp32_precision = "bf16"`; what quantize and verify use where
precision.onednn_float32_matmuls_are_accurate); and plain bfloat16 inputs (a bfloat16 model's forwards). Shapes:
a calibration forward (4096 tokens x 576 -> 1536), a Hessian product (1536 x 4096 x 1536) and one with inputs
spread over six decades. Error: |result - float64 result| / (|a| @ |b|), the scale of a matmul's own rounding.
Takes about 10 seconds.
"""
import argparse
import contextlib
import time

import torch

from quantkit.calibrate.precision import (
    cpu_has_native_bf16,
    matmul_errors,
    onednn_float32_matmuls,
    onednn_float32_matmuls_are_accurate,
)


def _rate(a, b, repeats=10) -> float:
    a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] * repeats / (time.perf_counter() - t) / 1e9


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 1536, generator=g)
    shapes = {"forward 4096x576 @ 576x1536": (torch.randn(4096, 576, generator=g),
                                               torch.randn(576, 1536, generator=g) * 0.05),
              "Hessian 1536x4096 @ 4096x1536": (x.t().contiguous(), x),
              "inputs over 1e-3..1e3, 2048x512 @ 512x512": (torch.randn(2048, 512, generator=g)
                                                            * torch.logspace(-3, 3, 512),
                                                            torch.randn(512, 512, generator=g))}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, AVX512-BF16/AMX: {cpu_has_native_bf16()}, "
          f"oneDNN float32 matmuls accurate: {onednn_float32_matmuls_are_accurate()}")
    print("| shape | mode | GFLOPS | error median | error max |\n|---|---|---:|---:|---:|")
    for name, (a, b) in shapes.items():
        modes = [("float32", contextlib.nullcontext, a, b),
                 ("float32 through oneDNN", onednn_float32_matmuls, a, b),
                 ("bfloat16 inputs", contextlib.nullcontext, a.bfloat16(), b.bfloat16())]
        for mode, setting, left, right in modes:
            with setting():
                errors = matmul_errors(left @ right, a, b).flatten()
                rate = _rate(left, right)
            print(f"| {name} | {mode} | {rate:.0f} | {errors.median().item():.1e} | {errors.max().item():.1e} |")


if __name__ == "__main__":
    main()
