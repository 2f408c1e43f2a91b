"""--lm-head: the output head quantized like a decoder Linear, calibrated on the model's own final hidden states.

A tied head (lm_head sharing the input embedding's weight) is untied: the embedding stays in float16, the head
is written packed, and the output's config says tie_word_embeddings: false. transformers + optimum converts only
the decoder blocks, so such checkpoints load through gptqmodel's own loader, vLLM and quantkit, not
AutoModelForCausalLM + optimum (verify and inspect say so).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from quantkit.calibrate.capture import collect_head_hessian
from quantkit.config import QuantSpec
from quantkit.errors import NumericalError
from quantkit.solve.gptq import GPTQResult, gptq_quantize, rtn_result
from quantkit.source.checkpoint import SafetensorsCheckpoint
from quantkit.source.skeleton import outer_modules_materialized
from quantkit.write.gptq_format import module_tensors


def head_names(model: nn.Module, checkpoint: SafetensorsCheckpoint) -> tuple[str, str]:
    """(the head's module name, the checkpoint tensor holding its weight: its own, or the tied embedding's)."""
    names = {id(m): n for n, m in model.named_modules()}
    head = names[id(model.get_output_embeddings())]
    if f"{head}.weight" in checkpoint:
        return head, f"{head}.weight"
    return head, f"{names[id(model.get_input_embeddings())]}.weight"


def quantize_head(model: nn.Module, layers: nn.ModuleList, layers_prefix: str, checkpoint: SafetensorsCheckpoint,
                  spec: QuantSpec, fmt: str, device: torch.device, dtype: torch.dtype, input_ids: Tensor | None,
                  final_hidden: list[Tensor] | None) -> tuple[str, dict[str, Tensor], GPTQResult]:
    """Quantize the output head; returns (module name, packed tensors, result)."""
    head_name, weight_name = head_names(model, checkpoint)
    weight = checkpoint.get(weight_name).to(device, torch.float32)
    if spec.method == "gptq":
        with outer_modules_materialized(model, layers_prefix, checkpoint, device, dtype):
            H = collect_head_hessian(model, layers, model.get_output_embeddings(), input_ids, final_hidden, device,
                                     dtype)
        try:
            res = gptq_quantize(weight, H, spec, consume_hessian=True)
        except NumericalError as e:
            raise NumericalError(f"{head_name}: {e}") from None
        res = res.cpu()
    else:
        res = rtn_result(weight, spec)
    bias = checkpoint.get(f"{head_name}.bias") if f"{head_name}.bias" in checkpoint else None
    return head_name, module_tensors(head_name, res, spec.bits, fmt, bias), res
