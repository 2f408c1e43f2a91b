"""verify's layer-streamed evaluation: both models run one decoder layer at a time over every evaluation window.

Memory holds one decoder layer of each model (float32, on the evaluation device) and the windows' hidden states
of both models (host memory), whatever the depth; the output heads are loaded once at the end. Each layer is
loaded from its tensor source (a checkpoint, or a quantized one read through its format's view), run over every
window, and dropped. Per decoder layer it measures where the error comes from:
  relative_error  ||h_q - h_b|| / ||h_b|| of the layer's outputs, each model on its own inputs (the error the
                  model has accumulated up to and including this layer; free, both streams are computed anyway)
  local_error     the same for the quantized layer run on the base's inputs: the error this layer adds by itself
                  (one more forward of the quantized layer)
The windows run one at a time, as the in-memory path runs them, so both paths compute the same numbers.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from quantkit.calibrate.capture import capture_layer_inputs
from quantkit.calibrate.forward import StandIn, run_layer
from quantkit.calibrate.transfer import move
from quantkit.memory.heap import release_large_frees_at_once, return_free_heap
from quantkit.memory.spill import Activations
from quantkit.source.checkpoint import TensorReader
from quantkit.source.skeleton import (
    build_skeleton,
    checkpoint_names,
    decoder_layers,
    materialize,
    outer_modules_materialized,
    release,
    weight_matrix,
)
from quantkit.verification.metrics import WindowLogits
from quantkit.verification.report import Progress

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

DTYPE = torch.float32  # the evaluation's precision, as the in-memory path's


@dataclass
class Streamed:
    """One model as the streamed evaluation reads it: its skeleton on the meta device and its tensors' source."""

    model: PreTrainedModel
    prefix: str
    layers: nn.ModuleList
    source: TensorReader
    names: Callable[[str], str]  # module parameter name -> the source's name for it


def skeleton_for(config: PretrainedConfig) -> tuple[PreTrainedModel, str, nn.ModuleList]:
    """The model `config` describes on the meta device, and its decoder layers."""
    model = build_skeleton(config)
    prefix, layers = decoder_layers(model, config.num_hidden_layers)
    return model, prefix, layers


def streamed(model: PreTrainedModel, prefix: str, layers: nn.ModuleList, source: TensorReader) -> Streamed:
    return Streamed(model, prefix, layers, source, checkpoint_names(model, source.names()))


@dataclass
class LayerError:
    """Sums over every window of one decoder layer's outputs (float64)."""

    base_sq: float = 0.0
    accumulated_sq: float = 0.0
    local_sq: float = 0.0

    def add(self, base: Tensor, quantized: Tensor, local: Tensor) -> None:
        b = base.double()
        self.base_sq += float(b.square().sum())
        self.accumulated_sq += float((quantized.double() - b).square().sum())
        self.local_sq += float((local.double() - b).square().sum())

    def row(self, index: int) -> dict:
        denominator = self.base_sq ** 0.5 or 1.0
        return {"index": index, "relative_error": self.accumulated_sq ** 0.5 / denominator,
                "local_error": self.local_sq ** 0.5 / denominator}


@torch.no_grad()
def layer_inputs(m: Streamed, windows: Tensor, device: torch.device) -> tuple[Activations, list]:
    """Each window's hidden states entering decoder layer 0 (one batch per window, host memory), and how the model
    calls each layer."""
    with outer_modules_materialized(m.model, m.prefix, m.source, device, DTYPE):
        return capture_layer_inputs(m.model, m.layers, windows, 1, device, DTYPE)


