"""quantkit's own GPTQ runtime: a pure-torch dequantizing Linear and a memory-lean loader built on it.

No CUDA kernel and no gptqmodel: `GPTQLinear` keeps the checkpoint's packed tensors as buffers and
dequantizes them with `gptq_format.dequantize_module`, so its outputs equal those of a plain Linear holding
the dequantized weight bit for bit (see tests/test_verify.py).

`load_model` builds the transformers model on the meta device, swaps the Linears that the checkpoint
quantized for `GPTQLinear`, and fills every tensor from the safetensors shards one at a time. It also loads
unquantized checkpoints (the base model of a comparison). Memory, given a budget (`max_memory` bytes):
  1. the model with dequantized weights cached per Linear (float32) fits -> fastest, like a float model;
  2. else the packed model fits -> each Linear dequantizes in every forward, nothing cached;
  3. else the embeddings, norms and head stay in RAM, decoder layers fill the rest of the budget in order,
     and the remaining layers are offloaded to disk (accelerate `dispatch_model`), read back per forward.
Without a budget, tier 1 is used.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from quantkit.errors import QuantkitError
from quantkit.source.checkpoint import (
    SafetensorsCheckpoint,
    check_config_fits,
    read_config_dict,
    resolve_model_dir,
)
from quantkit.source.safetensors_header import TORCH_DTYPES
from quantkit.source.skeleton import (
    causal_lm_from_config,
    checkpoint_key_renamer,
    is_conv1d,
    weight_matrix,
)
from quantkit.verification.integrity import read_headers
from quantkit.write.gptq_format import QUANT_SUFFIXES, dequantize_module, zero_offset
from quantkit.write.packing import packed_length


class GPTQLinear(nn.Module):
    """y = x @ W.T + b with W dequantized from GPTQ tensors (buffers, as stored on disk) in each forward.

    qweight int32 [K*bits/32, N], qzeros int32 [G, N*bits/32], scales float16 [G, N], g_idx int32 [K],
    bias [N] or None. With cache_weight, the first forward keeps the dequantized weight for later calls.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, n_groups: int, fmt: str = "gptq",
                 bias: bool = False, scales_dtype: torch.dtype = torch.float16, bias_dtype: torch.dtype = torch.float16,
                 device: torch.device | str = "meta", cache_weight: bool = False):
        super().__init__()
        zero_offset(fmt)  # validates the format name
        self.in_features, self.out_features, self.bits, self.fmt = in_features, out_features, bits, fmt
        self.cache_weight = cache_weight
        self._cached: Tensor | None = None
        self.register_buffer("qweight", torch.empty(packed_length(in_features, bits), out_features, dtype=torch.int32,
                                                     device=device))
        self.register_buffer("qzeros", torch.empty(n_groups, packed_length(out_features, bits), dtype=torch.int32,
                                                    device=device))
        self.register_buffer("scales", torch.empty(n_groups, out_features, dtype=scales_dtype, device=device))
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32, device=device))
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_tensors(cls, qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int, fmt: str,
                     bias: Tensor | None = None, cache_weight: bool = False) -> "GPTQLinear":
        layer = cls(g_idx.shape[0], scales.shape[1], bits, scales.shape[0], fmt, bias is not None, scales.dtype,
                    bias.dtype if bias is not None else torch.float16, device="cpu", cache_weight=cache_weight)
        for name, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales), ("g_idx", g_idx), ("bias", bias)):
            if t is not None:
                layer._buffers[name] = t
        return layer

    def dequantized_weight(self) -> Tensor:
        """Float32 weight [N, K], exactly as the format defines it."""
        return dequantize_module(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.fmt)

    def forward(self, x: Tensor) -> Tensor:
        weight = self._cached
        if weight is None or weight.dtype != x.dtype or weight.device != x.device:
            weight = self.dequantized_weight().to(device=x.device, dtype=x.dtype)
            self._cached = weight if self.cache_weight else None
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return nn.functional.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"groups={self.scales.shape[0]}, format={self.fmt}, bias={self.bias is not None}")


@dataclass
class LoadInfo:
    """What `load_model` did: checkpoint kind, bytes held in RAM, layers left on disk, whether weights are cached."""

    path: str
    quantized: bool
    resident_bytes: int
    float_bytes: int                 # RAM the model would need with every weight as float32
    packed_bytes: int                # RAM it needs holding only the checkpoint's tensors
    cached: bool
    offloaded: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def gptq_settings(config_dict: dict) -> dict | None:
    """bits / group_size / checkpoint_format of a GPTQ config.json, None when the model is not quantized."""
    qcfg = config_dict.get("quantization_config")
    if not qcfg:
        return None
    if qcfg.get("quant_method") != "gptq":
        raise QuantkitError(f"quantization method {qcfg.get('quant_method')!r} is not supported; quantkit loads GPTQ "
                            "checkpoints and unquantized models")
    return {"bits": int(qcfg["bits"]), "group_size": int(qcfg.get("group_size", -1)),
            "fmt": qcfg.get("checkpoint_format", "gptq")}


