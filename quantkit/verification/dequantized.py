"""quantkit's own reference for a GPTQ checkpoint: a plain transformers model holding the dequantized weights.

Exact to the format (see gptq_format.dequantize_module) and independent of any GPTQ kernel, so it runs where
no GPU and no gptqmodel exist.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from quantkit.errors import QuantkitError
from quantkit.source.checkpoint import (
    SafetensorsCheckpoint,
    check_config_fits,
    read_config_dict,
    resolve_model_dir,
)
from quantkit.source.experts import fuse_experts, unfuse_experts
from quantkit.source.skeleton import (
    causal_lm_from_config,
    checkpoint_key_renamer,
    is_conv1d,
)
from quantkit.verification.qlinear import as_causal_lm
from quantkit.write.gptq_format import dequantize_module

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def load_dequantized(model: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a GPTQ checkpoint (directory or cached repo id) as an ordinary causal LM with float weights."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig

    model_dir = resolve_model_dir(model)
    config_dict = read_config_dict(model_dir)
    qcfg = config_dict.get("quantization_config") or {}
    if qcfg.get("quant_method") != "gptq":
        raise QuantkitError(f"{model_dir} is not a GPTQ checkpoint (quantization_config.quant_method != 'gptq')")
    checkpoint = SafetensorsCheckpoint(model_dir)
    check_config_fits(config_dict, checkpoint)
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    if hasattr(config, "quantization_config"):  # absent where quantize_config.json holds the settings
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        lm = as_causal_lm(causal_lm_from_config(config, dtype))
    unfuse_experts(lm)  # filled expert by expert, then fused back into transformers' own module
    rename = checkpoint_key_renamer(lm)
    bits, fmt = int(qcfg["bits"]), qcfg.get("checkpoint_format", "gptq")
    names = set(checkpoint.names())
    for name in sorted(names):
        if name.endswith(".qweight"):
            module = name[: -len(".qweight")]
            weight = dequantize_module(checkpoint.get(f"{module}.qweight"), checkpoint.get(f"{module}.qzeros"),
                                       checkpoint.get(f"{module}.scales"), checkpoint.get(f"{module}.g_idx"),
                                       bits=bits, fmt=fmt)
            if is_conv1d(lm.get_submodule(rename(f"{module}.weight").removesuffix(".weight"))):
                weight = weight.t().contiguous()  # Conv1D keeps [in, out]
            set_module_tensor_to_device(lm, rename(f"{module}.weight"), "cpu", value=weight.to(dtype))
        elif not name.endswith((".qzeros", ".scales", ".g_idx")):
            t = checkpoint.get(name)
            set_module_tensor_to_device(lm, rename(name), "cpu", value=t.to(dtype) if t.is_floating_point() else t)
    if getattr(config, "tie_word_embeddings", False):
        lm.tie_weights()
    missing = [n for n, p in lm.named_parameters() if p.device.type == "meta"]
    if missing:
        raise QuantkitError(f"{model_dir}: checkpoint has no tensor for {missing[0]}")
    fuse_experts(lm)
    return lm.eval()
