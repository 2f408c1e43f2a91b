"""quantkit's own GPTQ runtime: a memory-lean loader built on the pure-torch GPTQLinear (gptq_linear.py).

`load_model` builds the transformers model on the meta device, swaps the Linears that the checkpoint
quantized for `GPTQLinear`, and fills every tensor from the safetensors shards one at a time. It also loads
unquantized checkpoints (the base model of a comparison). Memory, given a budget (`max_memory` bytes):
  1. the model with dequantized weights cached per Linear (float32) fits -> fastest, like a float model;
  2. else the packed model fits -> each Linear dequantizes in every forward, nothing cached;
  3. else the embeddings, norms and head stay in RAM, decoder layers fill the rest of the budget in order,
     and the remaining layers are offloaded to disk (accelerate `dispatch_model`), read back per forward.
Without a budget, tier 1 is used (memory_plan.py).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from quantkit.errors import QuantkitError
from quantkit.source.checkpoint import (
    SafetensorsCheckpoint,
    check_config_fits,
    read_config_dict,
    resolve_model_dir,
)
from quantkit.source.experts import unfuse_experts
from quantkit.source.safetensors_header import TORCH_DTYPES
from quantkit.source.skeleton import (
    causal_lm_from_config,
    checkpoint_key_renamer,
    is_conv1d,
    weight_matrix,
)
from quantkit.verification.gptq_linear import GPTQLinear
from quantkit.verification.integrity import read_headers
from quantkit.verification.memory_plan import model_footprint, module_bytes, plan_memory
from quantkit.verification.sources import model_config
from quantkit.write.gptq_format import QUANT_SUFFIXES

if TYPE_CHECKING:
    from transformers import PreTrainedModel


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


def as_causal_lm(model: nn.Module) -> PreTrainedModel:
    """model, which transformers built, as the PreTrainedModel it is."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise QuantkitError(f"{type(model).__name__} is not a transformers model")
    return model


def build_model(model_dir: Path,
                dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, SafetensorsCheckpoint, dict | None]:
    """The causal LM on the meta device with GPTQLinear in place of every quantized Linear (buffers on meta)."""
    from accelerate import init_empty_weights

    config_dict = read_config_dict(model_dir)
    settings = gptq_settings(config_dict)
    checkpoint = SafetensorsCheckpoint(model_dir)
    check_config_fits(config_dict, checkpoint)
    config = model_config(model_dir)
    with init_empty_weights(include_buffers=False):
        try:
            model = as_causal_lm(causal_lm_from_config(config, dtype))
        except (ValueError, KeyError) as e:
            raise QuantkitError(f"{model_dir}: transformers cannot build this model: {e}") from None
    unfuse_experts(model)  # one Linear per expert, as checkpoints (and GPTQ ones) store them
    if _ties_embeddings(model):
        model.tie_weights()  # share the meta tensor now, so sizes count it once; retied after loading
    if settings is not None:
        headers = read_headers(checkpoint)
        rename = checkpoint_key_renamer(model)
        for name in checkpoint.names():
            if name.endswith(".qweight"):
                _swap_in(model, name[: -len(".qweight")], checkpoint, settings, headers,
                         rename(name).removesuffix(".qweight"))
    return model.eval(), checkpoint, settings


def _ties_embeddings(model: PreTrainedModel) -> bool:
    text_config = model.config.get_text_config()
    return bool(getattr(text_config, "tie_word_embeddings", False)
                or getattr(model.config, "tie_word_embeddings", False))


def _swap_in(model: nn.Module, module_name: str, checkpoint: SafetensorsCheckpoint, settings: dict,
             headers: dict | None = None, module_path: str | None = None) -> None:
    """GPTQLinear in place of the Linear the checkpoint's `module_name` tensors quantize (at `module_path` in the
    model, where transformers renames checkpoint keys)."""
    module_path = module_path or module_name
    try:
        linear = model.get_submodule(module_path)
    except AttributeError:
        raise QuantkitError(f"checkpoint quantizes {module_name}, which this model architecture does not "
                            "have") from None
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
    parent_name, _, child = module_path.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, qlinear)


def load_model(model: str | Path, *, dtype: torch.dtype = torch.float32, max_memory: int | None = None,
               offload_dir: str | Path | None = None) -> tuple[PreTrainedModel, LoadInfo]:
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
    resident = full if cache else packed
    if device_map is not None and disk and offload_dir is not None:
        _dispatch(lm, device_map, Path(offload_dir), index)
        seen: set[int] = set()
        resident = sum(module_bytes(lm.get_submodule(n), False, seen) for n, d in device_map.items() if d == "cpu")
    info = LoadInfo(path=str(model_dir), quantized=settings is not None, resident_bytes=resident, float_bytes=full,
                    packed_bytes=packed, cached=cache and settings is not None,
                    offloaded=sorted(disk, key=_natural_key))
    return lm, info


def _natural_key(name: str) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def _load_tensor(lm: nn.Module, name: str, checkpoint: SafetensorsCheckpoint, dtype: torch.dtype, disk: set[str],
                 offload_dir: str | Path | None, index: dict, rename: Callable[[str], str]) -> None:
    """Put one checkpoint tensor into its module (or the offload folder when its layer lives on disk)."""
    module_name, _, tensor_name = rename(name).rpartition(".")
    try:
        module = lm.get_submodule(module_name)
    except AttributeError:
        return  # e.g. a stored lm_head of a tied model, or rotary tables of old checkpoints: not part of the model
    if tensor_name not in module._parameters and tensor_name not in module._buffers:
        return
    param = module._parameters.get(tensor_name)
    old: Tensor | None = param if param is not None else module._buffers.get(tensor_name)
    tensor = checkpoint.get(name)
    if old is not None and tuple(tensor.shape) != tuple(old.shape):
        raise QuantkitError(f"tensor {name} has shape {list(tensor.shape)} in the checkpoint, but config.json implies "
                            f"{list(old.shape)}")
    if isinstance(module, GPTQLinear):
        integer = tensor_name in ("qweight", "qzeros", "g_idx")  # GPTQLinear declares all three, so old is set
        tensor = tensor.to(old.dtype) if integer and old is not None else tensor
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


__all__ = ["LoadInfo", "as_causal_lm", "build_model", "estimate_footprint", "gptq_settings", "load_model"]
