"""The outputs of a Mixture-of-Experts block summed over passes that each run one chunk of its experts.

Calibration holds one chunk of experts' weights at a time, so no pass can run every expert. Each chunk, once
quantized, runs once over every mini-batch and adds its experts' outputs into that batch's running sum, in
expert order, exactly as one pass over all experts would add them; the propagation then takes the block's output
from the sums. The sums live where the activations do (memory, or a scratch file)."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from quantkit.calibrate.memo import BlockMemo
from quantkit.calibrate.transfer import move
from quantkit.memory.spill import Activations
from quantkit.source.experts import UnfusedExperts


@contextlib.contextmanager
def adding_into(block: UnfusedExperts, sums: Activations, memo: BlockMemo, device: torch.device) -> Iterator[None]:
    """Within the block, each call of `block` starts from batch memo.batch's sum (zeros at first) and its output,
    the sum with this pass's experts added, replaces it."""
    def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
        block.start = move(sums[memo.batch], device, args[0].dtype) if memo.batch < len(sums) else None

    def post(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        block.start = None
        stored = move(output, torch.device("cpu"), output.dtype)
        if memo.batch < len(sums):
            sums[memo.batch] = stored
        else:
            sums.append(stored)
    with _hooks(block, pre, post):
        yield


@contextlib.contextmanager
def replaying(block: UnfusedExperts, sums: Activations, memo: BlockMemo, device: torch.device) -> Iterator[None]:
    """Within the block, each call of `block` returns batch memo.batch's sum without running an expert."""
    def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
        block.replay = move(sums[memo.batch], device, args[0].dtype)

    def post(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        block.replay = None
    with _hooks(block, pre, post):
        yield


@contextlib.contextmanager
def _hooks(block: UnfusedExperts, pre: Callable[..., None], post: Callable[..., None]) -> Iterator[None]:
    handles = [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        block.start = block.replay = None