def build_model(model_dir: Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, SafetensorsCheckpoint, dict | None]:
    """The causal LM on the meta device with GPTQLinear in place of every quantized Linear (buffers on meta)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config_dict = read_config_dict(model_dir)
    settings = gptq_settings(config_dict)
    checkpoint = SafetensorsCheckpoint(model_dir)
    check_config_fits(config_dict, checkpoint)
    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as e:
        raise QuantkitError(f"cannot read {model_dir}/config.json: {e}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        try:
            model = causal_lm_from_config(config, dtype)
        except (ValueError, KeyError) as e:
            raise QuantkitError(f"{model_dir}: transformers cannot build this model: {e}") from None
    if _ties_embeddings(model):
        model.tie_weights()  # share the meta tensor now, so sizes count it once; retied after loading
    if settings is not None:
        headers = read_headers(checkpoint)
        for name in checkpoint.names():
            if name.endswith(".qweight"):
                _swap_in(model, name[: -len(".qweight")], checkpoint, settings, headers)
    return model.eval(), checkpoint, settings


def _ties_embeddings(model: nn.Module) -> bool:
    text_config = model.config.get_text_config()
    return bool(getattr(text_config, "tie_word_embeddings", False) or getattr(model.config, "tie_word_embeddings", False))


def _swap_in(model: nn.Module, module_name: str, checkpoint: SafetensorsCheckpoint, settings: dict,
             headers: dict | None = None) -> None:
    try:
        linear = model.get_submodule(module_name)
    except AttributeError:
        raise QuantkitError(f"checkpoint quantizes {module_name}, which this model architecture does not have") from None
    if not isinstance(linear, nn.Linear) and not is_conv1d(linear):
        raise QuantkitError(f"checkpoint quantizes {module_name}, which is a {type(linear).__name__}, not a Linear")
    linear_out, linear_in = weight_matrix(linear).shape
    bits = settings["bits"]
    for suffix in QUANT_SUFFIXES:
        if f"{module_name}.{suffix}" not in checkpoint:
            raise QuantkitError(f"tensor {module_name}.{suffix} is missing from the checkpoint")
    k_packed, n_out = checkpoint.shape(f"{module_name}.qweight")
    n_in = k_packed * 32 // bits
    if (n_in, n_out) != (linear_in, linear_out):
        raise QuantkitError(f"tensor {module_name}.qweight holds a [{n_out}, {n_in}] weight (out, in), but config.json "
                            f"implies [{linear_out}, {linear_in}]")
    n_groups = checkpoint.shape(f"{module_name}.scales")[0]
    has_bias = f"{module_name}.bias" in checkpoint
    headers = headers or {}
    dtype_of = lambda s: TORCH_DTYPES.get(headers.get(f"{module_name}.{s}", {}).get("dtype"), torch.float16)  # noqa: E731
    qlinear = GPTQLinear(n_in, n_out, bits, n_groups, settings["fmt"], bias=has_bias, scales_dtype=dtype_of("scales"),
                         bias_dtype=dtype_of("bias"), device="meta")
    parent_name, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, qlinear)


def _tensor_bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _module_bytes(module: nn.Module, cached: bool, seen: set[int]) -> int:
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
    packed = _module_bytes(model, cached=False, seen=set())
    dequantized = sum(4 * m.in_features * m.out_features for m in model.modules() if isinstance(m, GPTQLinear))
    return packed, packed + dequantized


def _layer_units(model: nn.Module) -> tuple[list[str], list[str]]:
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


def plan_memory(model: nn.Module, max_memory: int | None) -> tuple[bool, dict[str, str] | None]:
    """(cache dequantized weights?, device map or None when everything stays in RAM) for a budget in bytes."""
    packed, full = model_footprint(model)
    if max_memory is None or full <= max_memory:
        return True, None
    if packed <= max_memory:
        return False, None
    layers, others = _layer_units(model)
    seen: set[int] = set()
    used = sum(_module_bytes(model.get_submodule(n), False, seen) for n in others)
    if used > max_memory:
        raise QuantkitError(f"the embeddings, norms and output head alone need {_gb(used)}, more than --max-memory "
                            f"{_gb(max_memory)}; raise --max-memory")
    device_map = {n: "cpu" for n in others}
    for name in layers:
        size = _module_bytes(model.get_submodule(name), False, seen)
        fits = used + size <= max_memory and all(v != "disk" for v in device_map.values())
        device_map[name] = "cpu" if fits else "disk"
        used += size if fits else 0
    return False, device_map


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def load_model(model: str | Path, *, dtype: torch.dtype = torch.float32, max_memory: int | None = None,
               offload_dir: str | Path | None = None) -> tuple[nn.Module, LoadInfo]:
    """A GPTQ (GPTQLinear) or unquantized checkpoint as a ready causal LM, within `max_memory` bytes of weights.

    Layers that do not fit are offloaded into `offload_dir` (required then), which must outlive the model.
    """
    model_dir = resolve_model_dir(str(model))
    lm, checkpoint, settings = build_model(model_dir, dtype)
    packed, full = model_footprint(lm)
    cache, device_map = plan_memory(lm, max_memory)
    for m in lm.modules():
        if isinstance(m, GPTQLinear):
            m.cache_weight = cache
    disk = {n for n, d in (device_map or {}).items() if d == "disk"}
    if disk and offload_dir is None:
        raise QuantkitError("this model needs disk offloading under --max-memory but no offload directory was given")
    index: dict = {}
    rename = checkpoint_key_renamer(lm)
    try:
        for name in checkpoint.names():
            _load_tensor(lm, name, checkpoint, dtype, disk, offload_dir, index, rename)
    finally:
        checkpoint.close()
    if _ties_embeddings(lm):
        lm.tie_weights()
    _check_loaded(lm, model_dir, disk)
    offloaded = sorted(disk, key=_natural_key)
    if disk:
        _dispatch(lm, device_map, Path(offload_dir), index)
    resident = packed if not cache else full
    if disk:
        seen: set[int] = set()
        resident = sum(_module_bytes(lm.get_submodule(n), False, seen) for n, d in device_map.items() if d == "cpu")
    info = LoadInfo(path=str(model_dir), quantized=settings is not None, resident_bytes=resident, float_bytes=full,
                    packed_bytes=packed, cached=cache and settings is not None, offloaded=offloaded)
    return lm, info


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def _load_tensor(lm: nn.Module, name: str, checkpoint: SafetensorsCheckpoint, dtype: torch.dtype, disk: set[str],
                 offload_dir, index: dict, rename) -> None:
    """Put one checkpoint tensor into its module (or the offload folder when its layer lives on disk)."""
    module_name, _, tensor_name = rename(name).rpartition(".")
    try:
        module = lm.get_submodule(module_name)
    except AttributeError:
        return  # e.g. a stored lm_head of a tied model, or rotary tables of old checkpoints: not part of the model
    if tensor_name not in module._parameters and tensor_name not in module._buffers:
        return
    old = module._parameters.get(tensor_name)
    old = old if old is not None else module._buffers.get(tensor_name)
    tensor = checkpoint.get(name)
    if old is not None and tuple(tensor.shape) != tuple(old.shape):
        raise QuantkitError(f"tensor {name} has shape {list(tensor.shape)} in the checkpoint, but config.json implies "
                            f"{list(old.shape)}")
    if isinstance(module, GPTQLinear):
        tensor = tensor.to(old.dtype) if tensor_name in ("qweight", "qzeros", "g_idx") else tensor
    elif tensor.is_floating_point():
        tensor = tensor.to(dtype)
    if any(name.startswith(d + ".") for d in disk):
        from accelerate.utils import offload_weight

        offload_weight(tensor, name, str(offload_dir), index=index)
        return
    if tensor_name in module._parameters:
        module._parameters[tensor_name] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[tensor_name] = tensor


def _check_loaded(lm: nn.Module, model_dir: Path, disk: set[str]) -> None:
    on_disk = lambda n: any(n.startswith(d + ".") for d in disk)  # noqa: E731
    for name, t in list(lm.named_parameters()) + list(lm.named_buffers()):
        if t is not None and t.device.type == "meta" and not on_disk(name):
            raise QuantkitError(f"{model_dir}: the checkpoint has no tensor for {name}")


def _dispatch(lm: nn.Module, device_map: dict[str, str], offload_dir: Path, index: dict) -> None:
    """Attach accelerate's offload hooks: layers marked "disk" are read from offload_dir in each forward."""
    from accelerate import dispatch_model
    from accelerate.utils import offload_weight, save_offload_index

    for name, device in device_map.items():  # real non-persistent buffers (e.g. rotary tables) go to disk too
        if device == "disk":
            for bname, buf in lm.get_submodule(name).named_buffers():
                full = f"{name}.{bname}"
                if buf is not None and buf.device.type != "meta" and full not in index:
                    offload_weight(buf, full, str(offload_dir), index=index)
    save_offload_index(index, str(offload_dir))
    dispatch_model(lm, device_map=device_map, main_device="cpu", offload_dir=str(offload_dir), offload_index=index,
                   offload_buffers=True)


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def estimate_footprint(model: str | Path) -> tuple[int, int]:
    """(packed bytes, float32 bytes) a checkpoint needs in RAM, computed on the meta device (nothing loaded)."""
    model_dir = resolve_model_dir(str(model))
    qcfg = read_config_dict(model_dir).get("quantization_config") or {}
    if qcfg.get("quant_method") == "bitsandbytes":  # stays packed in RAM; its float16 parts load as float32
        on_disk = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
        return on_disk, 2 * on_disk
    lm, checkpoint, _ = build_model(model_dir)
    checkpoint.close()
    return model_footprint(lm)


__all__ = ["GPTQLinear", "LoadInfo", "load_model", "estimate_footprint", "available_memory", "plan_memory",
           "model_footprint"]
