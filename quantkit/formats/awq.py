"""AWQ GEMM checkpoints (quant_method "awq", version "gemm": AutoAWQ, GPTQModel, transformers), dequantized in pure
torch as AutoAWQ's and GPTQModel's `dequantize_gemm` (awq/utils/packing_utils.py) computes them.

Per Linear, packed along the output dimension (GPTQ packs qweight along the input):
  qweight  int32 [in, out/8]   eight 4-bit codes a word: bits 4i..4i+3 of word c hold column 8c + AWQ_ORDER[i]
  qzeros   int32 [in/g, out/8] the zero point of each group and column, the same interleave, stored as is (no -1)
  scales   float16 or bfloat16 [in/g, out]
  weight[out, in] = ((code - zero[group]) * scale[group]), computed in the scales' dtype, as AWQ's kernels do.
zero_point false (GPTQModel's sym=True) changes nothing here: the file still holds qzeros (the midpoint) and every
GEMM dequantizer subtracts them; AutoAWQ's own GEMM layer cannot be written without zeros.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from quantkit.errors import QuantkitError
from quantkit.formats.view import PackedLinears, Shapes
from quantkit.untrusted import field

FORMAT = "awq"
# AutoAWQ's ScaledActivation (MPT, Falcon, BLOOM, GPT-NeoX, GPT-J, StarCoder2, GPTBigCode) divides the MLP's activation
# by these; a float model of the base architecture has no place for them
ACTIVATION_SCALES = "act.scales"
WHERE = "quantization_config"
BITS = 4  # AutoAWQ's WQLinear_GEMM packs 4-bit codes only
CODES_PER_WORD = 32 // BITS
CODE_MASK = (1 << BITS) - 1
# nibble i of a word holds column 8c + AWQ_ORDER[i] (AutoAWQ WQLinear_GEMM.from_linear's order_map)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# column j of a word's eight comes from nibble AWQ_REVERSE_ORDER[j] (packing_utils.AWQ_REVERSE_ORDER)
AWQ_REVERSE_ORDER = tuple(AWQ_ORDER.index(j) for j in range(CODES_PER_WORD))
GEMM = "gemm"
DEFAULT_GROUP_SIZE = 128  # transformers' AwqConfig default
PER_COLUMN = -1  # group_size -1: one group spanning all inputs
SCALE_DTYPES = (torch.float16, torch.bfloat16)
PARTS = ("qweight", "qzeros", "scales")


def layout(qcfg: dict) -> PackedLinears:
    """The AWQ GEMM layout for a checkpoint's quantization_config; QuantkitError for a setting it cannot read."""
    bits = setting(qcfg, "bits", int, BITS)
    if bits != BITS:
        raise QuantkitError(f"{WHERE}.bits = {bits}: quantkit reads {BITS}-bit AWQ GEMM checkpoints only")
    group_size = setting(qcfg, "group_size", int, DEFAULT_GROUP_SIZE)
    if group_size != PER_COLUMN and group_size <= 0:
        raise QuantkitError(f"{WHERE}.group_size = {group_size}: expected a positive size or -1 (per column)")
    version = version_of(qcfg)
    zero_point = setting(qcfg, "zero_point", bool, True)
    if setting(qcfg, "desc_act", bool, False):
        raise QuantkitError(f"{WHERE}.desc_act = true: AWQ GEMM stores no act-order (g_idx) and quantkit reads none")
    modules = qcfg.get("modules_to_not_convert")
    if modules is not None and not (isinstance(modules, list) and all(isinstance(m, str) for m in modules)):
        raise QuantkitError(f"{WHERE}.modules_to_not_convert is {str(modules)[:60]}, expected a list of names")

    def dequantize(t: dict[str, Tensor]) -> Tensor:
        return dequantize_gemm(t["qweight"], t["qzeros"], t["scales"], group_size)

    def weight_shape(s: Shapes) -> tuple[int, int]:
        return gemm_shape(s, group_size)

    return PackedLinears(FORMAT, "qweight", PARTS, dequantize, weight_shape, refused=(ACTIVATION_SCALES,),
                         settings={"bits": bits, "group_size": group_size, "zero_point": zero_point,
                                   "version": version})


