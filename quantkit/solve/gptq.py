"""GPTQ (Frantar et al. 2022, Algorithm 1) as pure functions: tensors in, a result out. No I/O, no modules."""
from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from quantkit.config import QuantSpec
from quantkit.errors import NumericalError
from quantkit.solve.grid import dequantize_codes, group_qparams, rtn_quantize
from quantkit.solve.inverse_factor import upper_rows
from quantkit.solve.prepare import permute_columns_, prepare_solve, row_slices


@dataclass(frozen=True)
class GPTQResult:
    codes: Tensor       # uint8 [N, K], values in [0, 2**bits), original column order
    scales: Tensor      # float32 [N, G], float16-representable
    zeros: Tensor       # int32 [N, G]
    g_idx: Tensor       # int32 [K], group of each input channel
    weight: Tensor | None  # float32 [N, K], the dequantized result (what the files reproduce); None once kept
    loss: float         # sum over rows of (w - q)^2 / [H^-1]_jj^2 / 2, GPTQ's objective
    damp: float         # damping actually used (more than requested after a retry)

    def cpu(self) -> GPTQResult:
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
    """`_sweep_columns` on a GPU as CUDA graphs, one per run of columns within a full block: a column is eight
    small kernels, which the GPU would otherwise run at the speed Python launches them. The graphs read and write
    fixed buffers (a block's W1, Q1, Err1, its inverse-Hessian rows, the grid), which `load` and `sweep` fill. The
    first run of each kind runs eagerly, then is captured (capturing runs nothing), and replays after that: the
    same kernels on the same data, so the same bits as the eager sweep."""

    def __init__(self, n_out: int, block: int, device: torch.device) -> None:
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
        """`_sweep_columns` over the loaded block's columns start..end-1 on the grid (scale, zero)."""
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
    prepared = prepare_solve(weights, hessian, spec, consume_hessian, cross)
    W, perm = prepared.W, prepared.perm
    group = spec.effective_group_size(W.shape[1])
    static_grids = _static_grids(W, group, spec) if spec.static_groups else None
    if perm is not None:
        permute_columns_(W, perm)
    solve = _ColumnSolve(W, prepared.Xinv, spec, group, perm, static_grids)
    solve.run()
    return _results(solve, [w.shape[0] for w in weights], prepared.damp)


def _static_grids(W: Tensor, group: int, spec: QuantSpec) -> list[tuple[Tensor, Tensor]]:
    """Static groups: each group's grid, fixed in original column order before any column is updated."""
    n_groups = math.ceil(W.shape[1] / group)
    return [group_qparams(W[:, g * group:(g + 1) * group], spec.bits, spec.sym, spec.clip_search)
            for g in range(n_groups)]


