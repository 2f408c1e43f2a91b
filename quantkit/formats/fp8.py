"""Fine-grained FP8 checkpoints (quant_method "fp8": DeepSeek-V3 style, transformers' FineGrainedFP8Config),
dequantized in pure torch as transformers' integrations/finegrained_fp8.py (Fp8Dequantize) computes them.

Per Linear:
  weight            float8_e4m3fn [out, in]
  weight_scale_inv  [ceil(out/B0), ceil(in/B1)] for weight_block_size [B0, B1] (a single value when the block size
                    is null: one scale for the whole tensor); float32 (scale_fmt "float"), or a power of two stored
                    as float8_e8m0fnu or as its uint8 exponent byte (scale_fmt "ue8m0")
  activation_scale  float32 scalar, with activation_scheme "static" only (read by the FP8 matmul, not here)
  weight[o, i] = float32(fp8[o, i]) * float32(scale_inv[o // B0, i // B1]), in float32.
Both activation schemes quantize the activations at inference (per 1x128 group on the fly, or with the static
scale); a weight-only dequantization cannot reproduce that, so the settings say activations_quantized.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from quantkit.errors import QuantkitError
from quantkit.formats.view import ACTIVATIONS_QUANTIZED, PackedLinears, Shapes
from quantkit.untrusted import field

FORMAT = "fp8"
WHERE = "quantization_config"
DEFAULT_BLOCK = [128, 128]  # FineGrainedFP8Config's weight_block_size when the key is absent
ACTIVATION_SCHEMES = ("dynamic", "static")
FLOAT_SCALES = "float"
UE8M0_SCALES = "ue8m0"
FLOAT_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
UE8M0_SCALE_DTYPES = (torch.float8_e8m0fnu, torch.uint8)
UE8M0_BIAS = 127  # a ue8m0 byte b stands for 2 ** (b - 127)
E4M3 = "e4m3"  # DeepSeek-V3's "fmt": the weights' FP8 type
PARTS = ("weight", "weight_scale_inv")
OPTIONAL = ("activation_scale",)


def layout(qcfg: dict) -> PackedLinears:
    """The FP8 layout for a checkpoint's quantization_config; QuantkitError for a setting it cannot read."""
    block = block_size(qcfg)
    scheme = setting(qcfg, "activation_scheme", str, ACTIVATION_SCHEMES[0]).lower()
    if scheme not in ACTIVATION_SCHEMES:
        raise QuantkitError(f"{WHERE}.activation_scheme = {scheme[:30]!r}: expected one of "
                            f"{', '.join(ACTIVATION_SCHEMES)}")
    scale_fmt = setting(qcfg, "scale_fmt", str, FLOAT_SCALES)
    if scale_fmt not in (FLOAT_SCALES, UE8M0_SCALES):
        raise QuantkitError(f"{WHERE}.scale_fmt = {scale_fmt[:30]!r}: expected {FLOAT_SCALES!r} or {UE8M0_SCALES!r}")
    if setting(qcfg, "fmt", str, E4M3) != E4M3:
        raise QuantkitError(f"{WHERE}.fmt = {qcfg['fmt'][:30]!r}: quantkit reads float8_e4m3fn weights ({E4M3!r})")
    expert_dtype = setting(qcfg, "expert_dtype", str, "fp8")
    if expert_dtype != "fp8":
        raise QuantkitError(f"{WHERE}.expert_dtype = {expert_dtype[:30]!r}: quantkit reads FP8 experts only")
    if setting(qcfg, "modules_to_convert", list, []):
        raise QuantkitError(f"{WHERE}.modules_to_convert lists modules beyond the Linears (FP8 embeddings), "
                            "which quantkit does not read")
    for key in ("modules_to_not_convert", "ignored_layers"):
        names = setting(qcfg, key, list, [])
        if not all(isinstance(n, str) for n in names):
            raise QuantkitError(f"{WHERE}.{key} holds {str(names)[:60]}, expected a list of module names")

    def dequantize(t: dict[str, Tensor]) -> Tensor:
        return dequantize_fp8(t["weight"], t["weight_scale_inv"], block, scale_fmt)

    def weight_shape(s: Shapes) -> tuple[int, int]:
        return fp8_shape(s["weight"], s["weight_scale_inv"], block)

    return PackedLinears(FORMAT, "weight_scale_inv", PARTS, dequantize, weight_shape, optional=OPTIONAL,
                         settings={"weight_block_size": block, "activation_scheme": scheme, "scale_fmt": scale_fmt,
                                   ACTIVATIONS_QUANTIZED: True})


