"""llama.cpp's block-parameter searches (ggml-quants.c), vectorized over all blocks at once.

Every search takes its blocks as [n, B] float32 tensors: element i of every block in row i, one column per
block, so a search loops over its candidate scales (and, for sums, over the n elements), never over blocks.
The arithmetic follows the C source operation by operation in float32: products are grouped as C groups
them (`w*x*l` is `(w*x)*l`), sums accumulate elements 0, 1, ..., n-1 in order (`seq_sum`; torch's own
reductions sum in another order), `number / tensor` and square roots are correctly rounded (`rdiv`, `sqrt`;
torch's CPU shortcuts are not), and `nearest_int` rounds half to even as C's 1.5*2^23 trick does. So the
choices equal llama.cpp's on the same inputs, near-ties included (for C compiled without contracting
`a*b+c` into fused multiply-adds); tests/test_ggml_grids.py checks them against a scalar transcription.

The K-quant choices are quantize_row_q4_K/q5_K/q6_K's `_ref` and `_impl` paths up to the stored fields, in
two steps: the sub-block search (`affine_search`, `q6_k_search`), run a chunk of rows at a time, then the
super-block scales over all rows at once (`affine_fields`, `q6_k_fields`). The codes are re-quantized from
the stored fields by the caller.
"""
from __future__ import annotations

import torch
from torch import Tensor

GROUP_MAX_EPS = 1e-15      # ggml-quants.c GROUP_MAX_EPS: a block whose largest |x| is below this is all zero
SUB_SCALE_MAX = 63         # Q4_K/Q5_K: 6-bit sub-block scales and mins
Q6_K_SCALE_RANGE = 128     # Q6_K: int8 sub-block scales, iscale = -128 / max_scale
Q6_K_ZERO = 32             # Q6_K: codes are q + 32, q in -32..31
REF_SEARCH = {15: (-1.0, 0.1, 20), 31: (-0.5, 0.1, 15)}  # make_qkx2_quants' rmin, rdelta, nstep in Q4_K/Q5_K _ref
IMPL_SEARCH = (-0.9, 0.05, 36)                           # make_qkx3_quants' in every imatrix path
QP_PASSES = 5              # make_qp_quants' coordinate-descent passes


def seq_sum(t: Tensor) -> Tensor:
    """Sum of t [n, B] over n, accumulated in order in t's dtype, as a C `for` loop does."""
    acc = t[0].clone()
    for row in t[1:]:
        acc.add_(row)
    return acc


def nearest_int(v: Tensor) -> Tensor:
    """C's nearest_int (v + 1.5*2^23 in float32): round half to even, kept as a float tensor."""
    return torch.round(v)


def rdiv(numerator: float, t: Tensor) -> Tensor:
    """numerator / t, correctly rounded (torch evaluates `number / tensor` as number * (1/tensor))."""
    return torch.div(torch.full_like(t, numerator), t)


def sqrt(t: Tensor) -> Tensor:
    """C's sqrtf, correctly rounded: via float64 (torch's float32 sqrt on CPU can be off by an ulp)."""
    return torch.sqrt(t.double()).to(t.dtype)


def f32(value: float) -> float:
    """value rounded to float32 (a C float constant), as a Python float."""
    return torch.tensor(value, dtype=torch.float32).item()


def half(t: Tensor) -> Tensor:
    """GGML_FP32_TO_FP16 (round to nearest even), clamped to float16's finite range instead of overflowing."""
    limit = torch.finfo(torch.float16).max
    return t.clamp(-limit, limit).to(torch.float16)


def signed_absmax(x: Tensor) -> Tensor:
    """Per column of x [n, B]: the value with the largest |x|, the first one on ties (C's `if (ax > amax)`)."""
    return x.gather(0, x.abs().argmax(dim=0, keepdim=True))[0]


