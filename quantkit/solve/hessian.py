"""The Hessians GPTQ solves on, summed over calibration batches: 2·XᵀX of a Linear's inputs, and GPTAQ's cross term
against the unquantized model's inputs. Pure tensor math.

Two ways to sum them. Running means in float32 (accumulate_hessian, accumulate_cross): the default, 4 bytes an
entry, but each batch's rescaling rounds, so the result depends on how the batches were grouped. Exact sums
(add_gram, add_cross, mean_of_sum; QuantSpec.exact_sums): each batch's float32 product is added in float64, whose
29 further bits hold the sum of a run's float32 products without rounding in practice, so the sum is the same
however the batches are shared among processes and in whatever order their shares are added; the mean is then
rounded to float32 once. It costs 8 bytes an entry while summing."""
from __future__ import annotations

import functools

import torch
from torch import Tensor

SYMMETRIC_BLOCK = 256  # row-block width of the lower-triangle product below
GRAM_ROWS = 1024  # Hessian rows per 16-bit product on a GPU
SUM_DTYPE = torch.float64  # an exact sum's dtype; a running mean is float32


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


def add_gram(S: Tensor, x: Tensor) -> int:
    """S += XᵀX in place, S a SUM_DTYPE [in, in] exact sum, x [..., in]; returns the tokens added. Each row block's
    product of the lower triangle is computed in float32 (on a GPU from 16-bit inputs where torch can, as
    accumulate_hessian does) and added to S in float64, and the block's part left of the diagonal, transposed, to
    the upper triangle: half the full product's FLOPs."""
    x = x.reshape(-1, x.shape[-1])
    wide = x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and _has_16bit_gram(x.device, x.dtype)
    if not wide:
        x = x.to(torch.float32)
    b = GRAM_ROWS if x.is_cuda else SYMMETRIC_BLOCK
    for start in range(0, S.shape[0], b):
        end = min(start + b, S.shape[0])
        block = torch.mm(x[:, start:end].t(), x[:, :end], out_dtype=torch.float32) if wide else \
            x[:, start:end].t() @ x[:, :end]
        S[start:end, :end].add_(block)
        S[:start, start:end].add_(block[:, :start].t())
    return x.shape[0]


def add_cross(S: Tensor, x_ref: Tensor, x: Tensor) -> None:
    """S += (X̃ - X)ᵀX in place, S a SUM_DTYPE exact sum: accumulate_cross's product, in float32 row blocks each
    added in float64 (add_gram). x_ref: the unquantized model's input to a Linear, x the quantized model's."""
    x = x.reshape(-1, x.shape[-1]).to(torch.float32)
    drift = x_ref.reshape(-1, x_ref.shape[-1]).to(torch.float32) - x
    b = GRAM_ROWS if x.is_cuda else SYMMETRIC_BLOCK
    for start in range(0, S.shape[0], b):
        S[start:start + b].add_(drift[:, start:start + b].t() @ x)


def mean_of_sum(S: Tensor, tokens: int) -> Tensor:
    """An exact sum (add_gram, add_cross) as the float32 mean GPTQ solves on, 2·S/tokens, rounded once; S is
    scaled in place (the caller drops it)."""
    return S.mul_(2.0 / tokens if tokens else 0.0).to(torch.float32)


def hessian_itemsize(exact_sums: bool) -> int:
    """Bytes of one Hessian entry while it is summed: float64 exact sums, else float32 running means."""
    return SUM_DTYPE.itemsize if exact_sums else torch.float32.itemsize


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
