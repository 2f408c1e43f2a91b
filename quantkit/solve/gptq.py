"""GPTQ (Frantar et al. 2022, Algorithm 1) as pure functions: tensors in, a result out. No I/O, no modules."""
from __future__ import annotations

import contextlib
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


def _sweep_columns(W1: Tensor, Q1: Tensor, Err1: Tensor, Hinv1: Tensor, scale: Tensor, zero: Tensor,
                   offset: Tensor, start: int, end: int, maxq: int) -> None:
    """GPTQ's inner loop over columns start..end-1 of a block, for a batch of B solves at once: round each column,
    keep its code in Q1 and its scaled error in Err1, and pass the error on to the block's later columns. The
    block is held column first, W1 [block, B, N] (a column of every solve is one contiguous [B, N]), its inverse
    Hessian rows as Hinv1 [block, block, B, 1], the grid as scale, zero [B, N]: each step indexes by integers
    alone, and B = 1 is the plain solve's memory. A column is a chain of small kernels, each writing its result
    in place (no allocations: a GPU runs the chain as a CUDA graph, see _GraphedSweeps), whatever B is:
    batching solves divides the launches by B."""
    for i in range(start, end):
        w, q, err = W1[i], Q1[i], Err1[i]
        torch.div(w, scale, out=q).round_().add_(zero).clamp_(0, maxq)
        torch.sub(q, zero, out=offset)
        torch.addcmul(w, offset, scale, value=-1, out=err).div_(Hinv1[i, i])
        W1[i:].addcmul_(Hinv1[i, i:], err, value=-1)  # this column's error, to the rest of the block


def _graph_sweeps(W: Tensor) -> bool:
    """Whether the column sweeps run as CUDA graphs: on a GPU, unless QUANTKIT_CUDA_GRAPHS=0 (to compare, or to
    rule them out: the results are the same bits either way)."""
    return W.is_cuda and os.environ.get("QUANTKIT_CUDA_GRAPHS", "1") != "0"