def setting(qcfg: dict, key: str, expect: type, default: Any) -> Any:
    """qcfg[key] of type `expect`, or `default` when the key is absent (as transformers' AwqConfig reads it)."""
    return default if qcfg.get(key) is None else field(qcfg, key, expect, WHERE)


def version_of(qcfg: dict) -> str:
    """The GEMM packing, from `version` (AutoAWQ) or `format` (GPTQModel, transformers v5): version wins."""
    key = "version" if qcfg.get("version") is not None else "format"
    version = setting(qcfg, key, str, GEMM)
    if version.lower() != GEMM:
        raise QuantkitError(f"{WHERE}.{key} = {version[:30]!r}: quantkit reads AWQ's {GEMM!r} packing only "
                            "(GEMV and the Marlin/ExLlama repacks store the codes in other orders)")
    return GEMM


def gemm_shape(s: Shapes, group_size: int) -> tuple[int, int]:
    """(out, in) from the parts' headers, checking that they agree with each other and with group_size."""
    qweight, qzeros, scales = s["qweight"], s["qzeros"], s["scales"]
    if len(qweight) != 2 or len(qzeros) != 2 or len(scales) != 2:
        raise ValueError(f"qweight {list(qweight)}, qzeros {list(qzeros)} and scales {list(scales)} must be 2-D")
    n_in, n_out = qweight[0], scales[1]
    groups = 1 if group_size == PER_COLUMN else n_in // group_size
    if n_in == 0 or n_out == 0 or (group_size != PER_COLUMN and n_in % group_size):
        raise ValueError(f"qweight {list(qweight)} holds {n_in} inputs, not a positive multiple of group_size "
                         f"{group_size}")
    packed_out = -(n_out // -CODES_PER_WORD)
    if qweight[1] != packed_out or n_out % CODES_PER_WORD:
        raise ValueError(f"qweight is {list(qweight)}, scales {list(scales)}: expected qweight [{n_in}, {n_out}/8]")
    if scales[0] != groups or tuple(qzeros) != (groups, packed_out):
        raise ValueError(f"scales {list(scales)} and qzeros {list(qzeros)} do not hold {groups} groups of "
                         f"{n_in} inputs (group_size {group_size})")
    return n_out, n_in


def unpack_columns(packed: Tensor) -> Tensor:
    """int32 [rows, cols/8] in AWQ's interleave -> int32 codes [rows, cols] in column order."""
    shifts = torch.arange(0, 32, BITS, dtype=torch.int32)
    nibbles = (packed.unsqueeze(-1) >> shifts) & CODE_MASK                    # [rows, cols/8, 8], nibble order
    return nibbles[..., list(AWQ_REVERSE_ORDER)].reshape(packed.shape[0], -1)


def dequantize_gemm(qweight: Tensor, qzeros: Tensor, scales: Tensor, group_size: int) -> Tensor:
    """Float32 weight [out, in] from one Linear's AWQ GEMM tensors; ValueError on a dtype or shape it cannot read."""
    gemm_shape({"qweight": tuple(qweight.shape), "qzeros": tuple(qzeros.shape), "scales": tuple(scales.shape)},
               group_size)
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"qweight is {qweight.dtype} and qzeros {qzeros.dtype}, expected torch.int32")
    if scales.dtype not in SCALE_DTYPES:
        raise ValueError(f"scales are {scales.dtype}, expected torch.float16 or torch.bfloat16")
    n_in = qweight.shape[0]
    group = torch.arange(n_in) // (n_in // scales.shape[0])                    # [in]: each input's group
    codes = unpack_columns(qweight)                                            # [in, out]
    zeros = unpack_columns(qzeros)[group]                                      # [in, out]
    weight = (codes - zeros) * scales[group]                                   # in the scales' dtype
    return weight.t().float().contiguous()
