"""bitsandbytes checkpoints (quant_method "bitsandbytes", as transformers saves them), dequantized in pure torch as
bitsandbytes 0.50 computes them: 4-bit NF4/FP4 (functional.dequantize_4bit) and LLM.int8 (int8_vectorwise_dequant).

4-bit, per Linear (nn.modules.Params4bit + QuantState.as_dict(packed=True)):
  weight                                 packed codes, two per byte, high nibble first: [ceil(out*in/2), 1] bytes,
                                         stored as bnb_4bit_quant_storage (uint8 unless the config says otherwise)
  weight.absmax                          float32 [ceil(out*in/blocksize)], one scale per block of the flattened
                                         weight; uint8 codes of those scales when nested (double quantization)
  weight.quant_map                       float32 [16], the code table (bitsandbytes reads its own table for the
                                         quant type and ignores this copy; a copy that differs is refused)
  weight.nested_absmax                   nested only: float32 [ceil(len(absmax)/nested_blocksize)]
  weight.nested_quant_map                nested only: float32 [256], the table of the absmax codes
  weight.quant_state.bitsandbytes__<qt>  uint8 bytes of a JSON object: quant_type, blocksize, dtype, shape, and
                                         when nested nested_blocksize, nested_dtype, nested_offset
  weight = (table[code] * absmax[block]) rounded to `dtype`; nested: absmax = nested_quant_map[absmax code] *
  nested_absmax[nested block] + nested_offset (functional.dequantize_blockwise, then the offset), in float32.
8-bit (nn.modules.Linear8bitLt._save_to_state_dict): weight int8 [out, in], SCB float32 [out] (each row's absmax),
  weight_format uint8 scalar 0 (row-major, the only layout bitsandbytes reads); weight = weight * SCB / 127.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from quantkit.errors import QuantkitError
from quantkit.formats.view import PackedLinears, Shapes
from quantkit.untrusted import field, parse_json

FORMAT = "bitsandbytes"
QUANT_TYPES = ("nf4", "fp4")
WEIGHT = "weight"
ABSMAX = "weight.absmax"
QUANT_MAP = "weight.quant_map"
NESTED_ABSMAX = "weight.nested_absmax"
NESTED_QUANT_MAP = "weight.nested_quant_map"
QUANT_STATE = "weight.quant_state.bitsandbytes__"  # + the quant type: the 4-bit marker
SCB = "SCB"
WEIGHT_FORMAT = "weight_format"
ROW_MAJOR = 0  # weight_format's one value bitsandbytes loads (utils.LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING["row"])
# bitsandbytes' multiplier for int8 dequantization (1/127 as its int8_vectorwise_dequant writes it)
INT8_RECIPROCAL = 7.874015718698502e-3
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the block sizes dequantize_4bit accepts
FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
STORAGE_DTYPES = {"uint8": torch.uint8, "int8": torch.int8, **FLOAT_DTYPES}
CODES_4BIT = 16
CODES_NESTED = 256  # the nested absmax are 8-bit codes of bitsandbytes' dynamic map
MAX_QUANT_STATE_BYTES = 4096  # the JSON bitsandbytes writes is under 200 bytes
STATE_KEYS = ("quant_type", "blocksize", "dtype", "shape")
NESTED_KEYS = ("nested_blocksize", "nested_dtype", "nested_offset")
# functional.get_4bit_type's tables before normalization (FP4 in bit-pattern order: sign, 2 exponent, 1 mantissa)
NF4_VALUES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
FP4_VALUES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


def code_table(quant_type: str) -> Tensor:
    """The 16 values of a 4-bit code, float32, as functional.get_4bit_type computes them (scaled to [-1, 1])."""
    data = torch.tensor(NF4_VALUES if quant_type == "nf4" else FP4_VALUES, dtype=torch.float32)
    return data.div_(data.abs().max())


@dataclass(frozen=True)
class QuantState:
    """The settings of one 4-bit weight, from its quant_state JSON (checked)."""

    blocksize: int
    dtype: torch.dtype
    shape: tuple[int, int]
    nested_blocksize: int | None = None
    nested_offset: float | None = None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


def blocks(n: int, blocksize: int) -> int:
    return -(n // -blocksize)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_quant_state(raw: Tensor, quant_type: str, name: str) -> QuantState:
    """The JSON that bitsandbytes packs into `raw` (uint8 bytes), checked key by key; ValueError otherwise."""
    if raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() > MAX_QUANT_STATE_BYTES:
        raise ValueError(f"{name} is {dtype_name(raw.dtype)} {list(raw.shape)}, expected the uint8 "
                         f"bytes of a JSON object (at most {MAX_QUANT_STATE_BYTES})")
    try:
        state = parse_json(raw.numpy().tobytes(), name, dict)
        return checked_state(state, quant_type, name)
    except QuantkitError as e:  # inside a layout a ValueError: the view names the module
        raise ValueError(str(e)) from None


def checked_state(state: dict, quant_type: str, name: str) -> QuantState:
    unknown = sorted(set(state) - set(STATE_KEYS) - set(NESTED_KEYS))
    if unknown:
        raise QuantkitError(f"{name} holds the key {unknown[0]!r}, which bitsandbytes does not write")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise QuantkitError(f"{name} has no {missing[0]!r}")
    if field(state, "quant_type", str, name) != quant_type:
        raise QuantkitError(f"{name} says quant_type {json_text(state['quant_type'])}, its name says {quant_type}")
    blocksize = field(state, "blocksize", int, name)
    if blocksize not in BLOCKSIZES:
        raise QuantkitError(f"{name}: blocksize {blocksize} is not one of {', '.join(map(str, BLOCKSIZES))}")
    dtype = field(state, "dtype", str, name)
    if dtype not in FLOAT_DTYPES:
        raise QuantkitError(f"{name}: dtype {dtype[:30]!r} is not one of {', '.join(FLOAT_DTYPES)}")
    shape = field(state, "shape", list, name)
    if len(shape) != 2 or any(not isinstance(d, int) or isinstance(d, bool) or d <= 0 for d in shape):
        raise QuantkitError(f"{name}: shape {json_text(shape)} is not a Linear's [out, in]")
    present = [k for k in NESTED_KEYS if k in state]
    if not present:
        return QuantState(blocksize, FLOAT_DTYPES[dtype], (shape[0], shape[1]))
    if len(present) != len(NESTED_KEYS):
        lacking = next(k for k in NESTED_KEYS if k not in state)
        raise QuantkitError(f"{name} has {present[0]} but not {lacking}")
    nested_blocksize = field(state, "nested_blocksize", int, name)
    if nested_blocksize not in BLOCKSIZES:
        raise QuantkitError(f"{name}: nested_blocksize {nested_blocksize} is not one of "
                            f"{', '.join(map(str, BLOCKSIZES))}")
    if field(state, "nested_dtype", str, name) != "float32":
        raise QuantkitError(f"{name}: nested_dtype {json_text(state['nested_dtype'])} is not float32, which "
                            "bitsandbytes' nested absmax always are")
    offset = float(field(state, "nested_offset", (int, float), name))
    if not torch.isfinite(torch.tensor(offset)):
        raise QuantkitError(f"{name}: nested_offset {offset} is not a finite number")
    return QuantState(blocksize, FLOAT_DTYPES[dtype], (shape[0], shape[1]), nested_blocksize, offset)


def json_text(value: object) -> str:
    return repr(value)[:40]


def check_4bit_shapes(s: Shapes, state: QuantState, storage: torch.dtype) -> tuple[int, int]:
    """(out, in) from the quant state, once every part's shape agrees with it; ValueError otherwise."""
    n = state.numel
    packed_bytes = blocks(n, 2)
    itemsize = torch.empty((), dtype=storage).element_size()
    if packed_bytes % itemsize or s[WEIGHT] != (packed_bytes // itemsize, 1):
        raise ValueError(f"{WEIGHT} is {list(s[WEIGHT])}, its quant_state's shape {list(state.shape)} packs into "
                         f"{packed_bytes} bytes ([bytes / {itemsize}, 1] of {dtype_name(storage)})")
    n_blocks = blocks(n, state.blocksize)
    if s[ABSMAX] != (n_blocks,):
        raise ValueError(f"{ABSMAX} is {list(s[ABSMAX])}, expected [{n_blocks}] (one per {state.blocksize} of "
                         f"the {list(state.shape)} weight)")
    if s[QUANT_MAP] != (CODES_4BIT,):
        raise ValueError(f"{QUANT_MAP} is {list(s[QUANT_MAP])}, expected [{CODES_4BIT}]")
    nested_parts = [p for p in (NESTED_ABSMAX, NESTED_QUANT_MAP) if p in s]
    if state.nested_blocksize is None:
        if nested_parts:
            raise ValueError(f"{nested_parts[0]} is present, but the quant_state describes no nested absmax")
        return state.shape
    if len(nested_parts) != 2:
        raise ValueError(f"the quant_state describes nested absmax, but "
                         f"{NESTED_QUANT_MAP if NESTED_ABSMAX in s else NESTED_ABSMAX} is missing")
    n_nested = blocks(n_blocks, state.nested_blocksize)
    if s[NESTED_ABSMAX] != (n_nested,):
        raise ValueError(f"{NESTED_ABSMAX} is {list(s[NESTED_ABSMAX])}, expected [{n_nested}] (one per "
                         f"{state.nested_blocksize} of {n_blocks} absmax)")
    if s[NESTED_QUANT_MAP] != (CODES_NESTED,):
        raise ValueError(f"{NESTED_QUANT_MAP} is {list(s[NESTED_QUANT_MAP])}, expected [{CODES_NESTED}]")
    return state.shape


def check_dtype(t: Mapping[str, Tensor], part: str, dtype: torch.dtype) -> Tensor:
    if t[part].dtype != dtype:
        raise ValueError(f"{part} is {dtype_name(t[part].dtype)}, expected {dtype_name(dtype)}")
    return t[part]


def scaled_blocks(values: Tensor, scales: Tensor, blocksize: int) -> Tensor:
    """values [n] times scales[i // blocksize], as bitsandbytes' blockwise kernels compute it (float32)."""
    n = values.numel()
    full = n - n % blocksize
    head = (values[:full].view(-1, blocksize) * scales[: full // blocksize].view(-1, 1)).reshape(full)
    if full == n:
        return head
    return torch.cat([head, values[full:] * scales[full // blocksize]])


def absmax_of(t: Mapping[str, Tensor], state: QuantState) -> Tensor:
    """Each block's float32 scale; nested ones dequantized as functional.dequantize_blockwise does, plus the
    offset."""
    if state.nested_blocksize is None:
        return check_dtype(t, ABSMAX, torch.float32)
    codes = check_dtype(t, ABSMAX, torch.uint8)
    table = check_dtype(t, NESTED_QUANT_MAP, torch.float32)
    scales = check_dtype(t, NESTED_ABSMAX, torch.float32)
    absmax = scaled_blocks(table[codes.long()], scales, state.nested_blocksize)
    return absmax + torch.tensor(state.nested_offset, dtype=torch.float32)


def dequantize_4bit(t: Mapping[str, Tensor], quant_type: str, storage: torch.dtype) -> Tensor:
    """float32 [out, in] of one 4-bit Linear's parts (`t`: suffix -> tensor)."""
    marker = QUANT_STATE + quant_type
    state = parse_quant_state(t[marker], quant_type, marker)
    n_out, n_in = check_4bit_shapes({s: tuple(v.shape) for s, v in t.items()}, state, storage)
    table = code_table(quant_type)
    if not torch.equal(check_dtype(t, QUANT_MAP, torch.float32), table):
        raise ValueError(f"{QUANT_MAP} differs from bitsandbytes' {quant_type} table, which is what bitsandbytes "
                         "dequantizes with")
    packed = check_dtype(t, WEIGHT, storage).contiguous().view(-1).view(torch.uint8)
    pairs = torch.stack([table[torch.arange(256) >> 4], table[torch.arange(256) & 15]], dim=1)  # byte -> 2 values
    values = pairs[packed.long()].view(-1)[: n_out * n_in]
    weight = scaled_blocks(values, absmax_of(t, state), state.blocksize)
    return weight.to(state.dtype).float().view(n_out, n_in)


def dequantize_8bit(t: Mapping[str, Tensor]) -> Tensor:
    weight_shape_8bit({s: tuple(v.shape) for s, v in t.items()})
    weight, scb = check_dtype(t, WEIGHT, torch.int8), check_dtype(t, SCB, torch.float32)
    if WEIGHT_FORMAT in t:
        layout_code = check_dtype(t, WEIGHT_FORMAT, torch.uint8)
        if int(layout_code.reshape(-1)[0]) != ROW_MAJOR:
            raise ValueError(f"{WEIGHT_FORMAT} is {int(layout_code.reshape(-1)[0])}; bitsandbytes reads only "
                             f"{ROW_MAJOR} (row-major)")
    return weight * scb.view(-1, 1) * INT8_RECIPROCAL


def weight_shape_8bit(s: Shapes) -> tuple[int, int]:
    if len(s[WEIGHT]) != 2:
        raise ValueError(f"{WEIGHT} is {list(s[WEIGHT])}, expected an int8 [out, in]")
    n_out, n_in = s[WEIGHT]
    if s[SCB] != (n_out,):
        raise ValueError(f"{SCB} is {list(s[SCB])}, expected [{n_out}] (one absmax per row of the {list(s[WEIGHT])} "
                         "weight)")
    if WEIGHT_FORMAT in s and s[WEIGHT_FORMAT] not in ((), (1,)):
        raise ValueError(f"{WEIGHT_FORMAT} is {list(s[WEIGHT_FORMAT])}, expected one value")
    return n_out, n_in


def flag(qcfg: dict, key: str, where: str) -> bool:
    """A boolean setting of quantization_config; absent means False."""
    return key in qcfg and bool(field(qcfg, key, bool, where))


def layout(qcfg: dict) -> PackedLinears:
    """The bitsandbytes layout for a checkpoint's quantization_config: 4-bit (nf4 / fp4) or 8-bit, exactly one."""
    where = "config.json quantization_config"
    four, eight = flag(qcfg, "load_in_4bit", where), flag(qcfg, "load_in_8bit", where)
    if four == eight:
        raise QuantkitError(f"{where}: load_in_4bit and load_in_8bit are both {four}; a bitsandbytes checkpoint "
                            "has exactly one of them true")
    if eight:
        return PackedLinears(FORMAT, SCB, (WEIGHT, SCB), dequantize_8bit, weight_shape_8bit, optional=(WEIGHT_FORMAT,),
                             settings={"bits": 8})
    quant_type = field(qcfg, "bnb_4bit_quant_type", str, where)
    if quant_type not in QUANT_TYPES:
        raise QuantkitError(f"{where}: bnb_4bit_quant_type {quant_type[:30]!r} is not one of {', '.join(QUANT_TYPES)}")
    storage_name = field(qcfg, "bnb_4bit_quant_storage", str, where) if "bnb_4bit_quant_storage" in qcfg else "uint8"
    if storage_name not in STORAGE_DTYPES:
        raise QuantkitError(f"{where}: bnb_4bit_quant_storage {storage_name[:30]!r} is not one of "
                            f"{', '.join(STORAGE_DTYPES)}")
    storage = STORAGE_DTYPES[storage_name]
    marker = QUANT_STATE + quant_type

    def dequantize(t: dict[str, Tensor]) -> Tensor:
        return dequantize_4bit(t, quant_type, storage)

    def weight_shape(s: Shapes, contents: Mapping[str, Tensor] | None = None) -> tuple[int, int]:
        """(out, in): bitsandbytes keeps a 4-bit weight's shape only inside its quant_state JSON, so besides the
        headers this needs that tensor's contents (`contents[marker]`)."""
        if contents is None or marker not in contents:
            raise ValueError(f"its [out, in] shape is stored inside {marker}, whose contents this header-only "
                             "read does not have")
        return check_4bit_shapes(s, parse_quant_state(contents[marker], quant_type, marker), storage)

    return PackedLinears(FORMAT, marker, (WEIGHT, ABSMAX, QUANT_MAP, marker), dequantize, weight_shape,
                         optional=(NESTED_ABSMAX, NESTED_QUANT_MAP), shape_contents=(marker,),
                         settings={"bits": 4, "quant_type": quant_type, "quant_storage": storage_name,
                                   "double_quant": flag(qcfg, "bnb_4bit_use_double_quant", where)})