class _ColumnSolve:
    """GPTQ's sweep over W's columns (in solve order), a lazy-update block at a time, filling in the codes (in
    original column order), each group's grid and each row's loss. A finished block's columns of W are read no
    more: the dequantized weight (what the files reproduce) takes their place, so the solve holds no [N, K]
    tensors beyond W and the codes."""

    def __init__(self, W: Tensor, Xinv: Tensor, spec: QuantSpec, group: int, perm: Tensor | None,
                 static_grids: list[tuple[Tensor, Tensor]] | None) -> None:
        n_out, n_in = W.shape
        n_groups = math.ceil(n_in / group)
        self.W, self.Xinv, self.spec, self.group, self.perm = W, Xinv, spec, group, perm
        self.static_grids = static_grids
        self.codes = torch.zeros(n_out, n_in, dtype=torch.uint8, device=W.device)  # up to 8 bits: int32's memory / 4
        self.losses = torch.zeros(n_out, device=W.device)
        self.scales = torch.zeros(n_out, n_groups, device=W.device)
        self.zeros = torch.zeros(n_out, n_groups, device=W.device)
        # group of each (permuted) column: static groups follow original positions, otherwise permuted order
        self.col_group = torch.arange(n_in, device=W.device) // group
        if perm is not None and static_grids is not None:
            self.col_group = perm // group
        self.block = _block_size(group, n_in)
        self.static_cols = self.col_group.tolist() if static_grids is not None else None  # no GPU sync per column
        self.offset = torch.empty(n_out, device=W.device)  # q - zero of the current column
        self.grid: tuple[Tensor, Tensor] | None = None  # (scale, zero) of the current group
        # a GPU runs the column sweeps of full blocks as CUDA graphs; static groups change the grid every column
        use_graphs = _graph_sweeps(W) and static_grids is None
        self.graphed = _GraphedSweeps(n_out, self.block, W.device) if use_graphs else None

    def run(self) -> None:
        for i1 in range(0, self.W.shape[1], self.block):
            self._solve_block(i1, min(i1 + self.block, self.W.shape[1]))

    def _solve_block(self, i1: int, i2: int) -> None:
        W = self.W
        Hrows = upper_rows(self.Xinv, i1, i2)  # [block, K - i1]: this block's rows of the inverse Hessian's factor
        # The block is held transposed, [columns, N]: each column's steps then read and write contiguous memory
        # (a column of an [N, block] tensor touches one cache line per row, which is slow on a CPU).
        sweeps = self.graphed if self.graphed is not None and i2 - i1 == self.block else None  # of full blocks
        if sweeps is not None:
            W1, Q1, Err1 = sweeps.load(W[:, i1:i2], Hrows[:, :self.block])
        else:
            W1 = W[:, i1:i2].t().contiguous()
            Q1 = torch.empty_like(W1)    # the block's codes
            Err1 = torch.empty_like(W1)  # (w - dequantized) / d per column: what the block passes on
        Hinv1 = Hrows[:, :i2 - i1]
        i = 0
        while i < i2 - i1:  # runs of columns that share their grid (scale, zero)
            scale, zero, run = self._grid(i1, i, i2, W1)
            if sweeps is not None:
                sweeps.sweep(i, i + run, scale, zero, self.spec.maxq)
            else:
                _sweep_columns(W1, Q1, Err1, Hinv1, scale, zero, self.offset, i, i + run, self.spec.maxq)
            i += run
        self.losses += Err1.pow(2).sum(dim=0) / 2  # (w - q)^2 / d^2 / 2 summed over the block's columns
        W[:, i2:].addmm_(Err1.t(), Hrows[:, i2 - i1:], alpha=-1)  # in place: no [N, K] temporary per block
        original = slice(i1, i2) if self.perm is None else self.perm[i1:i2]
        self.codes[:, original] = Q1.t().to(torch.uint8)  # exact: small whole numbers
        in_block = self.col_group[i1:i2]
        W[:, i1:i2] = dequantize_codes(Q1.t(), self.scales[:, in_block], self.zeros[:, in_block])

    def _grid(self, i1: int, i: int, i2: int, W1: Tensor) -> tuple[Tensor, Tensor, int]:
        """(scale, zero, columns) of the run of columns from the block's column i on that share one grid; a run
        that starts a group computes the group's grid (block starts align with groups, so W1 is current)."""
        col = i1 + i
        if self.static_cols is not None and self.static_grids is not None:
            g = self.static_cols[col]
            self.grid = self.static_grids[g]
            self.scales[:, g], self.zeros[:, g] = self.grid
            return *self.grid, 1
        if col % self.group == 0:
            cols = self.W[:, col:col + self.group] if i == 0 else W1[i:i + self.group].t()
            self.grid = group_qparams(cols, self.spec.bits, self.spec.sym, self.spec.clip_search)
            self.scales[:, col // self.group], self.zeros[:, col // self.group] = self.grid
        if self.grid is None:
            raise AssertionError("a run of columns starts inside a group before the group's first column")
        return *self.grid, min(self.group - col % self.group, i2 - i1 - i)


def _results(solve: _ColumnSolve, counts: list[int], damp: float) -> list[GPTQResult]:
    """The solve's outputs in original column order, split into each Linear's rows of the stack (views; g_idx its
    own, as each is written alone)."""
    dequantized, col_group = solve.W, solve.col_group
    if solve.perm is not None:
        inverse = torch.argsort(solve.perm)
        permute_columns_(dequantized, inverse)
        col_group = col_group[inverse]
    g_idx = col_group.to(torch.int32)
    total = float(solve.losses.sum())
    if not math.isfinite(total):
        raise NumericalError(f"GPTQ loss is not finite ({total}); the layer's inputs or weights hold NaN/Inf")
    zeros = solve.zeros.to(torch.int32)
    return [GPTQResult(codes=solve.codes[rows], scales=solve.scales[rows], zeros=zeros[rows],
                       g_idx=g_idx if len(counts) == 1 else g_idx.clone(), weight=dequantized[rows],
                       loss=float(solve.losses[rows].sum()), damp=damp)
            for rows in row_slices(counts)]


def rtn_result(weight: Tensor, spec: QuantSpec) -> GPTQResult:
    """Round-to-nearest (no calibration) in the solver's result form, so both write through the same path."""
    codes, scales, zeros = rtn_quantize(weight, spec.bits, spec.group_size, spec.sym, spec.clip_search)
    k = weight.shape[1]
    g_idx = (torch.arange(k) // spec.effective_group_size(k)).to(torch.int32)
    return GPTQResult(codes=codes.cpu(), scales=scales.cpu(), zeros=zeros.cpu(), g_idx=g_idx, weight=None, loss=0.0,
                      damp=spec.damp)
