"""The start every GPTQ column sweep shares: the Hessian checked, permuted into solve order and factored, the
weights stacked and shifted to GPTAQ's target. Pure tensor math."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from quantkit.config import QuantSpec
from quantkit.errors import NumericalError
from quantkit.solve.inverse_factor import reversed_inverse_factor

SHIFT_ROWS = 1024  # weight rows per step of GPTAQ's shift: its temporaries are [SHIFT_ROWS, K]
PERMUTE_ROWS = 256  # rows per step of an in-place column permutation (a [PERMUTE_ROWS, K] temporary)


def permute_columns_(W: Tensor, order: Tensor) -> None:
    """W[:, j] ← W[:, order[j]] in place, a block of rows at a time: each row's permutation is its own, so the
    temporary is [PERMUTE_ROWS, K] rather than a second W (or a second Hessian). W may be a transposed view (then
    its rows are the memory's columns)."""
    for start in range(0, W.shape[0], PERMUTE_ROWS):
        rows = W[start:start + PERMUTE_ROWS]
        rows.copy_(rows.index_select(1, order))


def shift_to_asymmetric_target_(W: Tensor, cross: Tensor, Xinv: Tensor, order: Tensor) -> None:
    """W += W·C·H⁻¹ in place, a block of rows at a time. Xinv is the solve's factor of H permuted by `order`
    (H[order][:, order] = (XinvᵀXinv)⁻¹, reversed_inverse_factor), so for B = W·C,
    B·H⁻¹ = (B[:, order]·Xinvᵀ·Xinv)[:, order⁻¹]. Xinv is lower triangular with zeros above: plain matmuls."""
    C = cross.float()
    for start in range(0, W.shape[0], SHIFT_ROWS):
        rows = W[start:start + SHIFT_ROWS]
        shift = (rows @ C)[:, order]
        shift = (shift @ Xinv.mT) @ Xinv
        rows.index_add_(1, order, shift)
        del shift




@dataclass
class PreparedSolve:
    """What every column sweep starts from: the weights to solve and the factor of their inverse Hessian."""
    W: Tensor  # float32 [N, K]: the Linears' rows stacked (GPTAQ's target), always-zero inputs' columns zeroed
    Xinv: Tensor  # reversed_inverse_factor of H, permuted into solve order (see upper_rows)
    perm: Tensor | None  # act-order: the solve order of the columns (W is still in original order)
    damp: float  # damping actually used
    importance: Tensor  # float32 [K]: H's diagonal before damping, 2·mean(x²) of each input over the tokens


def prepare_solve(weights: list[Tensor], hessian: Tensor, spec: QuantSpec, consume_hessian: bool = False,
                  cross: Tensor | None = None) -> PreparedSolve:
    """The start of gptq_quantize_shared, shared by every sweep: the Hessian checked, its always-zero inputs given
    curvature 1, permuted into solve order (act-order: by decreasing diagonal) and factored; the weights stacked,
    shifted to GPTAQ's target (cross), and their always-zero inputs' columns zeroed."""
    H = hessian.float()  # [K, K]
    if H is hessian and not consume_hessian:
        H = H.clone()
    _check_finite(H, cross)
    importance = H.diagonal().clone()
    dead = importance == 0
    H.diagonal().masked_fill_(dead, 1.0)  # an input always zero: its column is zero, any positive curvature will do
    perm = torch.argsort(H.diagonal(), descending=True) if spec.act_order else None
    # H in the reverse of the order the columns are solved in (see reversed_inverse_factor), with the act-order
    # permutation: H[i, j] <- H[order[i], order[j]], in place
    order = (perm if perm is not None else torch.arange(H.shape[0], device=H.device)).flip(0)
    permute_columns_(H, order)
    permute_columns_(H.mT, order)  # the rows: a row of H.mT is a column of H
    Xinv, damp = reversed_inverse_factor(H, spec.damp)
    del H

    W = _stacked(weights)
    if cross is not None:
        shift_to_asymmetric_target_(W, cross, Xinv, order)
    W.masked_fill_(dead, 0.0)  # a mask, not an index: no wait on a GPU for the count of dead inputs
    return PreparedSolve(W=W, Xinv=Xinv, perm=perm, damp=damp, importance=importance)


def _check_finite(H: Tensor, cross: Tensor | None) -> None:
    """Refuse a Hessian or cross term that holds NaN or inf. The largest magnitude is NaN or inf exactly when an
    entry is: one reduction, where isfinite(H).all() would make temporaries larger than H (abs, boolean masks)."""
    if not torch.isfinite(torch.linalg.vector_norm(H, float("inf"))):
        raise NumericalError("the Hessian holds NaN/Inf: this layer's calibration inputs are not finite "
                             "(activations overflowing float16?)")
    if cross is not None and not torch.isfinite(torch.linalg.vector_norm(cross, float("inf"))):
        raise NumericalError("GPTAQ's cross term holds NaN/Inf: the unquantized model's calibration inputs to this "
                             "layer are not finite (activations overflowing float16?)")


def _stacked(weights: list[Tensor]) -> Tensor:
    """The weights' rows stacked in one float32 [N, K], each copied straight into place."""
    W = torch.empty(sum(w.shape[0] for w in weights), weights[0].shape[1], device=weights[0].device)
    for w, rows in zip(weights, row_slices([w.shape[0] for w in weights])):
        W[rows].copy_(w)
    return W


def row_slices(counts: list[int]) -> list[slice]:
    """Each Linear's rows of the stack, for Linears of `counts` rows."""
    ends = list(itertools.accumulate(counts))
    return [slice(end - count, end) for count, end in zip(counts, ends)]
