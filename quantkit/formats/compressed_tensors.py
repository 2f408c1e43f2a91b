"""compressed-tensors checkpoints (quant_method "compressed-tensors", as llm-compressor writes them), dequantized in
pure torch as compressed-tensors' own compressors (compressors/pack_quantized, compressors/naive_quantized and
quantization/lifecycle/forward.py `dequantize`) compute them.

Per quantized Linear ([out, in] weight), by the format of its config group:
  pack-quantized   weight_packed int32 [out, ceil(in*b/32)]: code k of a row at bits k*b.. of the row's bit
                   stream (dense, low bits first), stored as code + 2^(b-1); weight_shape int [2] = [out, in]
  int-quantized, float-quantized, naive-quantized
                   weight int8 (type int) or float8_e4m3fn (type float) [out, in]
  weight_scale     float32/float16/bfloat16: [1] (strategy tensor), [out, 1] (channel), [out, in/g] (group),
                   [ceil(out/B0), ceil(in/B1)] (block)
  weight_zero_point  asymmetric only, the scales' shape; pack-quantized packs it along out for group and channel
                   ([ceil(out*b/32), groups], same offset), other formats store int8
  weight_g_idx     int [in], each input's group: actorder "group" (written by compressed-tensors before 0.20)
  input_/output_scale, input_/output_zero_point: static activation quantization, read by the kernels, not here
  weight[o, i] = (code - zero[o, g(i)]) * scale[o, g(i)], computed in the scales' dtype as compressed-tensors does.
The quantized Linears must share one weights scheme: a layout dequantizes from its tensors alone, without the module
name that config_groups' targets would need. Activation or KV-cache quantization cannot be reproduced by a weight-only
dequantization: the checkpoint is read, and the settings say activations_quantized.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from quantkit.errors import QuantkitError
from quantkit.formats.view import ACTIVATIONS_QUANTIZED, PackedLinears, Shapes
from quantkit.untrusted import field

FORMAT = "compressed-tensors"
WHERE = "quantization_config"
PACKED = "pack-quantized"
UNPACKED = ("int-quantized", "float-quantized", "naive-quantized")
FORMATS = (PACKED, *UNPACKED)
COMPRESSED = "compressed"
INT, FLOAT = "int", "float"
TENSOR, CHANNEL, GROUP, BLOCK = "tensor", "channel", "group", "block"
STRATEGIES = (TENSOR, CHANNEL, GROUP, BLOCK)
PER_CHANNEL_GROUP = -1  # group_size -1 means strategy channel (QuantizationArgs' inference)
INT_BITS = range(2, 9)
FLOAT_BITS = 8
DEFAULT_BITS = 8  # QuantizationArgs' defaults for absent keys
WORD_BITS = 32
GROUP_ORDERS = ("group", "dynamic")  # actorder values that store weight_g_idx
OTHER_ORDERS = ("weight", "static")  # actorder values that only changed the calibration
PACKED_ZERO_POINTS = (GROUP, CHANNEL)  # strategies whose zero points pack-quantized packs along out
SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
ZERO_POINT_DTYPES = (torch.int8, torch.int32)
ACTIVATION_PARTS = ("input_scale", "input_zero_point", "output_scale", "output_zero_point")


@dataclass(frozen=True)
class WeightScheme:
    """The weights settings one config group gives its Linears, checked."""

    format: str
    num_bits: int
    type: str
    symmetric: bool
    strategy: str
    group_size: int | None
    block_structure: tuple[int, int] | None
    g_idx: bool  # actorder "group": weight_g_idx says each input's group

    @property
    def qmin(self) -> int:
        return -(1 << (self.num_bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.num_bits - 1)) - 1


def layout(qcfg: dict) -> PackedLinears:
    """The compressed-tensors layout for a checkpoint's quantization_config; QuantkitError for what it cannot read."""
    check_status(qcfg)
    groups = field(qcfg, "config_groups", dict, WHERE)
    default_format = setting(qcfg, "format", str, None, WHERE)
    schemes: dict[str, WeightScheme] = {}
    activations = False
    for name, group in groups.items():
        where = f"{WHERE}.config_groups.{name}"
        if not isinstance(group, dict):
            raise QuantkitError(f"{where} is {str(group)[:60]}, not a scheme (quantkit does not expand preset names)")
        targets = field(group, "targets", list, where)
        if not all(isinstance(t, str) for t in targets):
            raise QuantkitError(f"{where}.targets holds {str(targets)[:60]}, expected module names or patterns")
        for key in ("input_activations", "output_activations"):
            activations |= setting(group, key, dict, None, where) is not None
        weights = setting(group, "weights", dict, None, where)
        if weights is not None:
            fmt = setting(group, "format", str, None, where) or default_format
            schemes[name] = weight_scheme(weights, fmt, where)
    scheme = one_scheme(schemes)
    kv_cache = setting(qcfg, "kv_cache_scheme", dict, None, WHERE) is not None
    ignore = setting(qcfg, "ignore", list, [], WHERE)
    if not all(isinstance(n, str) for n in ignore):
        raise QuantkitError(f"{WHERE}.ignore holds {str(ignore)[:60]}, expected module names or patterns")
    settings = {**asdict(scheme), ACTIVATIONS_QUANTIZED: activations or kv_cache, "kv_cache_quantized": kv_cache}
    optional = ("weight_zero_point", "weight_g_idx", *ACTIVATION_PARTS)
    if scheme.format == PACKED:
        return PackedLinears(FORMAT, "weight_packed", ("weight_packed", "weight_scale", "weight_shape"),
                             lambda t: dequantize_packed(t, scheme), lambda s: packed_shape(s, scheme),
                             optional=optional, settings=settings)
    return PackedLinears(FORMAT, "weight_scale", ("weight", "weight_scale"), lambda t: dequantize_unpacked(t, scheme),
                         lambda s: unpacked_shape(s, scheme), optional=optional, settings=settings)