def setting(qcfg: dict, key: str, expect: type, default: Any) -> Any:
    """qcfg[key] of type `expect`, or `default` when the key is absent or null."""
    return default if qcfg.get(key) is None else field(qcfg, key, expect, WHERE)


def block_size(qcfg: dict) -> list[int] | None:
    """weight_block_size [rows, cols]: the default when absent, None (one scale per tensor) when null."""
    if "weight_block_size" not in qcfg:
        return list(DEFAULT_BLOCK)
    block = qcfg["weight_block_size"]
    if block is None:
        return None
    if not (isinstance(block, list) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise QuantkitError(f"{WHERE}.weight_block_size = {str(block)[:60]}: expected two positive integers")
    return [block[0], block[1]]


def scale_grid(n_out: int, n_in: int, block: list[int] | None) -> tuple[int, int]:
    """The shape of weight_scale_inv for a [n_out, n_in] weight: one scale per block, partial blocks included."""
    if block is None:
        return 1, 1
    return -(n_out // -block[0]), -(n_in // -block[1])


def fp8_shape(weight: tuple[int, ...], scale: tuple[int, ...], block: list[int] | None) -> tuple[int, int]:
    """(out, in) from the headers, checking that weight_scale_inv holds one scale per block."""
    if len(weight) != 2 or 0 in weight:
        raise ValueError(f"weight is {list(weight)}, expected a non-empty [out, in] matrix")
    n_out, n_in = weight
    if block is None:
        if len(scale) > 2 or any(d != 1 for d in scale):
            raise ValueError(f"weight_scale_inv is {list(scale)}, expected one value (weight_block_size is null)")
    elif tuple(scale) != scale_grid(n_out, n_in, block):
        raise ValueError(f"weight_scale_inv is {list(scale)}, expected {list(scale_grid(n_out, n_in, block))} for "
                         f"a [{n_out}, {n_in}] weight in blocks of {block}")
    return n_out, n_in


def scales_float32(scale: Tensor, scale_fmt: str) -> Tensor:
    """weight_scale_inv as float32 values, refusing a dtype its scale_fmt does not store."""
    allowed = FLOAT_SCALE_DTYPES if scale_fmt == FLOAT_SCALES else UE8M0_SCALE_DTYPES
    if scale.dtype not in allowed:
        raise ValueError(f"weight_scale_inv is {scale.dtype}, but scale_fmt {scale_fmt!r} stores "
                         f"{' or '.join(str(d) for d in allowed)}")
    if scale.dtype == torch.uint8:
        return (scale.to(torch.float32) - UE8M0_BIAS).exp2()
    return scale.to(torch.float32)


def dequantize_fp8(weight: Tensor, scale: Tensor, block: list[int] | None, scale_fmt: str) -> Tensor:
    """Float32 weight [out, in] from one Linear's FP8 tensors; ValueError on a dtype or shape it cannot read."""
    n_out, n_in = fp8_shape(tuple(weight.shape), tuple(scale.shape), block)
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"weight is {weight.dtype}, expected torch.float8_e4m3fn")
    s = scales_float32(scale, scale_fmt)
    out = weight.to(torch.float32)
    if block is None:
        return out.mul_(s.reshape(()))
    rows = s.repeat_interleave(block[0], dim=0)[:n_out]                        # [out, column blocks]
    whole = n_in // block[1]
    # whole column blocks through a view of the weight, so no [out, in] copy of the scales is made
    out[:, : whole * block[1]].unflatten(-1, (whole, block[1])).mul_(rows[:, :whole, None])
    out[:, whole * block[1]:].mul_(rows[:, whole:])
    return out