@torch.no_grad()
def run_layers(quant: Streamed, base: Streamed | None, windows: Tensor, device: torch.device,
               progress: Progress) -> tuple[Activations, Activations | None, list[dict]]:
    """Every decoder layer of both models over every window: the final hidden states of each (per window) and,
    with a base, each layer's errors (module docstring)."""
    release_large_frees_at_once()  # a dropped layer's tensors go back to the system at once
    q_hidden, q_calls = layer_inputs(quant, windows, device)
    b_hidden, b_calls = layer_inputs(base, windows, device) if base is not None else (None, [])
    rows: list[dict] = []
    n = len(quant.layers)
    cpu = torch.device("cpu")
    for i in range(n):
        progress("evaluating layer by layer", i, n)
        q_layer = quant.layers[i]
        materialize(q_layer, f"{quant.prefix}.{i}", quant.source, device, DTYPE, quant.names)
        if base is None or b_hidden is None:
            for w in range(len(q_hidden)):
                q_hidden[w] = move(run_layer(q_layer, q_hidden[w].to(device), q_calls[i]), cpu, DTYPE)
            release(q_layer)
            return_free_heap()
            continue
        b_layer = base.layers[i]
        materialize(b_layer, f"{base.prefix}.{i}", base.source, device, DTYPE, base.names)
        error = LayerError()
        for w in range(len(q_hidden)):
            b_in = b_hidden[w].to(device)
            b_out = run_layer(b_layer, b_in, b_calls[i])
            q_out = run_layer(q_layer, q_hidden[w].to(device), q_calls[i])
            error.add(b_out, q_out, run_layer(q_layer, b_in, q_calls[i]))
            b_hidden[w], q_hidden[w] = move(b_out, cpu, DTYPE), move(q_out, cpu, DTYPE)
        release(q_layer)
        release(b_layer)
        return_free_heap()  # else each layer's small frees stay resident and memory creeps with depth
        rows.append(error.row(i))
    progress("evaluating layer by layer", n, n)
    return q_hidden, b_hidden, rows


class _Emit(StandIn):
    """Stands in for decoder layer 0: returns the final hidden states the streamed layers computed."""

    def __init__(self, wrapped: nn.Module) -> None:
        super().__init__(wrapped)
        self.hidden: Tensor | None = None

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        assert self.hidden is not None
        return self.hidden


class _Pass(StandIn):
    """Stands in for the other decoder layers: passes the hidden states through."""

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states


@contextlib.contextmanager
def final_logits(m: Streamed, hidden: Activations, device: torch.device) -> Iterator[WindowLogits]:
    """A function giving window w's next-token logits [T-1, V] (float32) from its final hidden states, through the
    model's own forward after its decoder layers (final norm, head, softcapping: whatever the model does there),
    with the decoder layers standing in; the input embedding is never loaded (the forward gets inputs_embeds)."""
    from accelerate.utils import set_module_tensor_to_device

    names = {id(mod): name for name, mod in m.model.named_modules()}
    head, embedding = m.model.get_output_embeddings(), m.model.get_input_embeddings()
    head_name = names[id(head)]
    originals = list(m.layers)
    emit = _Emit(originals[0])
    width = weight_matrix(embedding).shape[1]  # what the model takes as inputs_embeds (OPT projects it in and out)
    with outer_modules_materialized(m.model, m.prefix, m.source, device, DTYPE, input_embeddings=False):
        own = m.names(f"{head_name}.weight")
        tied = bool(getattr(m.model.config.get_text_config(), "tie_word_embeddings", False))
        # a tied model's head is its embedding, as transformers loads it, even where a checkpoint stores both
        weight_name = own if own in m.source and not tied else m.names(f"{names[id(embedding)]}.weight")
        set_module_tensor_to_device(head, "weight", device, value=m.source.get(weight_name), dtype=DTYPE)
        if getattr(head, "bias", None) is not None:
            set_module_tensor_to_device(head, "bias", device, value=m.source.get(m.names(f"{head_name}.bias")),
                                        dtype=DTYPE)
        try:
            m.layers[0] = emit
            for i in range(1, len(originals)):
                m.layers[i] = _Pass(originals[i])

            def window_logits(w: int) -> Tensor:
                emit.hidden = hidden[w].to(device)
                t = emit.hidden.shape[1]
                embeds = torch.zeros(1, t, width, dtype=DTYPE, device=device)
                with torch.inference_mode():
                    return m.model(inputs_embeds=embeds, use_cache=False).logits[0, :-1].float()
            yield window_logits
        finally:
            for i, layer in enumerate(originals):
                m.layers[i] = layer
            release(head)

