"""GPTQ checkpoint tensors and config: solver results <-> the on-disk dict, and back to float weights.

Per quantized Linear W [out=N, in=K], bits b, G groups:
  <module>.qweight int32 [K*b/32, N]   codes packed along the input dim (see packing.py)
  <module>.qzeros  int32 [G, N*b/32]   zero points packed along the output dim; v1 ("gptq") stores zero - 1
  <module>.scales  float16 [G, N]
  <module>.g_idx   int32 [K]           group of each input channel
  <module>.bias    float16 [N]         only if the Linear has one
Dequantize: W[n, k] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n]).
"""
from __future__ import annotations

import torch
from torch import Tensor

from quantkit.config import QuantSpec
from quantkit.solve.gptq import GPTQResult
from quantkit.solve.grid import dequantize_grouped
from quantkit.write.packing import (
    pack_qweight,
    pack_qzeros,
    unpack_qweight,
    unpack_qzeros,
)

QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def checkpoint_format(spec: QuantSpec) -> str:
    """v1 ("gptq") stores zero-1, which underflows for an asymmetric zero of 0; asymmetric runs use v2."""
    if spec.is_bnb:
        return "bitsandbytes"
    if spec.is_gguf:
        return "gguf"
    return "gptq" if spec.sym else "gptq_v2"


def zero_offset(fmt: str) -> int:
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"unknown GPTQ checkpoint_format {fmt!r} (expected 'gptq' or 'gptq_v2')")
    return 1 if fmt == "gptq" else 0


def module_tensors(name: str, result: GPTQResult, bits: int, fmt: str, bias: Tensor | None = None) -> dict[str, Tensor]:
    """The flat tensors one quantized Linear contributes to the checkpoint."""
    stored_zeros = result.zeros - zero_offset(fmt)  # [N, G]
    out = {
        f"{name}.qweight": pack_qweight(result.codes, bits),
        f"{name}.qzeros": pack_qzeros(stored_zeros.t().contiguous(), bits),
        f"{name}.scales": result.scales.t().contiguous().half(),
        f"{name}.g_idx": result.g_idx.to(torch.int32).contiguous(),
    }
    if bias is not None:
        out[f"{name}.bias"] = bias.detach().half().contiguous()
    return out


def dequantize_module(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int,
                      fmt: str) -> Tensor:
    """Float32 weight [N, K] from one module's stored tensors, exactly as a GPTQ loader defines it."""
    n_out = scales.shape[1]
    n_in = g_idx.shape[0]
    codes = unpack_qweight(qweight, bits, n_in)                               # [N, K]
    zeros = unpack_qzeros(qzeros, bits, n_out).t() + zero_offset(fmt)         # [N, G]
    return dequantize_grouped(codes, scales.t().float(), zeros, g_idx)


def quantization_config(spec: QuantSpec, version: str, modules_in_block: list[list[str]] | None = None) -> dict:
    """The `quantization_config` dict for config.json (also written as quantize_config.json)."""
    cfg = {
        "quant_method": "gptq",
        "bits": spec.bits,
        "group_size": spec.group_size,
        "desc_act": spec.desc_act,
        "sym": spec.sym,
        "true_sequential": spec.true_sequential,
        "damp_percent": spec.damp,
        "static_groups": spec.static_groups,
        "checkpoint_format": checkpoint_format(spec),
        "meta": {"quantizer": [f"quantkit:{version}"], "method": spec.method,
                 "act_order": spec.act_order and spec.method == "gptq", "clip_search": spec.clip_search},
    }
    if spec.lm_head:
        cfg["lm_head"] = True  # gptqmodel's and vLLM's key for a quantized output head
    if modules_in_block:
        cfg["modules_in_block_to_quantize"] = modules_in_block
    return cfg