class _GraphedSweeps:
    """`_sweep_columns` on a GPU as CUDA graphs, one per run of columns within a full block: a column is eight
    small kernels, which the GPU would otherwise run at the speed Python launches them. The graphs read and write
    fixed buffers (a block's W1, Q1, Err1, its inverse-Hessian rows, the grid, for a batch of solves), which
    `load` and `sweep` fill. The first run of each kind runs eagerly, then is captured (capturing runs nothing),
    and replays after that: the same kernels on the same data, so the same bits as the eager sweep."""

    def __init__(self, batch: int, n_out: int, block: int, device: torch.device) -> None:
        self.W1, self.Q1, self.Err1 = (torch.empty(block, batch, n_out, device=device) for _ in range(3))
        self.Hinv1 = torch.empty(block, block, batch, 1, device=device)
        self.scale, self.zero, self.offset = (torch.empty(batch, n_out, device=device) for _ in range(3))
        self.graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}

    def load(self, W_block: Tensor, Hinv1: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A block's columns [B, N, block] and its inverse-Hessian rows (_sweep_columns' layouts); returns W1, Q1,
        Err1."""
        self.W1.copy_(W_block.permute(2, 0, 1))
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
    p = prepare_solve(weights, hessian, spec, consume_hessian, cross)
    perm = None if p.perm is None else p.perm.unsqueeze(0)
    return _swept(p.W.unsqueeze(0), [p.Xinv], perm, [w.shape[0] for w in weights], [p.damp], spec)[0]


@torch.no_grad()
def gptq_quantize_batched(weights: list[list[Tensor]], hessians: list[Tensor],
                          spec: QuantSpec) -> list[list[GPTQResult]]:
    """gptq_quantize_shared of B independent solves of one shape at once: a Mixture-of-Experts block's experts, the
    same Linears with a Hessian each. weights[b]: solve b's Linears (each [N_i, K], the same N_i in every solve);
    hessians[b]: its float32 [K, K] Hessian, consumed (the list is emptied as each is factored in its own memory).
    The weights are stacked in float32, [B, N, K]: that and the codes are what a batch holds beyond one solve.
    The column sweep's small steps then run on every solve
    together, one chain of kernels for the batch instead of one per solve, with the same bits as solving each
    alone. Each solve keeps its own damping and act-order. Static groups follow each solve's own column order
    at every column: a batch of several needs spec.static_groups off. A solve that fails raises NumericalError
    with its index in the batch (.solve)."""
    if spec.static_groups and len(weights) > 1:
        raise ValueError("static groups are solved one at a time (gptq_quantize_shared)")
    rows, n_in, device = sum(w.shape[0] for w in weights[0]), weights[0][0].shape[1], weights[0][0].device
    W = torch.empty(len(weights), rows, n_in, device=device)
    factors: list[Tensor] = []  # each solve's inverse factor, in its Hessian's memory
    perms: list[Tensor] = []
    damps: list[float] = []
    for b, group in enumerate(weights):
        try:
            p = prepare_solve(group, hessians.pop(0), spec, consume_hessian=True)
        except NumericalError as e:
            raise NumericalError(str(e), solve=b) from None
        W[b].copy_(p.W)
        factors.append(p.Xinv)
        if p.perm is not None:
            perms.append(p.perm)
        damps.append(p.damp)
        del p  # its float32 W, before the next solve's
    perm = torch.stack(perms) if perms else None
    return _swept(W, factors, perm, [w.shape[0] for w in weights[0]], damps, spec)


def _swept(W: Tensor, Xinv: list[Tensor], perm: Tensor | None, counts: list[int], damps: list[float],
           spec: QuantSpec) -> list[list[GPTQResult]]:
    """The column sweep of a batch of prepared solves (W [B, N, K] in original column order, each solve's inverse
    factor [K, K] in solve order, perm [B, K] or None); each solve's results split into its Linears' rows
    (`counts`)."""
    group = spec.effective_group_size(W.shape[-1])
    static_grids = _static_grids(W, group, spec) if spec.static_groups else None
    if perm is not None:
        for b in range(W.shape[0]):
            permute_columns_(W[b], perm[b])
    solve = _ColumnSolve(W, Xinv, spec, group, perm, static_grids)
    solve.run()
    return _results(solve, counts, damps)


def _static_grids(W: Tensor, group: int, spec: QuantSpec) -> list[tuple[Tensor, Tensor]]:
    """Static groups: each group's grid ([B, N] each), fixed in original column order before any column is
    updated."""
    n_groups = math.ceil(W.shape[-1] / group)
    return [group_qparams(W[..., g * group:(g + 1) * group], spec.bits, spec.sym, spec.clip_search)
            for g in range(n_groups)]


def _factor_rows(factors: list[Tensor], i1: int, i2: int) -> Tensor:
    """Rows i1..i2-1 of each solve's upper factor (upper_rows), stacked [B, i2 - i1, K - i1]: a block's rows at a
    time, so that a batch never holds a second copy of its factors. Each solve's rows keep the memory order a
    single solve's have (column-major: the factor is a transposed view), so the block's product takes the same
    path through the BLAS, with the same rounding, batched or not (a single solve's are not copied again)."""
    rows = [upper_rows(X, i1, i2) for X in factors]
    return rows[0].unsqueeze(0) if len(rows) == 1 else torch.stack([r.mT for r in rows]).mT


def _by_column(params: Tensor, groups: Tensor) -> Tensor:
    """Per-group parameters [B, N, G] read at each column's group: `groups` [C] shared by the batch, or [B, C]
    per solve -> [B, N, C]."""
    if groups.dim() == 1:
        return params[:, :, groups]
    return params.gather(2, groups.unsqueeze(1).expand(-1, params.shape[1], -1))


class _ColumnSolve:
    """GPTQ's sweep over W's columns (in solve order), a lazy-update block at a time, for a batch of B solves
    (W [B, N, K]), filling in the codes (in original column order), each group's grid and each row's loss. A
    finished block's columns of W are read no more: the dequantized weight (what the files reproduce) takes
    their place, so the solve holds no [B, N, K] tensors beyond W and the codes."""

    def __init__(self, W: Tensor, Xinv: list[Tensor], spec: QuantSpec, group: int, perm: Tensor | None,
                 static_grids: list[tuple[Tensor, Tensor]] | None) -> None:
        batch, n_out, n_in = W.shape
        n_groups = math.ceil(n_in / group)
        self.W, self.Xinv, self.spec, self.group, self.perm = W, Xinv, spec, group, perm
        self.static_grids = static_grids
        self.codes = torch.zeros(batch, n_out, n_in, dtype=torch.uint8, device=W.device)  # int32's memory / 4
        self.losses = torch.zeros(batch, n_out, device=W.device)
        self.scales = torch.zeros(batch, n_out, n_groups, device=W.device)
        self.zeros = torch.zeros(batch, n_out, n_groups, device=W.device)
        # group of each (permuted) column: static groups follow original positions ([B, K]: each solve's own
        # order), otherwise the solve order ([K], shared)
        self.col_group = torch.arange(n_in, device=W.device) // group
        self.static_cols = None
        if static_grids is not None:
            if perm is not None:
                if batch > 1:
                    raise ValueError("static groups with act-order are solved one at a time")
                self.col_group = perm // group
            self.static_cols = self.col_group.reshape(-1, n_in)[0].tolist()  # no GPU sync per column
        self.block = _block_size(group, n_in)
        self.offset = torch.empty(batch, n_out, device=W.device)  # q - zero of the current column
        self.grid: tuple[Tensor, Tensor] | None = None  # (scale, zero) of the current group
        # a GPU runs the column sweeps of full blocks as CUDA graphs; static groups change the grid every column
        use_graphs = _graph_sweeps(W) and static_grids is None
        self.graphed = _GraphedSweeps(batch, n_out, self.block, W.device) if use_graphs else None

    def run(self) -> None:
        for i1 in range(0, self.W.shape[-1], self.block):
            self._solve_block(i1, min(i1 + self.block, self.W.shape[-1]))

    def _solve_block(self, i1: int, i2: int) -> None:
        W = self.W
        Hrows = _factor_rows(self.Xinv, i1, i2)  # [B, block, K - i1]: the block's rows of each inverse factor
        # The block is held column first, [columns, B, N]: each column's steps then read and write contiguous memory
        # (a column of an [N, block] tensor touches one cache line per row, which is slow on a CPU).
        Hinv1 = Hrows[:, :, :i2 - i1].permute(1, 2, 0).unsqueeze(-1)  # [block, block, B, 1]
        sweeps = self.graphed if self.graphed is not None and i2 - i1 == self.block else None  # of full blocks
        if sweeps is not None:
            W1, Q1, Err1 = sweeps.load(W[:, :, i1:i2], Hinv1)
        else:
            W1 = W[:, :, i1:i2].permute(2, 0, 1).contiguous()
            Q1 = torch.empty_like(W1)    # the block's codes
            Err1 = torch.empty_like(W1)  # (w - dequantized) / d per column: what the block passes on
            Hinv1 = Hinv1.contiguous()  # a small copy ([block, block]): each column reads its row whole
        i = 0
        while i < i2 - i1:  # runs of columns that share their grid (scale, zero)
            scale, zero, run = self._grid(i1, i, i2, W1)
            if sweeps is not None:
                sweeps.sweep(i, i + run, scale, zero, self.spec.maxq)
            else:
                _sweep_columns(W1, Q1, Err1, Hinv1, scale, zero, self.offset, i, i + run, self.spec.maxq)
            i += run
        # (w - q)^2 / d^2 / 2 summed over the block's columns, each solve's from its own contiguous [block, N] (the
        # sum a solve alone makes, bit for bit; a copy only for a batch)
        self.losses += Err1.transpose(0, 1).contiguous().pow(2).sum(dim=1) / 2
        W[:, :, i2:].baddbmm_(Err1.permute(1, 2, 0), Hrows[:, :, i2 - i1:], alpha=-1)  # in place: no temporary
        codes = Q1.permute(1, 2, 0)  # [B, N, block]
        if self.perm is None:
            self.codes[:, :, i1:i2] = codes.to(torch.uint8)  # exact: small whole numbers
        else:  # each solve's columns back to their original positions
            self.codes.scatter_(2, self.perm[:, None, i1:i2].expand(-1, W.shape[1], -1), codes.to(torch.uint8))
        in_block = self.col_group[..., i1:i2]
        W[:, :, i1:i2] = dequantize_codes(codes, _by_column(self.scales, in_block), _by_column(self.zeros, in_block))

    def _grid(self, i1: int, i: int, i2: int, W1: Tensor) -> tuple[Tensor, Tensor, int]:
        """(scale, zero, columns) of the run of columns from the block's column i on that share one grid; a run
        that starts a group computes the group's grid (block starts align with groups, so W1 is current)."""
        col = i1 + i
        if self.static_cols is not None and self.static_grids is not None:
            g = self.static_cols[col]
            self.grid = self.static_grids[g]
            self.scales[:, :, g], self.zeros[:, :, g] = self.grid
            return *self.grid, 1
        if col % self.group == 0:
            cols = self.W[:, :, col:col + self.group] if i == 0 else W1[i:i + self.group].permute(1, 2, 0)
            self.grid = group_qparams(cols, self.spec.bits, self.spec.sym, self.spec.clip_search)
            self.scales[:, :, col // self.group], self.zeros[:, :, col // self.group] = self.grid
        if self.grid is None:
            raise AssertionError("a run of columns starts inside a group before the group's first column")
        return *self.grid, min(self.group - col % self.group, i2 - i1 - i)


def _results(solve: _ColumnSolve, counts: list[int], damps: list[float]) -> list[list[GPTQResult]]:
    """Each solve's outputs in original column order, split into its Linears' rows of the stack (views; g_idx
    each one's own, as each is written alone). The losses come back to the host in one transfer."""
    dequantized, col_group = solve.W, solve.col_group
    if solve.perm is not None:
        inverse = torch.argsort(solve.perm, dim=-1)
        for b in range(dequantized.shape[0]):
            permute_columns_(dequantized[b], inverse[b])
        col_group = col_group[inverse] if col_group.dim() == 1 else col_group.gather(-1, inverse)
    g_idx = col_group.to(torch.int32)
    slices = row_slices(counts)
    losses = torch.stack([torch.stack([solve.losses[b].sum()] + [solve.losses[b, rows].sum() for rows in slices])
                          for b in range(dequantized.shape[0])]).tolist()
    zeros = solve.zeros.to(torch.int32)
    results = []
    for b, (total, *loss) in enumerate(losses):
        if not math.isfinite(total):
            raise NumericalError(f"GPTQ loss is not finite ({total}); the layer's inputs or weights hold NaN/Inf",
                                 solve=b)
        own = g_idx if g_idx.dim() == 1 else g_idx[b]
        alone = g_idx.dim() == 1 and len(counts) == 1 and dequantized.shape[0] == 1  # no other result shares it
        results.append([GPTQResult(codes=solve.codes[b, rows], scales=solve.scales[b, rows], zeros=zeros[b, rows],
                                   g_idx=own if alone else own.clone(), weight=dequantized[b, rows],
                                   loss=loss[k], damp=damps[b])
                        for k, rows in enumerate(slices)])
    return results


def rtn_result(weight: Tensor, spec: QuantSpec) -> GPTQResult:
    """Round-to-nearest (no calibration) in the solver's result form, so both write through the same path."""
    codes, scales, zeros = rtn_quantize(weight, spec.bits, spec.group_size, spec.sym, spec.clip_search)
    k = weight.shape[1]
    g_idx = (torch.arange(k) // spec.effective_group_size(k)).to(torch.int32)
    return GPTQResult(codes=codes.cpu(), scales=scales.cpu(), zeros=zeros.cpu(), g_idx=g_idx, weight=None, loss=0.0,
                      damp=spec.damp)
