"""What a decoder layer's child block returned: its first tensor, what follows it, and whether it is the output
of the block's exit Linear alone."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

Tail = tuple[Any, ...] | None  # what a block returned after its first element; None when it returned a tensor


def tail_of(output: object) -> Tail:
    """What a block returned after its first element (attention weights, ...); None when it returned a tensor."""
    return tuple(output[1:]) if isinstance(output, (tuple, list)) else None


def with_tail(first: Tensor, tail: Tail) -> Tensor | tuple[Any, ...]:
    """A block's return value rebuilt from its first tensor and its tail (`tail_of`)."""
    return first if tail is None else (first, *tail)


def first_tensor(output: object) -> Tensor | None:
    """The first tensor a block returned (the tensor itself, or the first in a tuple or list)."""
    return next((t for t in (output if isinstance(output, (tuple, list)) else [output]) if isinstance(t, Tensor)), None)


def is_exit_output(real: object, derived: Tensor, kept: Tensor) -> bool:
    """Whether a block returned its exit Linear's output and nothing else but None beside it: equal up to the
    rounding of a 16-bit kept input, or for a float32 one up to the order of the matmul's sums (the kept input
    is contiguous where the block's own may not be), which grows with sqrt(in_features). Anything the block
    does after its exit Linear (a scale, an added term, a norm) is far outside that."""
    first = real[0] if isinstance(real, (tuple, list)) else real
    rest = real[1:] if isinstance(real, (tuple, list)) else ()
    if not isinstance(first, Tensor) or any(r is not None for r in rest) or first.shape != derived.shape:
        return False
    tolerance = 4 * max(torch.finfo(kept.dtype).eps, torch.finfo(torch.float32).eps * math.sqrt(kept.shape[-1]))
    err = (first.float() - derived.float()).norm()
    return bool(err <= tolerance * first.float().norm())
