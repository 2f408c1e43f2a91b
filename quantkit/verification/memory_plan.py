"""How much RAM a model built with GPTQLinear layers needs, and which decoder layers go to disk under a budget."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor, nn

from quantkit.errors import QuantkitError
from quantkit.verification.gptq_linear import GPTQLinear

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def _tensor_bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def module_bytes(module: nn.Module, cached: bool, seen: set[int]) -> int:
    """Bytes of a module's parameters and buffers (tied tensors once); with cached, plus float32 dequantized weights."""
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += _tensor_bytes(t)
    if cached:
        total += sum(4 * m.in_features * m.out_features for m in module.modules() if isinstance(m, GPTQLinear))
    return total


def model_footprint(model: nn.Module) -> tuple[int, int]:
    """(packed bytes, float bytes) of a meta-built model: RAM without and with dequantized weights cached."""
    packed = module_bytes(model, cached=False, seen=set())
    dequantized = sum(4 * m.in_features * m.out_features for m in model.modules() if isinstance(m, GPTQLinear))
    return packed, packed + dequantized


def _layer_units(model: PreTrainedModel) -> tuple[list[str], list[str]]:
    """Device-map units: (decoder layer names, every other top-level module name), together covering the model."""
    from quantkit.source.skeleton import decoder_layers

    n_layers = getattr(model.config.get_text_config(), "num_hidden_layers", 0)
    prefix, _ = decoder_layers(model, n_layers)
    layers, others = [f"{prefix}.{i}" for i in range(n_layers)], []

    def walk(module: nn.Module, name: str) -> None:
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if full == prefix:
                continue
            if prefix.startswith(full + "."):
                walk(child, full)
            else:
                others.append(full)
    walk(model, "")
    return layers, others


def plan_memory(model: PreTrainedModel, max_memory: int | None) -> tuple[bool, dict[str, str] | None]:
    """(cache dequantized weights?, device map or None when everything stays in RAM) for a budget in bytes."""
    packed, full = model_footprint(model)
    if max_memory is None or full <= max_memory:
        return True, None
    if packed <= max_memory:
        return False, None
    layers, others = _layer_units(model)
    seen: set[int] = set()
    used = sum(module_bytes(model.get_submodule(n), False, seen) for n in others)
    if used > max_memory:
        raise QuantkitError(f"the embeddings, norms and output head alone need {_gb(used)}, more than --max-memory "
                            f"{_gb(max_memory)}; raise --max-memory")
    device_map = {n: "cpu" for n in others}
    for name in layers:
        size = module_bytes(model.get_submodule(name), False, seen)
        fits = used + size <= max_memory and all(v != "disk" for v in device_map.values())
        device_map[name] = "cpu" if fits else "disk"
        used += size if fits else 0
    return False, device_map


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
