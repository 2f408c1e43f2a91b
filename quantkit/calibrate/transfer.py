"""Moving activations between the CPU and the compute device, asynchronously where the hardware allows."""
from __future__ import annotations

from typing import overload

import torch
from torch import Tensor


def move(t: Tensor, device: torch.device, dtype: torch.dtype, copy: bool = False) -> Tensor:
    """t on device in dtype. From a GPU to the CPU the copy lands in pinned memory (torch's caching host allocator
    reuses it: no page faults, DMA at full speed) and runs asynchronously, as do copies from pinned memory to the
    GPU. The GPU's stream orders its own readers; CPU readers call `wait_for_copies` first."""
    if device.type == "cpu" and t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=dtype, pin_memory=True)
        return host.copy_(t.to(dtype), non_blocking=True)
    return t.to(device, dtype, non_blocking=device.type == "cuda" and t.is_pinned(), copy=copy)


@overload
def move_all(obj: Tensor, device: torch.device | str, dtype: torch.dtype | None = None,
             copy: bool = False) -> Tensor: ...
@overload
def move_all(obj: object, device: torch.device | str, dtype: torch.dtype | None = None,
             copy: bool = False) -> object: ...
def move_all(obj: object, device: torch.device | str, dtype: torch.dtype | None = None, copy: bool = False) -> object:
    """obj's tensors (obj itself, or inside tuples, lists and dicts) moved to device (`move`); floating ones also
    cast to dtype when given. copy: always new tensors."""
    if isinstance(obj, Tensor):
        return move(obj, torch.device(device), dtype if dtype is not None and obj.is_floating_point() else obj.dtype,
                    copy)
    if isinstance(obj, (tuple, list)):
        return type(obj)(move_all(o, device, dtype, copy) for o in obj)
    if isinstance(obj, dict):
        return {k: move_all(v, device, dtype, copy) for k, v in obj.items()}
    return obj


def wait_for_copies(device: torch.device) -> None:
    """Before the CPU reads activations copied from `device` (to save them, say)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
