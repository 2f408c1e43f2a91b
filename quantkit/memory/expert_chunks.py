"""How many of a Mixture-of-Experts layer's experts one calibration pass handles: the Hessians of that many experts
are what a pass holds, so peak memory follows the chunk, not the number of experts."""
from __future__ import annotations

from quantkit.config import EXPERT_HESSIAN_BUDGET

HESSIAN_ITEMSIZE = 4  # Hessians are summed in float32


def expert_hessian_bytes(in_features: int) -> int:
    """One expert Linear group's float32 Hessian, [in, in]."""
    return in_features * in_features * HESSIAN_ITEMSIZE


def expert_chunk(n_experts: int, widest_input: int, chosen: int = 0, budget: int = EXPERT_HESSIAN_BUDGET) -> int:
    """Experts per calibration pass: `chosen` when given (QuantSpec.expert_chunk), else as many as `budget` bytes of
    Hessians of the widest expert input hold; at least one, at most all."""
    if n_experts <= 0:
        return 0
    per_pass = chosen if chosen > 0 else budget // expert_hessian_bytes(max(widest_input, 1))
    return max(1, min(n_experts, per_pass))
