"""The upper Cholesky factor of the damped inverse Hessian that GPTQ's column sweep reads, made in H's own memory."""
from __future__ import annotations

import torch
from torch import Tensor

from quantkit.errors import NumericalError

INVERSE_BLOCK = 1024  # rows per step of the triangular inverse below


def reversed_inverse_factor(H: Tensor, damp: float, tries: int = 5) -> tuple[Tensor, float]:
    """X = inv(chol(H + damp·mean(diag H)·I)), lower triangular, for H given in reversed column order, raising damp
    tenfold when H is not PD. X read in reverse is GPTQ's upper Cholesky factor of the inverse Hessian (`upper_rows`).

    Why: for J the order reversal, JHJ = L·Lᵀ gives H⁻¹ = Uᵀ·U with U = J·L⁻¹·J upper triangular, the factor GPTQ
    needs. One Cholesky and one triangular inverse cost 2K³/3 flops, against 4K³/3 for the reference's Cholesky,
    inverse from it and second Cholesky.

    Both run in H's own memory, with no [K, K] temporary: X is returned as a view of it. The factor is written
    through H's transpose, a column-major view that LAPACK and cuSOLVER take as it is (H is symmetric, so the view
    holds the same matrix); written into H itself, torch would factor a column-major copy and copy it back. A copy
    of H for a retry with more damping waits in host memory (pinned and copied asynchronously from a GPU)."""
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


def upper_rows(X: Tensor, i1: int, i2: int) -> Tensor:
    """Rows i1..i2-1, columns i1.. of U = J·X·J (the upper Cholesky factor of H⁻¹; X from reversed_inverse_factor),
    of each factor in a batch [..., K, K]."""
    k = X.shape[-1]
    return X[..., k - i2:k - i1, :k - i1].flip(-2, -1)
