"""A quantized safetensors checkpoint seen as its unquantized model's tensors: each quantized Linear's stored parts
(a format's `PackedLinears`) are replaced by `<module>.weight` in float32, dequantized when it is read; every other
tensor passes through as stored. Loaders and the streamed evaluation read any format through this one interface."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from quantkit.errors import QuantkitError
from quantkit.source.checkpoint import SafetensorsCheckpoint

Shapes = dict[str, tuple[int, ...]]
ACTIVATIONS_QUANTIZED = "activations_quantized"  # a layout's settings flag: inference also quantizes activations


@dataclass(frozen=True)
class PackedLinears:
    """How one format stores a quantized Linear beside a checkpoint's other tensors.

    marker: the suffix only a quantized Linear has ("qweight"); parts: the suffixes read for one Linear, marker
    included, all required; optional: suffixes read when present. dequantize: {suffix: tensor} -> float32 weight
    [out, in]; weight_shape: {suffix: shape} -> (out, in), from the headers alone (it also checks that the parts'
    shapes agree, raising ValueError when they do not). shape_contents: parts (a few bytes each) whose contents
    weight_shape also needs, passed as its second argument {suffix: tensor} (bitsandbytes keeps a 4-bit weight's
    [out, in] only inside its quant_state JSON)."""

    format: str
    marker: str
    parts: tuple[str, ...]
    dequantize: Callable[[dict[str, Tensor]], Tensor]
    weight_shape: Callable[..., tuple[int, int]]  # (shapes) or, with shape_contents, (shapes, contents)
    optional: tuple[str, ...] = ()
    settings: dict = field(default_factory=dict)  # what the format's config said, for reports
    shape_contents: tuple[str, ...] = ()
    refused: tuple[str, ...] = ()  # suffixes of tensors the format may hold that quantkit does not read


class DequantizedCheckpoint:
    """`checkpoint` with every Linear `layout` quantized presented as `<module>.weight` (float32 [out, in]).

    transposed: module names whose unquantized weight is stored [in, out] (GPT-2's Conv1D), given by the caller,
    which knows the model."""

    def __init__(self, checkpoint: SafetensorsCheckpoint, layout: PackedLinears,
                 transposed: Callable[[str], bool] = lambda module: False) -> None:
        self.checkpoint, self.layout, self.transposed = checkpoint, layout, transposed
        stored = checkpoint.names()
        present = set(stored)
        tail = f".{layout.marker}"
        self.modules = sorted(n[: -len(tail)] for n in stored if n.endswith(tail))
        if not self.modules:
            raise QuantkitError(f"{checkpoint.model_dir}: its config says {layout.format}, but no tensor ends in "
                                f"{tail}")
        unread = next((n for n in stored for r in layout.refused if n.endswith(f".{r}")), None)
        if unread is not None:
            raise QuantkitError(f"tensor {unread}: {layout.format} checkpoints holding such tensors are not read by "
                                "quantkit")
        hidden: set[str] = set()
        self._parts: dict[str, dict[str, str]] = {}
        for module in self.modules:
            parts = {s: f"{module}.{s}" for s in layout.parts}
            absent = [n for n in parts.values() if n not in present]
            if absent:
                raise QuantkitError(f"tensor {absent[0]} is missing from the checkpoint ({layout.format} stores "
                                    f"{', '.join(layout.parts)} for each quantized Linear)")
            parts.update({s: f"{module}.{s}" for s in layout.optional if f"{module}.{s}" in present})
            hidden.update(parts.values())
            self._parts[f"{module}.weight"] = parts
        self._hidden = frozenset(hidden)
        self._names = [n for n in stored if n not in hidden] + list(self._parts)

    def __contains__(self, name: str) -> bool:
        return name in self._parts or (name in self.checkpoint and name not in self._hidden)

    def names(self) -> list[str]:
        return list(self._names)

    def is_quantized(self, name: str) -> bool:
        """Whether `name` is a weight this view dequantizes."""
        return name in self._parts

    def shape(self, name: str) -> tuple[int, ...]:
        parts = self._parts.get(name)
        if parts is None:
            return tuple(self.checkpoint.shape(name))
        try:
            shapes = {s: tuple(self.checkpoint.shape(n)) for s, n in parts.items()}
            if self.layout.shape_contents:
                contents = {s: self.checkpoint.get(parts[s]) for s in self.layout.shape_contents if s in parts}
                out, in_ = self.layout.weight_shape(shapes, contents)
            else:
                out, in_ = self.layout.weight_shape(shapes)
        except ValueError as e:
            raise QuantkitError(f"{name.removesuffix('.weight')}: {e}") from None
        return (in_, out) if self.transposed(name.removesuffix(".weight")) else (out, in_)

    def get(self, name: str) -> Tensor:
        parts = self._parts.get(name)
        if parts is None:
            return self._passed_through(name)
        expected = self.shape(name)
        tensors = {s: self.checkpoint.get(n) for s, n in parts.items()}
        try:
            weight = self.layout.dequantize(tensors)
        except ValueError as e:
            raise QuantkitError(f"{name.removesuffix('.weight')}: {e}") from None
        if self.transposed(name.removesuffix(".weight")):
            weight = weight.t().contiguous()
        if tuple(weight.shape) != expected:
            raise QuantkitError(f"{name.removesuffix('.weight')}: its {self.layout.format} tensors dequantize to "
                                f"{list(weight.shape)}, their headers imply {list(expected)}")
        if not torch.isfinite(weight).all():
            raise QuantkitError(f"{name.removesuffix('.weight')}: its {self.layout.format} tensors dequantize to NaN "
                                "or Inf values")
        return weight

    def _passed_through(self, name: str) -> Tensor:
        """A tensor the format did not quantize, as stored; a weight in a quantized dtype without the parts that
        scale it (its scale lost) is refused rather than read as if it were float."""
        tensor = self.checkpoint.get(name)
        if name.endswith(".weight") and (not tensor.is_floating_point() or tensor.element_size() == 1):
            raise QuantkitError(f"tensor {name} is stored as {str(tensor.dtype).removeprefix('torch.')} without the "
                                f"{self.layout.format} tensors that scale it ({name.removesuffix('weight')}"
                                f"{self.layout.marker} is missing)")
        return tensor

    def close(self) -> None:
        self.checkpoint.close()