def make_qx_quants(x: Tensor, nmax: int, w: Tensor) -> Tensor:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, w) for x, w [n, B] -> scale [B]; 0 for all-zero blocks.

    The codes L = clamp(round(x/scale)) + nmax are not returned: every caller stores the scale and
    re-quantizes (or, GPTQ, chooses codes itself).
    """
    mx = signed_absmax(x)
    zero = mx.abs() < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    wx = w * x
    levels = torch.empty_like(x)
    prod = torch.empty((x.shape[0], 2) + x.shape[1:], dtype=x.dtype, device=x.device)

    def sums(numerator: float) -> Tensor:
        torch.mul(x, rdiv(-numerator, mx), out=levels)
        levels.round_().clamp_(-nmax, nmax - 1)
        torch.mul(wx, levels, out=prod[:, 0])
        torch.mul(w, levels, out=prod[:, 1]).mul_(levels)
        return seq_sum(prod)

    sumlx, suml2 = sums(float(nmax))
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        sumlx, suml2 = sums(f32(nmax + f32(f32(0.1) * step)))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    return torch.where(zero, torch.zeros_like(scale), scale)


def make_qkx_quants(x: Tensor, w: Tensor, nmax: int, rmin: float, rdelta: float,
                    nstep: int) -> tuple[Tensor, Tensor]:
    """make_qkx2_quants / make_qkx3_quants (use_mad=false) for x, w [n, B] -> (scale [B], the_min [B]).

    A block's values are scale*L - the_min, L in 0..nmax. Each candidate iscale = (rmin + rdelta*is + nmax)
    / (max - min), is = 0..nstep, is fitted by weighted least squares; the fit with the lowest weighted
    squared error is kept, and later candidates start from the best min so far, as in C. The two C
    functions differ only in qkx3's guard for a best min equal to the block's max (C divides by 0 there);
    every x is then at or below that min, so both give level 0 everywhere, as this function does by
    dividing by 1 instead.
    """
    lo = x.amin(dim=0).clamp(max=0)
    hi = x.amax(dim=0)
    flat = hi <= lo
    sum_w = seq_sum(w)
    sum_x = seq_sum(w * x)
    iscale = rdiv(nmax, torch.where(flat, torch.ones_like(hi), hi - lo))
    scale = 1 / iscale
    levels = (iscale * (x - lo)).round_().clamp_(0, nmax)
    diff = scale * levels + lo - x
    best = seq_sum(w * (diff * diff))
    mn = lo
    prod = torch.empty((x.shape[0], 3) + x.shape[1:], dtype=x.dtype, device=x.device)
    for step in range(nstep + 1):
        span = hi - mn
        span = torch.where(span == 0, torch.ones_like(span), span)
        torch.sub(x, mn, out=levels).mul_(rdiv(f32(f32(f32(rmin) + f32(f32(rdelta) * step)) + nmax), span))
        levels.clamp_(0, nmax).round_()
        torch.mul(w, levels, out=prod[:, 0])
        torch.mul(prod[:, 0], levels, out=prod[:, 1])
        torch.mul(prod[:, 0], x, out=prod[:, 2])
        sum_l, sum_l2, sum_xl = seq_sum(prod)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        torch.mul(levels, this_scale, out=diff).add_(this_min).sub_(x)
        err = seq_sum(diff.mul_(diff).mul_(w))
        better = (det > 0) & (err < best)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -torch.where(flat, lo, mn)


def _qp_error(x: Tensor, w: Tensor, scale: Tensor, levels: Tensor) -> Tensor:
    diff = x - scale * levels
    return seq_sum(w * diff * diff)


def make_qp_quants(x: Tensor, nmax: int, w: Tensor) -> tuple[Tensor, Tensor]:
    """make_qp_quants for non-negative x, w [n, B] -> (scale [B], L [n, B] float in 0..nmax): x ~ scale*L.

    Tries iscale = (nmax + 0.1*is)/max for is in -4..4, then up to QP_PASSES coordinate-descent passes
    over the elements in order. A pass that changes nothing leaves the state as it was, so running every
    pass for every block gives what C's early exit gives.
    """
    mx = x.amax(dim=0).clamp(min=0)
    zero = mx < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    iscale = rdiv(nmax, mx)
    best = _qp_error(x, w, 1 / iscale, nearest_int(iscale * x))
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = rdiv(f32(f32(f32(0.1) * step) + nmax), mx)
        err = _qp_error(x, w, 1 / iscale_is, nearest_int(iscale_is * x).clamp_(max=nmax))
        better = err < best
        best = torch.where(better, err, best)
        iscale = torch.where(better, iscale_is, iscale)
    levels = nearest_int(iscale * x).clamp_(0, nmax)
    sumlx = seq_sum(w * x * levels)
    suml2 = seq_sum(w * levels * levels)
    for _ in range(QP_PASSES):
        for i in range(x.shape[0]):
            wi, xi, li = w[i], x[i], levels[i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            usable = (slx > 0) & (sl2 > 0)
            new_l = nearest_int(xi * sl2 / torch.where(usable, slx, torch.ones_like(slx))).clamp_(0, nmax)
            slx = slx + wi * xi * new_l
            sl2 = sl2 + wi * new_l * new_l
            take = usable & (new_l != li) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            levels[i] = torch.where(take, new_l, li)
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, torch.where(zero, torch.zeros_like(levels), levels)


def _super_blocks(t: Tensor, per: int) -> Tensor:
    """[B] sub-block values ordered (super-block, sub-block) -> [per, B/per]: one column per super-block."""
    return t.reshape(-1, per).t().contiguous()


def _sub_block_weights(x: Tensor, qw: Tensor | None, per_block: int) -> Tensor:
    """Q4_K/Q5_K's weights for x [32, B]: with an imatrix qw*sqrt(sigma2 + x^2), sigma2 = 2*sum(x^2)/256 over
    the super-block; without, the _ref form av_x + |x|, av_x = sqrt(mean x^2) over the sub-block."""
    n = x.shape[0]
    x2 = x * x
    if qw is None:
        return sqrt(seq_sum(x2) / n) + x.abs()
    # the super-block's 256 squares summed in element order: sub-block 0's elements first, then sub-block 1's...
    per_super = x2.reshape(n, -1, per_block).permute(2, 0, 1).reshape(n * per_block, -1)
    sigma2 = 2 * seq_sum(per_super) / (n * per_block)
    return qw * sqrt(sigma2.repeat_interleave(per_block) + x2)


def affine_search(x: Tensor, qw: Tensor | None, nmax: int, per_block: int) -> dict[str, Tensor]:
    """Q4_K/Q5_K (nmax 15/31) sub-block search for x [32, B], sub-blocks ordered (row, super-block, sub-block).

    qw [32, B] is the imatrix per element (None: the _ref path). Returns each sub-block's scale and min
    [B], and with an imatrix the sum of its weights (sw), for `affine_fields`.
    """
    w = _sub_block_weights(x, qw, per_block)
    scales, mins = make_qkx_quants(x, w, nmax, *(REF_SEARCH[nmax] if qw is None else IMPL_SEARCH))
    found = {"scales": scales, "mins": mins}
    if qw is not None:
        found["sw"] = seq_sum(w)
    return found


def affine_fields(found: dict[str, Tensor], per_block: int) -> dict[str, Tensor]:
    """The stored Q4_K/Q5_K fields from `affine_search`'s results over whole super-blocks: d, dmin float16
    [B/8] and sc, m uint8 [B] (6-bit), as quantize_row_q4_K/q5_K write them."""
    scales, mins = found["scales"], found["mins"]
    if "sw" in found:
        sw = _super_blocks(found["sw"], per_block)
        d, sc = make_qp_quants(_super_blocks(scales, per_block), SUB_SCALE_MAX, sw)
        dmin, m = make_qp_quants(_super_blocks(mins, per_block), SUB_SCALE_MAX, sw)
        sc, m = sc.t().reshape(-1), m.t().reshape(-1)
    else:
        max_scale = _super_blocks(scales, per_block).amax(dim=0).clamp(min=0)
        max_min = _super_blocks(mins, per_block).amax(dim=0).clamp(min=0)
        inv_scale = torch.where(max_scale > 0, rdiv(SUB_SCALE_MAX, max_scale), torch.zeros_like(max_scale))
        inv_min = torch.where(max_min > 0, rdiv(SUB_SCALE_MAX, max_min), torch.zeros_like(max_min))
        sc = nearest_int(inv_scale.repeat_interleave(per_block) * scales).clamp_(0, SUB_SCALE_MAX)
        m = nearest_int(inv_min.repeat_interleave(per_block) * mins).clamp_(0, SUB_SCALE_MAX)
        d, dmin = max_scale / SUB_SCALE_MAX, max_min / SUB_SCALE_MAX
    return {"d": half(d), "dmin": half(dmin), "sc": sc.to(torch.uint8), "m": m.to(torch.uint8)}


def q6_k_search(x: Tensor, qw: Tensor | None) -> dict[str, Tensor]:
    """Q6_K's sub-block scales [B] for x [16, B]; weights x^2 (_ref) or the imatrix itself (_impl: llama.cpp
    leaves the sigma2 term out for Q6_K)."""
    return {"scales": make_qx_quants(x, Q6_K_ZERO, x * x if qw is None else qw)}


def q6_k_fields(found: dict[str, Tensor], per_block: int) -> dict[str, Tensor]:
    """The stored Q6_K fields from `q6_k_search`'s scales over whole super-blocks: d float16 [B/16] and sc int8
    [B]; an all-zero super-block gets d = 0 and sc = 0."""
    scales = found["scales"]
    max_scale = signed_absmax(_super_blocks(scales, per_block))
    zero = max_scale.abs() < GROUP_MAX_EPS
    iscale = rdiv(-Q6_K_SCALE_RANGE, torch.where(zero, torch.ones_like(max_scale), max_scale))
    d = torch.where(zero, torch.zeros_like(iscale), 1 / iscale)
    sc = nearest_int(iscale.repeat_interleave(per_block) * scales).clamp_(-Q6_K_SCALE_RANGE, Q6_K_SCALE_RANGE - 1)
    sc = torch.where(zero.repeat_interleave(per_block), torch.zeros_like(sc), sc)
    return {"d": half(d), "sc": sc.to(torch.int8)}
