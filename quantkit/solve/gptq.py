"""GPTQ (Frantar et al. 2022, Algorithm 1) as pure functions: tensors in, a result out. No I/O, no modules."""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from quantkit.config import QuantSpec
from quantkit.errors import NumericalError
from quantkit.solve.grid import dequantize_codes, group_qparams, rtn_quantize

SHIFT_ROWS = 1024  # weight rows per step of GPTAQ's shift: its temporaries are [SHIFT_ROWS, K]


@dataclass(frozen=True)
class GPTQResult:
    codes: Tensor       # uint8 [N, K], values in [0, 2**bits), original column order
    scales: Tensor      # float32 [N, G], float16-representable
    zeros: Tensor       # int32 [N, G]
    g_idx: Tensor       # int32 [K], group of each input channel
    weight: Tensor      # float32 [N, K], the dequantized result (what the files reproduce)
    loss: float         # sum over rows of (w - q)^2 / [H^-1]_jj^2 / 2, GPTQ's objective
    damp: float         # damping actually used (more than requested after a retry)

    def cpu(self) -> "GPTQResult":
        """What is kept after solving: the packed parts on CPU, without the dequantized weight."""
        return GPTQResult(codes=self.codes.cpu(), scales=self.scales.cpu(), zeros=self.zeros.cpu(),
                          g_idx=self.g_idx.cpu(), weight=None, loss=self.loss, damp=self.damp)


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
        # result at the 16-bit tensor cores' speed (about 10x the float32 rate). A block of rows at a time: the
        # product's temporary is [GRAM_ROWS, K], not a second [K, K] beside H (462 MB for a 7B down_proj)
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
    k blocks (1536 wide: 0.55 s -> 0.33 s per 8192 tokens on 2 CPU cores; the same bits as one addmm there).
    The Hessian products are the largest matmuls of a layer after its forward; torch exposes no syrk."""
    n, b = H.shape[0], SYMMETRIC_BLOCK
    starts = range(0, n, b)
    for start in starts:
        end = min(start + b, n)
        H[start:end, :end].addmm_(x[:, start:end].t(), x[:, :end], alpha=alpha)
    for start in starts:  # mirror block by block: no index tensors or temporaries of H's size
        end = min(start + b, n)
        H[start:end, end:].copy_(H[end:, start:end].t())


INVERSE_BLOCK = 1024  # rows per step of the triangular inverse below


def _reversed_inverse_factor(H: Tensor, damp: float, tries: int = 5) -> tuple[Tensor, float]:
    """X = inv(chol(H + damp·mean(diag H)·I)), lower triangular, for H given in reversed column order, raising damp
    tenfold when H is not PD. X read in reverse is GPTQ's upper Cholesky factor of the inverse Hessian (`_upper_rows`).

    Why: for J the order reversal, JHJ = L·Lᵀ gives H⁻¹ = Uᵀ·U with U = J·L⁻¹·J upper triangular, the factor GPTQ
    needs. One Cholesky and one triangular inverse cost 2K³/3 flops, against 4K³/3 for the reference's Cholesky,
    inverse from it and second Cholesky: 37 -> 19 s for an 11008-wide Hessian on 2 CPU cores.

    Both run in H's own memory, with no [K, K] temporary (462 MB for a 7B down_proj): X is returned as a view of
    it. The factor is written through H's transpose, a column-major view that LAPACK and cuSOLVER take as it is
    (H is symmetric, so the view holds the same matrix); written into H itself, torch would factor a column-major
    copy and copy it back. A copy of H for a retry with more damping waits in host memory (pinned and copied
    asynchronously from a GPU)."""
    diagonal = H.diagonal().clone()
    mean_diag = diagonal.mean()
    info = torch.empty((), dtype=torch.int32, device=H.device)
    if H.is_cuda:
        backup = torch.empty(H.shape, dtype=H.dtype, pin_memory=True).copy_(H, non_blocking=True)
    else:
        backup = H.clone()
    factor = H.mT
    for attempt in range(tries):
        if attempt:
            H.copy_(backup, non_blocking=True)
        H.diagonal().copy_(diagonal + damp * mean_diag)
        torch.linalg.cholesky_ex(factor, out=(factor, info))  # in place; the upper triangle comes back zero
        if info.item() == 0:
            _invert_lower_in_place(factor)
            return factor, damp
        damp *= 10
    raise NumericalError(f"Hessian is not positive definite even with damp={damp / 10:g}; "
                         "use more calibration samples or a larger --damp")


def _invert_lower_in_place(L: Tensor) -> None:
    """L ← L⁻¹ for a lower-triangular L (zero above its diagonal), a block of rows at a time, top to bottom (the
    blocked form of LAPACK's trtri, which torch does not expose): with D the row block's diagonal block,
    X[r, :r] = -D⁻¹·L[r, :r]·X[:r, :r] and X[r, r] = D⁻¹. A row block reads only its own row of L and the rows of
    X above it, so X overwrites L as it goes. The products skip X's zeros above the diagonal (K³/3 flops in
    all) and are plain matrix products on strided slices: no copies of trailing blocks, as triangular solves on
    submatrices would make (a [K, K] one for the first block)."""
    k = L.shape[0]
    for r in range(0, k, INVERSE_BLOCK):
        r2 = min(r + INVERSE_BLOCK, k)
        diagonal_block = L[r:r2, r:r2].contiguous()
        if r:
            rows = torch.empty(r2 - r, r, dtype=L.dtype, device=L.device)
            for c in range(0, r, INVERSE_BLOCK):  # X[:r, c:c2] is zero above row c
                c2 = min(c + INVERSE_BLOCK, r)
                torch.mm(L[r:r2, c:r], L[c:r, c:c2], out=rows[:, c:c2])
            torch.linalg.solve_triangular(diagonal_block, rows, upper=False, out=rows)
            L[r:r2, :r] = rows.neg_()
            del rows
        inverse = torch.zeros(r2 - r, r2 - r, dtype=L.dtype, device=L.device)
        inverse.diagonal().fill_(1)
        torch.linalg.solve_triangular(diagonal_block, inverse, upper=False, out=inverse)
        L[r:r2, r:r2] = inverse
        del inverse, diagonal_block  # before the next block's: temporaries of one block at a time


def _upper_rows(X: Tensor, i1: int, i2: int) -> Tensor:
    """Rows i1..i2-1, columns i1.. of U = J·X·J (the upper Cholesky factor of H⁻¹; X from _reversed_inverse_factor)."""
    k = X.shape[0]
    return X[k - i2:k - i1, :k - i1].flip(0, 1)


def _sweep_columns(W1: Tensor, Q1: Tensor, Err1: Tensor, Hinv1: Tensor, scale: Tensor, zero: Tensor,
                   offset: Tensor, start: int, end: int, maxq: int) -> None:
    """GPTQ's inner loop over columns start..end-1 of a block (held transposed: W1 [block, N]) on one grid: round
    each column, keep its code in Q1 and its scaled error in Err1, and pass the error on to the block's later
    columns. A column is a chain of small kernels, each writing its result in place (no allocations: a GPU
    runs the chain as a CUDA graph, see _GraphedSweeps)."""
    for i in range(start, end):
        w, q, err = W1[i], Q1[i], Err1[i]
        torch.div(w, scale, out=q).round_().add_(zero).clamp_(0, maxq)
        torch.sub(q, zero, out=offset)
        torch.addcmul(w, offset, scale, value=-1, out=err).div_(Hinv1[i, i])
        W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)  # propagate this column's error to the rest of the block


def _graph_sweeps(W: Tensor) -> bool:
    """Whether the column sweeps run as CUDA graphs: on a GPU, unless QUANTKIT_CUDA_GRAPHS=0 (to compare, or to
    rule them out: the results are the same bits either way)."""
    return W.is_cuda and os.environ.get("QUANTKIT_CUDA_GRAPHS", "1") != "0"


class _GraphedSweeps:
    """`_sweep_columns` on a GPU as CUDA graphs, one per run of columns within a full block: a group of 64
    columns is 512 kernels, which the GPU would otherwise run at the speed Python launches them (about 10 µs
    each; a 7B layer's sweeps are about 190 thousand kernels). The graphs read and write fixed buffers (a
    block's W1, Q1, Err1, its inverse-Hessian rows, the grid), which `load` and `sweep` fill. The first run of
    each kind runs eagerly, then is captured (capturing runs nothing), and replays after that: the same kernels
    on the same data, so the same bits as the eager sweep."""

    def __init__(self, n_out: int, block: int, device: torch.device):
        self.W1, self.Q1, self.Err1 = (torch.empty(block, n_out, device=device) for _ in range(3))
        self.Hinv1 = torch.empty(block, block, device=device)
        self.scale, self.zero, self.offset = (torch.empty(n_out, device=device) for _ in range(3))
        self.graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}

    def load(self, W_block: Tensor, Hinv1: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A block's columns [N, block] and its [block, block] inverse-Hessian rows; returns W1, Q1, Err1."""
        self.W1.copy_(W_block.t())
        self.Hinv1.copy_(Hinv1)
        return self.W1, self.Q1, self.Err1

    def sweep(self, start: int, end: int, scale: Tensor, zero: Tensor, maxq: int) -> None:
        self.scale.copy_(scale)
        self.zero.copy_(zero)
        key = (start, end, maxq)
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        args = (self.W1, self.Q1, self.Err1, self.Hinv1, self.scale, self.zero, self.offset, start, end, maxq)
        _sweep_columns(*args)  # this run's work, and the warm-up the capture needs
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream(self.W1.device)
        stream.wait_stream(torch.cuda.current_stream(self.W1.device))
        with torch.cuda.stream(stream):
            # thread_local: a background save freeing pinned buffers on another thread must not break the capture
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                _sweep_columns(*args)
            except BaseException:
                with contextlib.suppress(Exception):  # ending a broken capture fails too; the first error matters
                    graph.capture_end()
                raise
            graph.capture_end()
        torch.cuda.current_stream(self.W1.device).wait_stream(stream)
        self.graphs[key] = graph


PERMUTE_ROWS = 256  # rows per step of an in-place column permutation (a [256, K] temporary)


def _permute_columns_(W: Tensor, order: Tensor) -> None:
    """W[:, j] ← W[:, order[j]] in place, a block of rows at a time: each row's permutation is its own, so the
    temporary is [PERMUTE_ROWS, K] rather than a second W (a 7B gate/up stack is 344 MB in float32, its
    down_proj's Hessian 462 MB). W may be a transposed view (then its rows are the memory's columns)."""
    for start in range(0, W.shape[0], PERMUTE_ROWS):
        rows = W[start:start + PERMUTE_ROWS]
        rows.copy_(rows.index_select(1, order))


def _shift_to_asymmetric_target_(W: Tensor, cross: Tensor, Xinv: Tensor, order: Tensor) -> None:
    """W += W·C·H⁻¹ in place, a block of rows at a time. Xinv is the solve's factor of H permuted by `order`
    (H[order][:, order] = (XinvᵀXinv)⁻¹, _reversed_inverse_factor), so for B = W·C,
    B·H⁻¹ = (B[:, order]·Xinvᵀ·Xinv)[:, order⁻¹]. Xinv is lower triangular with zeros above: plain matmuls."""
    C = cross.float()
    for start in range(0, W.shape[0], SHIFT_ROWS):
        rows = W[start:start + SHIFT_ROWS]
        shift = (rows @ C)[:, order]
        shift = (shift @ Xinv.mT) @ Xinv
        rows.index_add_(1, order, shift)
        del shift


def _block_size(group_size: int, n_in: int) -> int:
    """Lazy-update block size whose starts coincide with group starts, so group params see current weights."""
    if group_size >= n_in:
        return 128
    if group_size <= 128:
        return group_size * (128 // group_size)
    return 128 if group_size % 128 == 0 else group_size


def gptq_quantize(weight: Tensor, hessian: Tensor, spec: QuantSpec, consume_hessian: bool = False,
                  cross: Tensor | None = None) -> GPTQResult:
    """Quantize one weight [N, K] given the Hessian [K, K] of its inputs. Computes in float32; the weight is
    untouched, and so is the Hessian unless consume_hessian (then its memory is reused: one [K, K] less).
    cross: GPTAQ's cross term (see gptq_quantize_shared)."""
    return gptq_quantize_shared([weight], hessian, spec, consume_hessian, cross)[0]


@torch.no_grad()
def gptq_quantize_shared(weights: list[Tensor], hessian: Tensor, spec: QuantSpec,
                         consume_hessian: bool = False, cross: Tensor | None = None) -> list[GPTQResult]:
    """Quantize Linears that read the same input (q/k/v, gate/up), so share one Hessian, in a single solve.

    GPTQ treats every output row on its own given H, so solving the stacked rows gives each Linear its own
    result, with one column sweep instead of one per Linear (the sweep is a chain of small steps: on a GPU
    its kernel launches, not its FLOPs, set the time). consume_hessian: overwrite a float32 `hessian` in place
    instead of copying it.

    cross (GPTAQ, asymmetric calibration; Li et al. 2025): the cross term C = 2·(X̃ - X)ᵀX / n of the unquantized
    model's inputs X̃ and the quantized model's X (accumulate_cross). The solve then quantizes the weights that best
    reproduce the unquantized outputs W·X̃ from X, W' = W·X̃·Xᵀ·(X·Xᵀ)⁻¹ = W + W·C·H⁻¹, with H⁻¹ damped exactly as
    the solve damps it (raised damping included) and taken from the solve's own factor: no second Hessian. As W'
    is that least-squares fit, |W·X̃ - Q·X|² = |W·X̃ - W'·X|² + |(W' - Q)·X|² for every Q, so GPTQ on W' minimises
    the error against the unquantized model itself."""
    H = hessian.float()  # [K, K]
    if H is hessian and not consume_hessian:
        H = H.clone()
    n_in = H.shape[0]
    ends = list(itertools.accumulate(w.shape[0] for w in weights))
    rows_of = [slice(end - w.shape[0], end) for w, end in zip(weights, ends)]  # each Linear's rows of the stack
    n_out = ends[-1]
    group = spec.effective_group_size(n_in)
    n_groups = math.ceil(n_in / group)

    # the largest magnitude is NaN or inf exactly when an entry is; one reduction, where isfinite(H).all() made
    # temporaries of 1.75x H's size (abs, three boolean masks): the peak of a whole 7B run on a GPU
    if not torch.isfinite(torch.linalg.vector_norm(H, float("inf"))):
        raise NumericalError("the Hessian holds NaN/Inf: this layer's calibration inputs are not finite "
                             "(activations overflowing float16?)")
    if cross is not None and not torch.isfinite(torch.linalg.vector_norm(cross, float("inf"))):
        raise NumericalError("GPTAQ's cross term holds NaN/Inf: the unquantized model's calibration inputs to this "
                             "layer are not finite (activations overflowing float16?)")
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0  # an input that is always zero: its column is zero, any positive curvature will do
    perm = torch.argsort(H.diagonal(), descending=True) if spec.act_order else None
    # H in the reverse of the order the columns are solved in (see _reversed_inverse_factor), with the act-order
    # permutation: H[i, j] <- H[order[i], order[j]], in place
    order = (perm if perm is not None else torch.arange(n_in, device=H.device)).flip(0)
    _permute_columns_(H, order)
    _permute_columns_(H.mT, order)  # the rows: a row of H.mT is a column of H
    Xinv, damp = _reversed_inverse_factor(H, spec.damp)
    del H

    # the weights stacked, in float32, copied straight into place (a 7B gate/up stack is 344 MB)
    W = torch.empty(n_out, n_in, device=weights[0].device)
    for w, rows in zip(weights, rows_of):
        W[rows].copy_(w)
    if cross is not None:
        _shift_to_asymmetric_target_(W, cross, Xinv, order)
    W[:, dead] = 0.0
    static_params = None
    if spec.static_groups:  # fixed per group in original order, before any column is updated
        static_params = [group_qparams(W[:, g * group:(g + 1) * group], spec.bits, spec.sym, spec.clip_search) for g in range(n_groups)]
    if perm is not None:
        _permute_columns_(W, perm)

    codes = torch.zeros(n_out, n_in, dtype=torch.uint8, device=W.device)  # up to 8 bits: a quarter of int32's memory
    losses = torch.zeros(n_out, device=W.device)
    scales = torch.zeros(n_out, n_groups, device=W.device)
    zeros = torch.zeros(n_out, n_groups, device=W.device)
    # group of each (permuted) column: static groups follow original positions, otherwise permuted order
    col_group = torch.arange(n_in, device=W.device) // group
    if perm is not None and static_params is not None:
        col_group = perm // group
    scale = zero = None
    block = _block_size(group, n_in)
    static_cols = col_group.tolist() if static_params is not None else None  # no GPU sync per column
    # a finished block's columns of W are read no more: the dequantized weight (what the files reproduce) takes
    # their place, so the solve holds no [N, K] tensors beyond W and the codes
    offset = torch.empty(n_out, device=W.device)  # q - zero of the current column
    # a GPU runs the column sweeps of full blocks as CUDA graphs; static groups change the grid every column
    graphed = _GraphedSweeps(n_out, block, W.device) if _graph_sweeps(W) and static_params is None else None
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        Hrows = _upper_rows(Xinv, i1, i2)  # [block, K - i1]: this block's rows of the inverse Hessian's factor
        # The block is held transposed, [columns, N]: each column's steps then read and write contiguous memory
        # (a column of an [N, block] tensor touches one cache line per row: 3x slower on a CPU).
        sweeps = graphed if graphed is not None and i2 - i1 == block else None  # graphs are of full blocks
        if sweeps is not None:
            W1, Q1, Err1 = sweeps.load(W[:, i1:i2], Hrows[:, :block])
        else:
            W1 = W[:, i1:i2].t().contiguous()
            Q1 = torch.empty_like(W1)    # the block's codes
            Err1 = torch.empty_like(W1)  # (w - dequantized) / d per column: what the block passes on
        Hinv1 = Hrows[:, :i2 - i1]
        i = 0
        while i < i2 - i1:  # runs of columns that share their grid (scale, zero)
            col = i1 + i
            if static_cols is not None:
                g = static_cols[col]
                scale, zero = static_params[g]
                scales[:, g], zeros[:, g] = scale, zero
                run = 1
            else:
                if col % group == 0:  # first column of a group: block starts align with groups, W1 is current
                    cols = W[:, col:col + group] if i == 0 else W1[i:i + group].t()
                    scale, zero = group_qparams(cols, spec.bits, spec.sym, spec.clip_search)
                    scales[:, col // group], zeros[:, col // group] = scale, zero
                run = min(group - col % group, i2 - i1 - i)
            if sweeps is not None:
                sweeps.sweep(i, i + run, scale, zero, spec.maxq)
            else:
                _sweep_columns(W1, Q1, Err1, Hinv1, scale, zero, offset, i, i + run, spec.maxq)
            i += run
        losses += Err1.pow(2).sum(dim=0) / 2  # (w - q)^2 / d^2 / 2 summed over the block's columns
        W[:, i2:].addmm_(Err1.t(), Hrows[:, i2 - i1:], alpha=-1)  # in place: no [N, K] temporary per block
        original = slice(i1, i2) if perm is None else perm[i1:i2]
        codes[:, original] = Q1.t().to(torch.uint8)  # exact: small whole numbers
        in_block = col_group[i1:i2]
        W[:, i1:i2] = dequantize_codes(Q1.t(), scales[:, in_block], zeros[:, in_block])
    dequantized = W
    if perm is not None:
        inverse = torch.argsort(perm)
        _permute_columns_(dequantized, inverse)
        col_group = col_group[inverse]
    g_idx = col_group.to(torch.int32)
    total = float(losses.sum())
    if not math.isfinite(total):
        raise NumericalError(f"GPTQ loss is not finite ({total}); the layer's inputs or weights hold NaN/Inf")
    zeros = zeros.to(torch.int32)
    results = []
    for rows in rows_of:  # each Linear's rows of the stacked solve (views; g_idx its own, as each is written alone)
        results.append(GPTQResult(codes=codes[rows], scales=scales[rows], zeros=zeros[rows],
                                  g_idx=g_idx if len(weights) == 1 else g_idx.clone(), weight=dequantized[rows],
                                  loss=float(losses[rows].sum()), damp=damp))
    return results


def rtn_result(weight: Tensor, spec: QuantSpec) -> GPTQResult:
    """Round-to-nearest (no calibration) in the solver's result form, so both write through the same path."""
    codes, scales, zeros = rtn_quantize(weight, spec.bits, spec.group_size, spec.sym, spec.clip_search)
    k = weight.shape[1]
    g_idx = (torch.arange(k) // spec.effective_group_size(k)).to(torch.int32)
    return GPTQResult(codes=codes.cpu(), scales=scales.cpu(), zeros=zeros.cpu(), g_idx=g_idx, weight=None, loss=0.0,
                      damp=spec.damp)
