"""Which dtype the calibration forwards run in (the model's own 16-bit dtype where the hardware multiplies it fast,
float32 elsewhere; Hessians are summed in float32 whatever this is), and which library runs float32 matmuls on a
CPU."""
from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from quantkit.config import COMPUTE_DTYPES
from quantkit.errors import QuantkitError

_HALF = (torch.float16, torch.bfloat16)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """x86 CPUs with AVX512-BF16 or AMX-BF16 instructions, which oneDNN uses for bfloat16 matmuls, several times
    faster than float32 ones. Without them bfloat16 is emulated and slower than float32. Read from /proc/cpuinfo;
    False where that is missing."""
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


# the largest error (relative to the sum of the products' magnitudes, `matmul_errors`) a float32 matmul may have:
# well above float32's own rounding, far below that of inputs rounded to bfloat16
FLOAT32_ACCURACY = 1e-5


@functools.cache
def onednn_float32_matmuls_are_accurate() -> bool:
    """Whether float32 matmuls may go through oneDNN here. torch sends them there only when allowed to use bfloat16
    (`torch.backends.mkldnn.matmul.fp32_precision = "bf16"`, CPUs with AVX-512 or AMX). On an AVX-512 CPU oneDNN
    then runs its float32 AVX-512 kernel (ONEDNN_VERBOSE: brg_matmul:avx512_core), faster than torch's default
    BLAS and with float32's accuracy, only summed in another order. A CPU with AMX would round the inputs to
    bfloat16 instead, so a probe the size of a calibration matmul decides, once per process, and anything less
    accurate than float32 is not used. Tried only on CPUs that list bfloat16 instructions."""
    if not cpu_has_native_bf16() or not hasattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision"):
        return False  # the setting is torch 2.9's; an older torch keeps its default
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2048, 576, generator=g), torch.randn(576, 1024, generator=g)
    try:
        fast = _onednn_product(a, b)
    except (RuntimeError, ValueError):  # a torch build whose oneDNN refuses the mode
        return False
    # checked 256 rows at a time: a float64 reference of the whole product would be the start-up's largest allocation
    return all(bool(matmul_errors(fast[i:i + 256], a[i:i + 256], b).max() < FLOAT32_ACCURACY)
               for i in range(0, a.shape[0], 256))


def matmul_errors(result: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|result - a @ b in float64| / (|a| @ |b|) per element: a matmul's error on the scale of its own rounding."""
    exact, scale = a.double() @ b.double(), a.double().abs() @ b.double().abs()
    return (result.double() - exact).abs() / scale


def float32_matmul_path(device: torch.device) -> str:
    """"onednn" where fast_float32_matmuls changes anything, else "default" (recorded with a run's settings)."""
    return "onednn" if device.type == "cpu" and onednn_float32_matmuls_are_accurate() else "default"


@contextlib.contextmanager
def fast_float32_matmuls(device: torch.device) -> Iterator[None]:
    """Within: float32 matmuls on a CPU go through oneDNN where that keeps float32's accuracy (see
    onednn_float32_matmuls_are_accurate); elsewhere nothing changes. The setting is process-wide while any such
    block runs: other threads' float32 CPU matmuls take the same path, and torch.get_float32_matmul_precision()
    raises inside (it refuses a mix of its old and new settings)."""
    if float32_matmul_path(device) != "onednn":
        yield
        return
    with onednn_float32_matmuls():
        yield


def _onednn_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    with onednn_float32_matmuls():
        return a @ b


_setting_lock = threading.Lock()
_setting_users = 0
_setting_before: str | None = None


@contextlib.contextmanager
def onednn_float32_matmuls() -> Iterator[None]:
    """Counted, so overlapping blocks (threads, nesting) restore the original setting when the last one ends."""
    global _setting_users, _setting_before
    settings = torch.backends.mkldnn.matmul  # type: ignore[attr-defined]  # torch's stubs lack this 2.9 setting
    with _setting_lock:
        if _setting_users == 0:
            _setting_before = settings.fp32_precision
            settings.fp32_precision = "bf16"
        _setting_users += 1
    try:
        yield
    finally:
        with _setting_lock:
            _setting_users -= 1
            if _setting_users == 0:
                settings.fp32_precision = _setting_before
