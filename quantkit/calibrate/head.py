"""The Hessian of the output head's inputs (--lm-head): the model's own tail applied to the last layer's outputs."""
from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from quantkit.calibrate.forward import StandIn, StopForward
from quantkit.calibrate.statistics import HessianSum
from quantkit.calibrate.transfer import move
from quantkit.source.skeleton import in_features


class _Stand(StandIn):
    """Stands in for a decoder layer when only what follows the layers matters: passes its input through, or
    (the last layer) returns the recorded output of the real last layer."""

    def __init__(self, wrapped: nn.Module, output: dict[str, Tensor] | None) -> None:
        super().__init__(wrapped)
        self.output = output

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states if self.output is None else self.output["hidden"]


@torch.no_grad()
def collect_head_hessian(model: nn.Module, layers: nn.ModuleList, head: nn.Module, input_ids: Tensor,
                         final_hidden: Iterable[Tensor], device: torch.device, dtype: torch.dtype,
                         exact: bool = False) -> Tensor:
    """The Hessian of the output head's inputs (a float32 running mean, or with `exact` its float64 exact sum): the
    model's own tail (final norm, projections) applied to the last decoder layer's outputs `final_hidden`
    (mini-batches, in order of `input_ids`).

    Needs the modules outside the layers materialised on `device`; the head itself stays on meta (the forward
    stops at its input).
    """
    originals = list(layers)
    current: dict[str, Tensor] = {}
    k = in_features(head)
    sums = HessianSum.zeros(k, device, exact=exact)

    def hook(mod: nn.Module, inp: tuple[Any, ...]) -> None:
        sums.add(inp[0])
        raise StopForward

    handle = head.register_forward_pre_hook(hook)
    try:
        for i, layer in enumerate(originals):
            layers[i] = _Stand(layer, current if i == len(originals) - 1 else None)
        start = 0
        for hidden in final_hidden:
            current["hidden"] = move(hidden, device, dtype)
            with contextlib.suppress(StopForward):
                model(input_ids=input_ids[start:start + hidden.shape[0]].to(device), use_cache=False)
            start += hidden.shape[0]
    finally:
        handle.remove()
        for i, layer in enumerate(originals):
            layers[i] = layer
    return sums.hessian
