"""The transformers side: an empty (meta) model built from config.json, filled one module at a time.

All coupling to transformers' model classes lives here. Decoder layers and their Linear modules are
discovered from the module tree, so Llama-family models need no per-architecture tables.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .checkpoint import SafetensorsCheckpoint
from .errors import QuantkitError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def load_config(model_dir, config_dict: dict):
    """transformers config for a supported, unquantized causal LM (never runs remote code)."""
    model_type = config_dict.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise QuantkitError(f"unsupported architecture {model_type!r} ({', '.join(config_dict.get('architectures') or [])}); "
                            f"quantkit supports {', '.join(SUPPORTED_MODEL_TYPES)}")
    if config_dict.get("quantization_config"):
        method = config_dict["quantization_config"].get("quant_method", "unknown")
        raise QuantkitError(f"{model_dir} is already quantized ({method}); quantize its unquantized base model instead")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as e:
        raise QuantkitError(f"cannot read {model_dir}/config.json: {e}") from None


def build_skeleton(config) -> nn.Module:
    """The causal LM with every parameter on the meta device (no memory); buffers such as rotary tables are real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config.use_cache = False
    with init_empty_weights(include_buffers=False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.eval()


def decoder_layers(model: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the decoder layers, and its qualified name (e.g. 'model.layers')."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and n_layers > 0:
            return name, module
    raise QuantkitError(f"cannot find the {n_layers} decoder layers in {type(model).__name__}")


def linear_modules(layer: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def materialize(module: nn.Module, prefix: str, checkpoint: SafetensorsCheckpoint, device: torch.device,
                dtype: torch.dtype) -> None:
    """Load `module`'s parameters from the checkpoint (names prefix + '.' + param) onto device in place."""
    from accelerate.utils import set_module_tensor_to_device

    for pname, param in module.named_parameters():
        full = f"{prefix}.{pname}" if prefix else pname
        tensor = checkpoint.get(full)
        if tuple(tensor.shape) != tuple(param.shape):
            raise QuantkitError(f"tensor {full} has shape {list(tensor.shape)} in the checkpoint, but config.json "
                                f"implies {list(param.shape)}")
        if tensor.is_floating_point():
            if not torch.isfinite(tensor).all():
                raise QuantkitError(f"tensor {full} holds NaN or Inf values")
            # without dtype=, accelerate would cast back to the skeleton's (config's) dtype
            set_module_tensor_to_device(module, pname, device, value=tensor, dtype=dtype)
        else:
            set_module_tensor_to_device(module, pname, device, value=tensor)


def release(module: nn.Module) -> None:
    """Drop a module's weights back to the meta device."""
    module.to("meta")
