"""Which dtype the calibration forwards run in (the model's own 16-bit dtype where the hardware multiplies it fast,
float32 elsewhere; Hessians are summed in float32 whatever this is), and how float32 matmuls run on a CPU."""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from .errors import QuantkitError

COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
_HALF = (torch.float16, torch.bfloat16)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """x86 CPUs with AVX512-BF16 or AMX-BF16 instructions, which oneDNN uses for bfloat16 matmuls: about 5x the
    float32 rate on 2 AMD EPYC (Zen 4) cores, 960 against 190 GFLOPS. Without them bfloat16 is emulated and slower
    than float32 (10 against 70 GFLOPS on an AVX2 EPYC). Read from /proc/cpuinfo; False where that is missing."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return lists_bf16_instructions(cpuinfo) and torch.backends.mkldnn.is_available()


def lists_bf16_instructions(cpuinfo: str) -> bool:
    """Whether /proc/cpuinfo's first flags line names a bfloat16 matmul instruction set."""
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def compute_dtype(choice: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """auto: the model's 16-bit dtype on a GPU, and a bfloat16 model's own dtype on a CPU with native bfloat16
    matmuls; float32 otherwise (float32 models, float16 models on a CPU, CPUs without bfloat16 instructions).
    A named dtype is used as asked, on any device."""
    if choice not in COMPUTE_DTYPES:
        raise QuantkitError(f"unknown compute dtype {choice!r}; use one of {', '.join(COMPUTE_DTYPES)}")
    if choice != "auto":
        return getattr(torch, choice)
    if device.type != "cpu":
        return model_dtype if model_dtype in _HALF else torch.float32
    return torch.bfloat16 if model_dtype == torch.bfloat16 and cpu_has_native_bf16() else torch.float32


# a float32 matmul's error, relative to the sum of its products' magnitudes, is about 1e-8 (median) and 3e-7 (max)
# for K in the hundreds; rounding the inputs to bfloat16 would make it about 1e-3
FLOAT32_ACCURACY = 1e-5


@functools.cache
def bf16_float32_matmuls_are_accurate() -> bool:
    """Whether oneDNN, allowed to use bfloat16 instructions for float32 matmuls (`fp32_precision = "bf16"`), still
    gives float32's accuracy here. On 2 AMD EPYC (Zen 4) cores it does, at 2x the rate (425 against 210 GFLOPS, errors
    within 2x of plain float32's); the mode also permits plain bfloat16 rounding, so a probe the size of a
    calibration matmul decides, once per process, and anything less accurate than float32 is not used."""
    if not cpu_has_native_bf16() or not hasattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision"):
        return False  # the setting is torch 2.9's; an older torch keeps plain float32
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2048, 576, generator=g), torch.randn(576, 1024, generator=g)
    try:
        with _float32_matmuls_via_bf16():
            fast = (a @ b).double()
    except (RuntimeError, ValueError):  # a torch build whose oneDNN refuses the mode
        return False
    exact, scale = a.double() @ b.double(), a.double().abs() @ b.double().abs()
    return bool(((fast - exact).abs() / scale).max() < FLOAT32_ACCURACY)


@contextlib.contextmanager
def fast_float32_matmuls(device: torch.device):
    """Within: float32 matmuls on a CPU use its bfloat16 instructions where that keeps float32's accuracy (see
    bf16_float32_matmuls_are_accurate); elsewhere nothing changes."""
    if device.type != "cpu" or not bf16_float32_matmuls_are_accurate():
        yield
        return
    with _float32_matmuls_via_bf16():
        yield


@contextlib.contextmanager
def _float32_matmuls_via_bf16():
    settings = torch.backends.mkldnn.matmul
    before = settings.fp32_precision
    settings.fp32_precision = "bf16"
    try:
        yield
    finally:
        settings.fp32_precision = before