def setting(mapping: dict, key: str, expect: type | tuple[type, ...], default: Any, where: str) -> Any:
    """mapping[key] of type `expect`, or `default` when the key is absent or null."""
    return default if mapping.get(key) is None else field(mapping, key, expect, where)


def check_status(qcfg: dict) -> None:
    """Only compressed, dense, untransformed checkpoints: the other statuses and add-ons store other tensors."""
    status = setting(qcfg, "quantization_status", str, None, WHERE)
    if status != COMPRESSED:
        raise QuantkitError(f"{WHERE}.quantization_status = {str(status)[:30]!r}: quantkit reads {COMPRESSED!r} "
                            "checkpoints only (the others store float weights that are not yet packed)")
    sparsity = setting(qcfg, "sparsity_config", dict, {}, WHERE)
    if sparsity and sparsity.get("format", "dense") != "dense":
        raise QuantkitError(f"{WHERE}.sparsity_config.format = {str(sparsity.get('format'))[:30]!r}: quantkit "
                            "does not read sparse compressed-tensors checkpoints")
    transform = setting(qcfg, "transform_config", dict, {}, WHERE)
    if transform.get("config_groups"):
        raise QuantkitError(f"{WHERE}.transform_config holds rotations, which quantkit does not apply")
    if setting(qcfg, "moe_sparsity_config", dict, {}, WHERE):
        raise QuantkitError(f"{WHERE}.moe_sparsity_config is set: quantkit does not read pruned experts")


def weight_scheme(args: dict, fmt: str | None, where: str) -> WeightScheme:
    """One group's `weights` (QuantizationArgs) and format, checked; QuantkitError naming the key otherwise."""
    where = f"{where}.weights"
    if fmt not in FORMATS:
        raise QuantkitError(f"{where}: format {str(fmt)[:30]!r} is not one quantkit reads ({', '.join(FORMATS)})")
    num_bits = setting(args, "num_bits", int, DEFAULT_BITS, where)
    kind = setting(args, "type", str, INT, where).lower()
    symmetric = setting(args, "symmetric", bool, True, where)
    group_size = setting(args, "group_size", int, None, where)
    if kind == INT and num_bits not in INT_BITS:
        raise QuantkitError(f"{where}.num_bits = {num_bits}: quantkit reads int weights of 2 to 8 bits")
    if kind == FLOAT and (num_bits != FLOAT_BITS or not symmetric or fmt == PACKED):
        raise QuantkitError(f"{where}: type float with num_bits {num_bits}, symmetric {symmetric} in {fmt}: "
                            "quantkit reads symmetric float8_e4m3fn weights only (nvfp4/mxfp formats are not read)")
    if kind not in (INT, FLOAT):
        raise QuantkitError(f"{where}.type = {kind[:30]!r}: expected {INT!r} or {FLOAT!r}")
    if setting(args, "dynamic", (bool, str), False, where) is not False:
        raise QuantkitError(f"{where}.dynamic = {args['dynamic']!r}: weights are quantized once, not dynamically")
    strategy = strategy_of(args, group_size, where)
    block = block_structure(args.get("block_structure"), strategy, where)
    if (strategy == GROUP) != (group_size is not None and group_size > 0):
        raise QuantkitError(f"{where}: strategy {strategy} with group_size {group_size}; group_size must be positive "
                            "for strategy group and unset otherwise")
    order = args.get("actorder")
    if not (order is None or order is False or order in GROUP_ORDERS or order in OTHER_ORDERS):
        raise QuantkitError(f"{where}.actorder = {str(order)[:30]!r}: expected null, weight, static or group")
    g_idx = order in GROUP_ORDERS
    if g_idx and strategy != GROUP:
        raise QuantkitError(f"{where}.actorder = {order!r} needs strategy group, not {strategy}")
    return WeightScheme(fmt, num_bits, kind, symmetric, strategy, group_size if strategy == GROUP else None, block,
                        g_idx)


