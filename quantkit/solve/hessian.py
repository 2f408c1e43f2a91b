"""The Hessians GPTQ solves on, summed over calibration batches as running means: 2·XᵀX of a Linear's inputs, and
GPTAQ's cross term against the unquantized model's inputs. Pure tensor math."""
from __future__ import annotations

import functools

import torch
from torch import Tensor

SYMMETRIC_BLOCK = 256  # row-block width of the lower-triangle product below
GRAM_ROWS = 1024  # Hessian rows per 16-bit product on a GPU


@functools.cache
def _has_16bit_gram(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch multiplies 16-bit matrices into a float32 result on this GPU (`mm(..., out_dtype=)`)."""
    try:
        probe = torch.ones(2, 2, device=device, dtype=dtype)
        torch.mm(probe, probe, out_dtype=torch.float32)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def accumulate_hessian(H: Tensor, n_seen: int, x: Tensor) -> tuple[Tensor, int]:
    """Running mean of 2·XᵀX over tokens, in place. x: [..., in_features]; H: float32 [in, in]."""
    x = x.reshape(-1, x.shape[-1])
    n_new = n_seen + x.shape[0]
    H.mul_(n_seen / n_new)
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and _has_16bit_gram(x.device, x.dtype):
        # products of 16-bit numbers are exact in float32, and cuBLAS sums them in float32: the float32 product's
        # result at the 16-bit tensor cores' speed, well above the float32 rate. A block of rows at a time: the
        # product's temporary is [GRAM_ROWS, K], not a second [K, K] beside H
        for start in range(0, H.shape[0], GRAM_ROWS):
            rows = slice(start, start + GRAM_ROWS)
            H[rows].add_(torch.mm(x[:, rows].t(), x, out_dtype=torch.float32), alpha=2.0 / n_new)
        return H, n_new
    x = x.to(H.dtype)
    if H.device.type == "cpu" and H.shape[0] > SYMMETRIC_BLOCK:
        _add_gram_lower(H, x, alpha=2.0 / n_new)
    else:
        H.addmm_(x.t(), x, alpha=2.0 / n_new)
    return H, n_new


def accumulate_cross(C: Tensor, n_seen: int, x_ref: Tensor, x: Tensor) -> Tensor:
    """Running mean of 2·(X̃ - X)ᵀX over tokens, in place, scaled like `accumulate_hessian`'s H (n_seen: the tokens
    summed so far, the Hessian's count before this batch): x_ref [..., K] is the unquantized model's input to a
    Linear, x the quantized model's input for the same tokens. C[i, j] sums (x̃ - x)_i·x_j, the term by which W·X̃
    differs from what W applied to the quantized inputs explains."""
    x = x.reshape(-1, x.shape[-1]).to(C.dtype)
    drift = x_ref.reshape(-1, x_ref.shape[-1]).to(C.dtype) - x
    n_new = n_seen + x.shape[0]
    C.mul_(n_seen / n_new)
    C.addmm_(drift.t(), x, alpha=2.0 / n_new)
    return C


def _add_gram_lower(H: Tensor, x: Tensor, alpha: float) -> None:
    """H += alpha·xᵀx computing only the lower triangle's row blocks, then mirroring it: (k+1)/2k of the FLOPs for
    k blocks. The Hessian products are the largest matmuls of a layer after its forward; torch exposes no syrk."""
    n, b = H.shape[0], SYMMETRIC_BLOCK
    starts = range(0, n, b)
    for start in starts:
        end = min(start + b, n)
        H[start:end, :end].addmm_(x[:, start:end].t(), x[:, :end], alpha=alpha)
    for start in starts:  # mirror block by block: no index tensors or temporaries of H's size
        end = min(start + b, n)
        H[start:end, end:].copy_(H[end:, start:end].t())
