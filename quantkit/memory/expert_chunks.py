"""How many of a Mixture-of-Experts layer's experts one calibration pass handles: the Hessians of that many experts
are what a pass holds, so peak memory follows the chunk, not the number of experts."""
from __future__ import annotations

from quantkit.config import EXPERT_HESSIAN_BUDGET


def expert_hessian_bytes(in_features: int, itemsize: int) -> int:
    """One expert Linear group's Hessian, [in, in], of `itemsize` bytes an entry while it is summed
    (solve.hessian.hessian_itemsize)."""
    return in_features * in_features * itemsize


def expert_chunk(n_experts: int, widest_input: int, itemsize: int, chosen: int = 0,
                 budget: int = EXPERT_HESSIAN_BUDGET) -> int:
    """Experts per calibration pass: `chosen` when given (QuantSpec.expert_chunk), else as many as `budget` bytes of
    Hessians of the widest expert input hold (itemsize: bytes an entry); at least one, at most all."""
    if n_experts <= 0:
        return 0
    per_pass = chosen if chosen > 0 else budget // expert_hessian_bytes(max(widest_input, 1), itemsize)
    return max(1, min(n_experts, per_pass))