def strategy_of(args: dict, group_size: int | None, where: str) -> str:
    """strategy, or the one QuantizationArgs infers from group_size when it is absent."""
    strategy = setting(args, "strategy", str, None, where)
    if strategy is None:
        strategy = TENSOR if group_size is None else CHANNEL if group_size == PER_CHANNEL_GROUP else GROUP
    strategy = strategy.lower()
    if strategy not in STRATEGIES:
        raise QuantkitError(f"{where}.strategy = {strategy[:30]!r}: quantkit reads {', '.join(STRATEGIES)} weights")
    return strategy


def block_structure(value: object, strategy: str, where: str) -> tuple[int, int] | None:
    """block_structure [rows, cols] (or compressed-tensors' older "RxC" text), required by strategy block only."""
    if value is None and strategy != BLOCK:
        return None
    if isinstance(value, str) and value.count("x") == 1 and all(p.isdigit() for p in value.split("x")):
        value = [int(p) for p in value.split("x")]
    if strategy != BLOCK or not (isinstance(value, list) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise QuantkitError(f"{where}.block_structure = {str(value)[:40]} with strategy {strategy}: strategy block "
                            "needs two positive integers, the others none")
    return value[0], value[1]


def one_scheme(schemes: dict[str, WeightScheme]) -> WeightScheme:
    """The weights scheme every quantized Linear shares; QuantkitError when the groups disagree or none quantizes."""
    if not schemes:
        raise QuantkitError(f"{WHERE}.config_groups: no group quantizes weights")
    (first, scheme), *rest = schemes.items()
    for name, other in rest:
        if other != scheme:
            differ = next(k for k, v in asdict(other).items() if asdict(scheme)[k] != v)
            raise QuantkitError(f"{WHERE}.config_groups: {name} and {first} quantize weights differently ({differ} "
                                f"{asdict(other)[differ]} vs {asdict(scheme)[differ]}); quantkit reads checkpoints "
                                "whose quantized Linears share one weights scheme")
    return scheme


def scale_shape(scheme: WeightScheme, n_out: int, n_in: int) -> tuple[int, ...]:
    """The shape of weight_scale (and of an unpacked zero point) for a [n_out, n_in] weight."""
    if scheme.strategy == TENSOR:
        return (1,)
    if scheme.strategy == CHANNEL:
        return n_out, 1
    if scheme.strategy == GROUP:
        assert scheme.group_size is not None
        return n_out, -(n_in // -scheme.group_size)
    assert scheme.block_structure is not None
    rows, cols = scheme.block_structure
    return -(n_out // -rows), -(n_in // -cols)


def check_parts(s: Shapes, scheme: WeightScheme, n_out: int, n_in: int) -> None:
    """The scale, zero point and g_idx headers against a [n_out, n_in] weight; ValueError naming the part."""
    if scheme.strategy == GROUP and n_in % (scheme.group_size or 1):
        raise ValueError(f"in_features {n_in} is not a multiple of group_size {scheme.group_size}")
    expected = scale_shape(scheme, n_out, n_in)
    if tuple(s["weight_scale"]) != expected:
        raise ValueError(f"weight_scale is {list(s['weight_scale'])}, expected {list(expected)} for a "
                         f"[{n_out}, {n_in}] weight ({scheme.strategy})")
    if "weight_zero_point" not in s and not scheme.symmetric:
        raise ValueError("weight_zero_point is missing (the config says symmetric: false)")
    if "weight_zero_point" in s and not scheme.symmetric:
        zp = expected
        if scheme.format == PACKED and scheme.strategy in PACKED_ZERO_POINTS:
            zp = (-(n_out * scheme.num_bits // -WORD_BITS), expected[1])
        if tuple(s["weight_zero_point"]) != zp:
            raise ValueError(f"weight_zero_point is {list(s['weight_zero_point'])}, expected {list(zp)}")
    if "weight_g_idx" in s and (not scheme.g_idx or tuple(s["weight_g_idx"]) != (n_in,)):
        raise ValueError(f"weight_g_idx is {list(s['weight_g_idx'])}, expected "
                         f"{[n_in] if scheme.g_idx else 'none (actorder is not group)'}")


def packed_shape(s: Shapes, scheme: WeightScheme) -> tuple[int, int]:
    """(out, in) of a pack-quantized Linear from its headers: in is the group count times group_size, or, without
    groups, the most codes the packed words hold (dequantize checks it against weight_shape)."""
    packed = s["weight_packed"]
    if len(packed) != 2 or 0 in packed or tuple(s["weight_shape"]) != (2,):
        raise ValueError(f"weight_packed is {list(packed)} and weight_shape {list(s['weight_shape'])}, expected "
                         "[out, words] and [2]")
    n_out, words = packed
    if scheme.strategy == GROUP and len(s["weight_scale"]) == 2:
        assert scheme.group_size is not None
        n_in = s["weight_scale"][1] * scheme.group_size
    else:
        n_in = words * WORD_BITS // scheme.num_bits
    if -(n_in * scheme.num_bits // -WORD_BITS) != words:
        raise ValueError(f"weight_packed is {list(packed)}, but weight_scale {list(s['weight_scale'])} implies "
                         f"{n_in} inputs of {scheme.num_bits} bits")
    check_parts(s, scheme, n_out, n_in)
    return n_out, n_in


def unpacked_shape(s: Shapes, scheme: WeightScheme) -> tuple[int, int]:
    """(out, in) of an int-, float- or naive-quantized Linear from its headers."""
    weight = s["weight"]
    if len(weight) != 2 or 0 in weight:
        raise ValueError(f"weight is {list(weight)}, expected a non-empty [out, in] matrix")
    check_parts(s, scheme, weight[0], weight[1])
    return weight[0], weight[1]


def unpack_rows(packed: Tensor, bits: int, n: int) -> Tensor:
    """int32 [rows, ceil(n*bits/32)] -> int32 codes [rows, n] with the 2^(bits-1) offset removed: code k from bits
    k*bits.. of the row's words, low bits first (a code may span two words when bits does not divide 32)."""
    offset = 1 << (bits - 1)
    if WORD_BITS % bits == 0:
        shifts = torch.arange(0, WORD_BITS, bits, dtype=torch.int32)
        codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)           # [rows, words, 32/bits]
        return codes.reshape(packed.shape[0], -1)[:, :n] - offset
    words = torch.nn.functional.pad(packed.to(torch.int64) & 0xFFFFFFFF, (0, 1))  # a zero word past the end
    start = torch.arange(n, dtype=torch.int64) * bits
    low = words[:, start // WORD_BITS] >> (start % WORD_BITS)
    high = words[:, start // WORD_BITS + 1] << (WORD_BITS - start % WORD_BITS)
    return ((low | high) & ((1 << bits) - 1)).to(torch.int32) - offset


def expand(param: Tensor, scheme: WeightScheme, n_out: int, n_in: int, g_idx: Tensor | None) -> Tensor:
    """A scale or zero point [scale_shape] spread to the weight's [n_out, n_in] (or a shape that broadcasts to it)."""
    if scheme.strategy in (TENSOR, CHANNEL):
        return param.reshape(-1, 1)
    if scheme.strategy == GROUP:
        assert scheme.group_size is not None
        group = g_idx if g_idx is not None else torch.arange(n_in) // scheme.group_size
        return param[:, group]
    assert scheme.block_structure is not None
    rows, cols = scheme.block_structure
    return param.repeat_interleave(rows, dim=0)[:n_out].repeat_interleave(cols, dim=1)[:, :n_in]


def group_index(t: dict[str, Tensor], scheme: WeightScheme, n_in: int) -> Tensor | None:
    """weight_g_idx as int64 group numbers (None when inputs follow column order), checked against the groups."""
    if not scheme.g_idx:
        return None
    if "weight_g_idx" not in t:
        raise ValueError("weight_g_idx is missing (actorder group stores each input's group)")
    g_idx = t["weight_g_idx"]
    if g_idx.dtype not in INDEX_DTYPES:
        raise ValueError(f"weight_g_idx is {g_idx.dtype}, expected torch.int32 or torch.int64")
    if bool((g_idx == -1).all()):  # compressed-tensors' initial value: the calibration kept column order
        return None
    groups = t["weight_scale"].shape[1]
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
        raise ValueError(f"weight_g_idx holds groups outside [0, {groups})")
    return g_idx.to(torch.int64)


def affine(codes: Tensor, t: dict[str, Tensor], scheme: WeightScheme, zero_point: Tensor | None) -> Tensor:
    """(codes - zero) * scale in the scales' dtype, as compressed-tensors' dequantize computes it; float32 out."""
    scale = t["weight_scale"]
    if scale.dtype not in SCALE_DTYPES:
        raise ValueError(f"weight_scale is {scale.dtype}, expected torch.float32, torch.float16 or torch.bfloat16")
    n_out, n_in = codes.shape
    g_idx = group_index(t, scheme, n_in)
    weight = codes.to(scale.dtype)
    if zero_point is not None:
        weight = weight - expand(zero_point, scheme, n_out, n_in, g_idx).to(scale.dtype)
    return (weight * expand(scale, scheme, n_out, n_in, g_idx)).float()


def zero_point_of(t: dict[str, Tensor], scheme: WeightScheme, n_out: int) -> Tensor | None:
    """The zero points as int codes in the scales' shape (unpacked when pack-quantized packs them), checked."""
    if scheme.symmetric:  # older compressed-tensors also wrote symmetric schemes' zero points: all zeros
        if "weight_zero_point" in t and bool(t["weight_zero_point"].any()):
            raise ValueError("weight_zero_point holds non-zero values, but the config says symmetric: true")
        return None
    if "weight_zero_point" not in t:
        raise ValueError("weight_zero_point is missing (the config says symmetric: false)")
    zp = t["weight_zero_point"]
    if zp.dtype not in ZERO_POINT_DTYPES:
        raise ValueError(f"weight_zero_point is {zp.dtype}, expected torch.int8 or torch.int32")
    if scheme.format == PACKED and scheme.strategy in PACKED_ZERO_POINTS:
        if zp.dtype != torch.int32:
            raise ValueError(f"weight_zero_point is {zp.dtype}, expected packed torch.int32")
        return unpack_rows(zp.t(), scheme.num_bits, n_out).t()
    if int(zp.min()) < scheme.qmin or int(zp.max()) > scheme.qmax:
        raise ValueError(f"weight_zero_point holds values outside int{scheme.num_bits}'s [{scheme.qmin}, "
                         f"{scheme.qmax}]")
    return zp


def dequantize_packed(t: dict[str, Tensor], scheme: WeightScheme) -> Tensor:
    """Float32 weight [out, in] from a pack-quantized Linear; ValueError on a dtype or shape it cannot read."""
    packed, shape = t["weight_packed"], t["weight_shape"]
    n_out, n_in = packed_shape({k: tuple(v.shape) for k, v in t.items()}, scheme)
    if packed.dtype != torch.int32 or shape.dtype not in INDEX_DTYPES:
        raise ValueError(f"weight_packed is {packed.dtype} and weight_shape {shape.dtype}, expected torch.int32 and "
                         "an integer dtype")
    if shape.tolist() != [n_out, n_in]:
        raise ValueError(f"weight_shape says {shape.tolist()}, its packed width and scales imply [{n_out}, {n_in}] "
                         f"(without groups quantkit reads in_features that fill whole int32 words)")
    codes = unpack_rows(packed, scheme.num_bits, n_in)
    return affine(codes, t, scheme, zero_point_of(t, scheme, n_out))


def dequantize_unpacked(t: dict[str, Tensor], scheme: WeightScheme) -> Tensor:
    """Float32 weight [out, in] from an int-, float- or naive-quantized Linear; ValueError on what it cannot read."""
    weight = t["weight"]
    n_out, _ = unpacked_shape({k: tuple(v.shape) for k, v in t.items()}, scheme)
    expected = torch.int8 if scheme.type == INT else torch.float8_e4m3fn
    if weight.dtype != expected:
        raise ValueError(f"weight is {weight.dtype}, expected {expected} (type {scheme.type})")
    if scheme.type == INT and (int(weight.min()) < scheme.qmin or int(weight.max()) > scheme.qmax):
        raise ValueError(f"weight holds codes outside int{scheme.num_bits}'s [{scheme.qmin}, {scheme.qmax}]")
    return affine(weight, t, scheme, zero_point_of(t, scheme, n_out))
