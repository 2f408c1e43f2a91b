"""Pure uniform-grid quantization primitives shared by GPTQ and round-to-nearest.

Scales are rounded to float16 when computed, because the on-disk format stores them in float16: the
solver then works with exactly the scales a loader will read, so dequantizing the files reproduces the
solver's output bit for bit.
"""
from __future__ import annotations

import torch
from torch import Tensor

_FP16_MIN_SCALE = 2.0**-24  # smallest positive float16 (subnormal); keeps scales from rounding to 0
_FP16_MAX = 65504.0


CLIP_GRID = 100       # shrink steps of 1% ...
CLIP_MAX_SHRINK = 0.2  # ... down to 80% of the min/max range
CLIP_NORM = 2.4        # error norm of the search (GPTQ reference implementation's Quantizer(mse=True))


def group_qparams(w: Tensor, bits: int, sym: bool, clip_search: bool = False) -> tuple[Tensor, Tensor]:
    """Per-row grid parameters for w [..., rows, cols] -> (scale [..., rows] float32, zero [..., rows] float32
    integer-valued); leading dimensions are a batch of independent matrices.

    With clip_search, each row's range is shrunk by the factor (1, 0.99, ..., 0.81) whose rounding error
    sum |w - q(w)|^2.4 is smallest: clipping a few outliers buys a finer grid for all other weights.
    """
    w = w.float()
    xmin = w.min(dim=-1).values.clamp(max=0)
    xmax = w.max(dim=-1).values.clamp(min=0)
    if not clip_search:
        return _range_qparams(xmin, xmax, bits, sym)
    search = _clip_search_batched if w.is_cuda else _clip_search_sequential
    return search(w, xmin, xmax, bits, sym)


def _shrink_factors() -> list[float]:
    return [1 - step / CLIP_GRID for step in range(int(CLIP_MAX_SHRINK * CLIP_GRID))]


def _clip_search_sequential(w: Tensor, xmin: Tensor, xmax: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """One shrink factor at a time into one reused buffer: small temporaries and no allocation per factor
    (a fresh [rows, cols] tensor per step is a page-faulted mmap on a CPU), which is what a CPU wants."""
    buffer = torch.empty_like(w)
    first, *rest = _shrink_factors()
    scale, zero = _range_qparams(xmin * first, xmax * first, bits, sym)
    best = _rounding_error(w, scale, zero, bits, sym, buffer)
    for shrink in rest:
        s, z = _range_qparams(xmin * shrink, xmax * shrink, bits, sym)
        err = _rounding_error(w, s, z, bits, sym, buffer)
        better = err < best  # strictly: the first smallest wins, so 1.0 wins ties
        best = torch.where(better, err, best)
        scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def _clip_search_batched(w: Tensor, xmin: Tensor, xmax: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Every shrink factor at once ([S, ..., rows]): a few dozen kernels instead of hundreds. GPTQ calls this once
    per group, so on a GPU the launches would cost more than the arithmetic. The same result as the sequential
    search: the factors are rounded from double as `tensor * python_float` rounds them, and argmin takes the
    first smallest."""
    shrink = torch.tensor(_shrink_factors(), dtype=torch.float32, device=w.device).view(-1, *[1] * xmin.dim())
    scales, zeros = _range_qparams(xmin * shrink, xmax * shrink, bits, sym)
    best = _rounding_error(w, scales, zeros, bits, sym).argmin(dim=0, keepdim=True)
    return scales.gather(0, best).squeeze(0), zeros.gather(0, best).squeeze(0)


def _rounding_error(w: Tensor, scale: Tensor, zero: Tensor, bits: int, sym: bool,
                    buffer: Tensor | None = None) -> Tensor:
    """sum |w - q(w)|^CLIP_NORM per row, for w [..., rows, cols] and parameters [..., rows] (broadcast against w's
    rows: a leading dimension of shrink factors), computed in one buffer.

    q(w) - w = scale * clamp(round(w / scale), -zero, maxq - zero) - w, which is the format's dequantization
    scale * (code - zero) minus w exactly: codes and zero points are small whole numbers. The power is most of
    the cost; every other step is one in-place pass."""
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    if buffer is None:
        buffer = torch.empty(torch.broadcast_shapes(w.shape, s.shape), dtype=torch.float32, device=w.device)
    maxq = 2**bits - 1
    torch.div(w, s, out=buffer).round_()
    if sym:  # one zero point for every row: scalar bounds, cheaper than per-row ones on a CPU
        mid = _symmetric_zero(maxq)
        buffer.clamp_(-mid, maxq - mid)
    else:
        torch.clamp(buffer, -z, maxq - z, out=buffer)
    return buffer.mul_(s).sub_(w).abs_().pow_(CLIP_NORM).sum(dim=-1)


def _symmetric_zero(maxq: int) -> int:
    """The fixed zero point of a symmetric grid: the middle code (8 of 0..15 at 4 bits)."""
    return (maxq + 1) // 2


def _range_qparams(xmin: Tensor, xmax: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    maxq = 2**bits - 1
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = ((xmax - xmin) / maxq).clamp(_FP16_MIN_SCALE, _FP16_MAX).half().float()
    if sym:
        zero = torch.full_like(scale, _symmetric_zero(maxq))
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """w [rows, cols] -> integer codes (float dtype) in [0, 2**bits) given per-row scale/zero [rows]."""
    return torch.clamp(torch.round(w / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, 2**bits - 1)


def dequantize_codes(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """The format's dequantization, W = scale * (q - zero), in float32. Broadcasts over trailing dims."""
    return scale.float() * (codes.float() - zero.float())


def rtn_quantize(weight: Tensor, bits: int, group_size: int, sym: bool,
                 clip_search: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest baseline: weight [N, K] -> (codes int32 [N, K], scales [N, G], zeros int32 [N, G]).
    Each (row, group) has its own grid, so whole groups are solved at once as the rows of an [N * G, group] matrix
    (a few large kernels, not a few per group); a partial last group is solved on its own."""
    n_out, n_in = weight.shape
    g = n_in if group_size == -1 else group_size
    full = n_in // g * g
    parts = [weight[:, :full].float().reshape(-1, g)] + ([weight[:, full:].float()] if full < n_in else [])
    codes, scales, zeros = [], [], []
    for rows in parts:
        scale, zero = group_qparams(rows, bits, sym, clip_search)
        codes.append(quantize_codes(rows, scale, zero, bits).to(torch.int32).reshape(n_out, -1))
        scales.append(scale.reshape(n_out, -1))
        zeros.append(zero.reshape(n_out, -1))
    return torch.cat(codes, dim=1), torch.cat(scales, dim=1), torch.cat(zeros, dim=1).to(torch.int32)


def dequantize_grouped(codes: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor) -> Tensor:
    """codes [N, K], scales/zeros [N, G], g_idx [K] -> float32 weight [N, K]."""
    idx = g_idx.long()
    return dequantize_codes(codes, scales[:, idx], zeros[:, idx])
