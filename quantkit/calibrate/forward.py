"""Calling a decoder layer as the model's own forward calls it, and standing in for a layer inside that forward."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn


class StopForward(Exception):
    """Raised from a hook once everything needed from a forward pass has been recorded."""


class StandIn(nn.Module):
    """Takes a decoder layer's place in the model's layer list; attributes it lacks are read from the layer (the
    model may read some, such as `attention_type`). The layer is not a submodule: it stays out of state_dict."""

    def __init__(self, wrapped: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_wrapped", wrapped)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_wrapped"), name)


@dataclass
class LayerCall:
    """Everything a decoder layer is called with besides the hidden states."""
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def run_layer(layer: nn.Module, hidden: Tensor, call: LayerCall) -> Tensor:
    """The layer's output hidden states on `hidden`, called as the model calls it."""
    out = layer(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out
