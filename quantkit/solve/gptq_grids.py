"""GPTQ onto fixed block grids (llama.cpp's GGUF types): every block's scale and bias chosen first, as llama.cpp
would choose them, then GPTQ's error-feedback sweep picks each weight's code on its block's grid. Pure tensor math.

The grids are fixed before the sweep, as GPTQ's static groups are, so the file holds exactly llama.cpp's format
and any column order is allowed (act-order included): a column's grid is its block's, wherever the sweep meets it.
The value of code c is float32(scale·c + bias) (ggml_grids.BlockGrid.affine), the value llama.cpp and gguf read
back, so the error each column passes on is the file's error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from quantkit.config import QuantSpec
from quantkit.errors import NumericalError
from quantkit.solve.ggml_grids import BlockGrid, choose_grid
from quantkit.solve.inverse_factor import upper_rows
from quantkit.solve.prepare import permute_columns_, prepare_solve, row_slices

SWEEP_BLOCK = 128  # columns per lazy-update block
UNIT = 16  # the finest group any ggml type has (Q6_K's sub-blocks); coarser groups are repeated to it


@dataclass(frozen=True)
class GridResult:
    codes: Tensor  # uint8 [N, K] in 0..grid.type.maxq, original column order
    grid: BlockGrid  # the block parameters, fixed before the sweep
    weight: Tensor | None  # float32 [N, K], the values the file holds; None once kept
    loss: float  # sum over rows of (w - q)^2 / [H^-1]_jj^2 / 2, GPTQ's objective
    damp: float  # damping actually used


@torch.no_grad()
def gptq_on_grids(weights: list[Tensor], hessian: Tensor, types: list[str], spec: QuantSpec,
                  consume_hessian: bool = False, cross: Tensor | None = None,
                  weighted: bool = True) -> list[GridResult]:
    """GPTQ of Linears that share `hessian`, each onto blocks of its ggml type (types[i] for weights[i]).

    Each Linear's grid is chosen from its weights (GPTAQ's target with a cross term) as llama.cpp chooses it; with
    `weighted`, weighted by the Hessian's diagonal (the inputs' mean square, what llama.cpp's importance matrix
    holds), else as llama.cpp does without one. spec supplies damp and act_order; bits and groups are the types'."""
    if len(types) != len(weights):
        raise ValueError(f"{len(weights)} weights but {len(types)} ggml types")
    prepared = prepare_solve(weights, hessian, spec, consume_hessian, cross)
    W, perm = prepared.W, prepared.perm
    slices = row_slices([w.shape[0] for w in weights])
    importance = prepared.importance if weighted else None
    grids = [choose_grid(W[rows], name, importance) for rows, name in zip(slices, types)]
    affine = [g.affine() for g in grids]
    scale = torch.cat([_per_unit(s, g) for (s, _), g in zip(affine, grids)]).to(W.device)
    bias = torch.cat([_per_unit(b, g) for (_, b), g in zip(affine, grids)]).to(W.device)
    maxq = torch.cat([torch.full((rows.stop - rows.start,), float(g.type.maxq)) for rows, g in zip(slices, grids)])
    if perm is not None:
        permute_columns_(W, perm)
    order = perm if perm is not None else torch.arange(W.shape[1], device=W.device)
    codes, losses = _sweep(W, prepared.Xinv, order, scale, bias, maxq.to(W.device))
    if perm is not None:
        permute_columns_(W, torch.argsort(perm))
    total = float(losses.sum())
    if not torch.isfinite(losses).all():
        raise NumericalError(f"GPTQ loss is not finite ({total}); the layer's inputs or weights hold NaN/Inf")
    return [GridResult(codes=codes[rows], grid=g, weight=W[rows], loss=float(losses[rows].sum()), damp=prepared.damp)
            for rows, g in zip(slices, grids)]


def _per_unit(t: Tensor, grid: BlockGrid) -> Tensor:
    """[N, K/group] -> [N, K/UNIT], each group's value repeated over its UNIT-wide parts."""
    if grid.type.group % UNIT:
        raise ValueError(f"{grid.type.name}'s group of {grid.type.group} is not a multiple of {UNIT}")
    return t.float().repeat_interleave(grid.type.group // UNIT, dim=1)


def _sweep(W: Tensor, Xinv: Tensor, order: Tensor, scale: Tensor, bias: Tensor,
           maxq: Tensor) -> tuple[Tensor, Tensor]:
    """GPTQ's sweep over W's columns (in solve order; order[j] is column j's original position), a block at a
    time: each column rounded onto its own blocks' grids, its error passed on to the later columns. W ends as the
    values the codes stand for. Returns (codes uint8 [N, K] in original order, each row's loss)."""
    n_out, n_in = W.shape
    codes = torch.zeros(n_out, n_in, dtype=torch.uint8, device=W.device)
    losses = torch.zeros(n_out, device=W.device)
    q, value = torch.empty(n_out, device=W.device), torch.empty(n_out, device=W.device)
    for i1 in range(0, n_in, SWEEP_BLOCK):
        i2 = min(i1 + SWEEP_BLOCK, n_in)
        Hrows = upper_rows(Xinv, i1, i2)
        units = order[i1:i2] // UNIT
        S1, B1 = scale[:, units].t().contiguous(), bias[:, units].t().contiguous()  # [block, N]
        D1 = torch.where(S1 == 0, torch.ones_like(S1), S1)  # a zero scale: every code is worth `bias`
        W1 = W[:, i1:i2].t().contiguous()
        Q1, Err1 = torch.empty_like(W1), torch.empty_like(W1)
        for i in range(i2 - i1):
            torch.sub(W1[i], B1[i], out=q).div_(D1[i]).round_().clamp_(min=0)
            torch.minimum(q, maxq, out=Q1[i])
            torch.mul(Q1[i], S1[i], out=value).add_(B1[i])
            torch.sub(W1[i], value, out=Err1[i]).div_(Hrows[i, i])
            W1[i:].addr_(Hrows[i, i:i2 - i1], Err1[i], alpha=-1)
        losses += Err1.pow(2).sum(dim=0) / 2
        W[:, i2:].addmm_(Err1.t(), Hrows[:, i2 - i1:], alpha=-1)
        codes[:, order[i1:i2]] = Q1.t().to(torch.uint8)
        W[:, i1:i2] = (Q1 * S1 + B1).t()
    return codes, losses
