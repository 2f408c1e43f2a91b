"""The calibration batch run up to the first decoder layer: the hidden states entering it, and the arguments the
model calls each layer with.

Layers are called exactly as the model's own forward calls them (the keyword arguments are recorded from a real
forward), so rotary embeddings, masks and GQA need no per-architecture code. The layers are restored in `finally`.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from quantkit.calibrate.forward import LayerCall, StandIn, StopForward
from quantkit.calibrate.transfer import move
from quantkit.memory.spill import Activations, ActivationsInMemory

Recorded = tuple[Tensor, tuple[Any, ...], dict[str, Any]]  # a layer's call: hidden states, args, kwargs


class _Recorder(StandIn):
    """Stands in for a decoder layer: records its call, then passes the input through or stops the forward."""

    def __init__(self, wrapped: nn.Module, sink: list[Recorded], stop: bool) -> None:
        super().__init__(wrapped)
        self.sink, self.stop = sink, stop

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self.sink.append((hidden_states, args, kwargs))
        if self.stop:
            raise StopForward
        return hidden_states


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, input_ids: Tensor, batch_size: int,
                         device: torch.device, storage_dtype: torch.dtype,
                         batches: Activations | None = None) -> tuple[Activations, list[LayerCall]]:
    """Hidden states entering layer 0 (CPU mini-batches, appended to `batches`: a new ActivationsInMemory by
    default) and each layer's call arguments.

    Needs the model's non-layer input modules (embeddings, rotary tables) materialised on `device`.
    """
    batches = ActivationsInMemory() if batches is None else batches
    originals = list(layers)
    try:
        calls = _layer_calls(model, layers, originals, input_ids, device)
        sink: list[Recorded] = []
        layers[0] = _Recorder(originals[0], sink, stop=True)
        for start in range(0, input_ids.shape[0], batch_size):
            with contextlib.suppress(StopForward):
                model(input_ids=input_ids[start:start + batch_size].to(device), use_cache=False)
            batches.append(move(sink.pop()[0], torch.device("cpu"), storage_dtype))
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    for call in calls:
        call.kwargs.pop("use_cache", None)
    return batches, calls


def _layer_calls(model: nn.Module, layers: nn.ModuleList, originals: list[nn.Module], input_ids: Tensor,
                 device: torch.device) -> list[LayerCall]:
    """Each layer's call arguments, from one sample run through pass-through recorders in place of the layers
    (each layer's own kwargs: masks can differ per layer). The caller restores `originals`."""
    sink: list[Recorded] = []
    for i, layer in enumerate(originals):
        layers[i] = _Recorder(layer, sink, stop=i == len(originals) - 1)
    with contextlib.suppress(StopForward):
        model(input_ids=input_ids[:1].to(device), use_cache=False)
    calls = [LayerCall(args, kwargs) for _, args, kwargs in sink]
    if len(calls) != len(originals):  # the model chained layers in a way pass-through broke: reuse layer 0's
        calls = [calls[0]] * len(originals)
    return calls
