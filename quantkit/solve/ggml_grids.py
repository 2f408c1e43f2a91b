"""llama.cpp's GGUF block grids: the per-block scales/mins llama.cpp would choose, codes on them, their values.

A grid is the stored per-block fields of one weight matrix in one ggml type (`BlockGrid.fields`). Every code
0..maxq of a group of `group` elements stands for float32(scale*code + bias) (`BlockGrid.affine`), the value
ggml's dequantize gives, bit for bit. Why each product is exact in float32 (24-bit significand; d, dmin and
m are float16, 11 significant bits; only the final sum rounds):
- Q4_0 / Q5_0 / Q8_0: scale = d, bias = -8d / -16d / -128d (code = q + 128 for Q8_0's int8 q): powers of
  two times d are exact, d*code has at most 11+8 bits, and scale*code + bias = d*(code - zero) is itself
  representable, so the sum does not even round.
- Q4_1 / Q5_1: scale = d, bias = m: d*code has at most 11+5 bits; the sum rounds once, as ggml's d*q + m.
- Q4_K / Q5_K: scale = fl(d*sc), bias = -fl(dmin*m) with 6-bit sc, m: 11+6 bits each, exact; scale*code
  has at most 17+5 bits; the sum rounds once, as ggml's (d*sc)*q - dmin*m.
- Q6_K: scale = fl(d*sc) with int8 sc (11+7 bits), bias = -32*scale: scale*code (+6 bits) and
  scale*(code - 32) are exact, as ggml's (d*sc)*(code - 32).
`choose_grid` follows ggml-quants.c's choice: quantize_row_<type>_ref without an importance vector, the
imatrix path (quantize_row_<type>_impl) with one (Q8_0 has none and ignores it); the searches are in
ggml_search.py. Where llama.cpp's float16 conversion would overflow, d (and m) are clamped to +-65504.
`nearest_codes` rounds as each type's _ref path does, so a _ref grid of Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 packs to
the bytes llama.cpp (and gguf-py's quantize) write.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from quantkit.solve.ggml_search import (
    IMPL_SEARCH,
    Q6_K_ZERO,
    SUB_SCALE_MAX,
    affine_fields,
    affine_search,
    half,
    make_qkx_quants,
    make_qx_quants,
    nearest_int,
    q6_k_fields,
    q6_k_search,
    signed_absmax,
    sqrt,
)

CHUNK_ELEMENTS = 1 << 18  # weights handled per step: search temporaries of 1 MiB stay in the CPU caches
CUDA_CHUNK_ELEMENTS = 1 << 24  # on a GPU: chunks large enough that kernel launches do not set the time


@dataclass(frozen=True)
class GGMLType:
    """One ggml block type: its GGUF id, block size and bytes, elements per scale, largest code."""

    name: str
    type_id: int        # gguf.GGMLQuantizationType value
    block: int          # elements per block (32, or 256 for the K-quants)
    block_bytes: int
    group: int          # elements sharing one scale and bias
    maxq: int           # largest code


GGML_TYPES: dict[str, GGMLType] = {t.name: t for t in (
    GGMLType("Q4_0", 2, 32, 18, 32, 15),
    GGMLType("Q4_1", 3, 32, 20, 32, 15),
    GGMLType("Q5_0", 6, 32, 22, 32, 31),
    GGMLType("Q5_1", 7, 32, 24, 32, 31),
    GGMLType("Q8_0", 8, 32, 34, 32, 255),
    GGMLType("Q4_K", 12, 256, 144, 32, 15),
    GGMLType("Q5_K", 13, 256, 176, 32, 31),
    GGMLType("Q6_K", 14, 256, 210, 16, 63),
)}

# the code whose value is 0 in the symmetric types (ggml subtracts it before scaling)
ZERO_CODE = {"Q4_0": 8, "Q5_0": 16, "Q8_0": 128, "Q6_K": Q6_K_ZERO}

# each type's stored fields, in block order: name -> (dtype, one per group (True) or per block (False))
FIELDS: dict[str, dict[str, tuple[torch.dtype, bool]]] = {
    "Q4_0": {"d": (torch.float16, False)},
    "Q5_0": {"d": (torch.float16, False)},
    "Q8_0": {"d": (torch.float16, False)},
    "Q4_1": {"d": (torch.float16, False), "m": (torch.float16, False)},
    "Q5_1": {"d": (torch.float16, False), "m": (torch.float16, False)},
    "Q4_K": {"d": (torch.float16, False), "dmin": (torch.float16, False), "sc": (torch.uint8, True),
             "m": (torch.uint8, True)},
    "Q5_K": {"d": (torch.float16, False), "dmin": (torch.float16, False), "sc": (torch.uint8, True),
             "m": (torch.uint8, True)},
    "Q6_K": {"d": (torch.float16, False), "sc": (torch.int8, True)},
}


def field_shape(t: GGMLType, per_group: bool, shape: tuple[int, int]) -> tuple[int, int]:
    """The shape of a field of an [N, K] grid: one entry per group or per block of each row."""
    n, k = shape
    return n, k // (t.group if per_group else t.block)


def ggml_type(type_name: str) -> GGMLType:
    """The GGMLType called type_name; ValueError naming the known ones otherwise."""
    if type_name not in GGML_TYPES:
        raise ValueError(f"unknown ggml type {type_name!r}; known: {', '.join(GGML_TYPES)}")
    return GGML_TYPES[type_name]


def check_row_length(t: GGMLType, n_in: int) -> None:
    """ValueError unless a row of n_in elements is a whole number of t's blocks."""
    if n_in <= 0 or n_in % t.block:
        raise ValueError(f"{t.name} needs a row length (in_features) that is a positive multiple of its block of "
                         f"{t.block} elements; got {n_in}")


@dataclass
class BlockGrid:
    """The stored per-block fields of an [N, K] matrix in one ggml type.

    fields: Q4_0/Q5_0/Q8_0: d float16 [N, K/32]; Q4_1/Q5_1: d, m float16 [N, K/32]; Q4_K/Q5_K: d, dmin
    float16 [N, K/256], sc, m uint8 [N, K/32] (6-bit); Q6_K: d float16 [N, K/256], sc int8 [N, K/16].
    rounding: what llama.cpp's _ref path rounds the legacy types with before d (and m) become float16:
    id = 1/d and, for Q4_1/Q5_1, min, float32 [N, K/32]. `choose_grid` fills it so that `nearest_codes`
    writes llama.cpp's bytes; without it (a grid read from a file, an imatrix grid) codes are rounded with
    the stored fields.
    """

    type: GGMLType
    fields: dict[str, Tensor]
    shape: tuple[int, int]
    rounding: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n, k = self.shape
        check_row_length(self.type, k)
        expected = FIELDS[self.type.name]
        if set(self.fields) != set(expected):
            raise ValueError(f"a {self.type.name} grid has the fields {sorted(expected)}; got {sorted(self.fields)}")
        for name, (dtype, per_group) in expected.items():
            value, shape = self.fields[name], field_shape(self.type, per_group, self.shape)
            if value.dtype != dtype or tuple(value.shape) != shape:
                raise ValueError(f"{self.type.name} field {name!r} must be {dtype} of shape {shape}; "
                                 f"got {value.dtype} of shape {tuple(value.shape)}")
        if self.type.name in ("Q4_K", "Q5_K"):
            for name in ("sc", "m"):
                if self.fields[name].numel() and int(self.fields[name].max()) > SUB_SCALE_MAX:
                    raise ValueError(f"{self.type.name} field {name!r} holds 6-bit values (0..{SUB_SCALE_MAX}); "
                                     f"got {int(self.fields[name].max())}")

    def affine(self) -> tuple[Tensor, Tensor]:
        """(scale, bias) float32 [N, K/group]: code c of a group means exactly float32(scale*c + bias)."""
        name, f = self.type.name, self.fields
        per_block = self.type.block // self.type.group
        if name in ("Q4_K", "Q5_K"):
            scale = f["d"].float().repeat_interleave(per_block, dim=1) * f["sc"].float()
            return scale, -(f["dmin"].float().repeat_interleave(per_block, dim=1) * f["m"].float())
        if name == "Q6_K":
            scale = f["d"].float().repeat_interleave(per_block, dim=1) * f["sc"].float()
        else:
            scale = f["d"].float()
        if name in ("Q4_1", "Q5_1"):
            return scale, f["m"].float()
        return scale, -ZERO_CODE[name] * scale


def _check_weights(w: Tensor, what: str) -> Tensor:
    if not isinstance(w, Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"{what} must be a 2-D floating-point tensor [out_features, in_features]")
    w = w.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{what} holds NaN or infinite values")
    return w


def _chunk_elements(device: torch.device) -> int:
    return CUDA_CHUNK_ELEMENTS if device.type == "cuda" else CHUNK_ELEMENTS


def _row_chunks(n: int, k: int, device: torch.device) -> list[slice]:
    rows = max(1, _chunk_elements(device) // k)
    return [slice(r, min(n, r + rows)) for r in range(0, n, rows)]


def _columns(x: Tensor, n: int) -> Tensor:
    """[R, K] -> [n, R*K/n]: element i of every block of n in row i (the searches' layout)."""
    return x.reshape(-1, n).t().contiguous()


def _row_sigma2(w: Tensor) -> Tensor:
    """Per row: sum(x^2)/K accumulated in column order (the legacy imatrix paths' sigma2), [N]."""
    acc = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device)
    columns = max(1, _chunk_elements(w.device) // w.shape[0])  # transposed a slice at a time, so each add is one row
    for c in range(0, w.shape[1], columns):
        part = w[:, c:c + columns].t().contiguous()
        for row in part * part:
            acc.add_(row)
    return acc / w.shape[1]


def _inverse(d: Tensor) -> Tensor:
    return torch.where(d != 0, 1 / d, torch.zeros_like(d))


def _stored_rounding(name: str, fields: dict[str, Tensor]) -> dict[str, Tensor]:
    """The legacy types' rounding parameters as the stored fields give them."""
    rounding = {"id": _inverse(fields["d"].float())}
    if name in ("Q4_1", "Q5_1"):
        rounding["min"] = fields["m"].float()
    return rounding


def _legacy_ref(name: str, x: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """quantize_row_<name>_ref's d (and m) for blocks x [B, 32], and the float32 values it rounds codes with.

    C rounds the codes with 1/d (and min) before d (and min) become float16; where float16 would overflow,
    the stored (clamped) fields are used instead, so the codes stay nearest on the stored grid.
    """
    limit = torch.finfo(torch.float16).max
    if name in ("Q4_1", "Q5_1"):
        lo = x.amin(dim=1)
        d = (x.amax(dim=1) - lo) / GGML_TYPES[name].maxq
        fields = {"d": half(d), "m": half(lo)}
        rounding = {"id": _inverse(d), "min": lo}
        clamped = (d.abs() > limit) | (lo.abs() > limit)
    else:
        d = x.abs().amax(dim=1) / (ZERO_CODE[name] - 1) if name == "Q8_0" else signed_absmax(x.t()) / -ZERO_CODE[name]
        fields = {"d": half(d)}
        rounding = {"id": _inverse(d)}
        clamped = d.abs() > limit
    stored = _stored_rounding(name, fields)
    return fields, {key: torch.where(clamped, stored[key], value) for key, value in rounding.items()}


def _legacy_impl(name: str, x: Tensor, qw: Tensor, sigma2: Tensor) -> dict[str, Tensor]:
    """quantize_row_<name>_impl's d (and m) for blocks x [B, 32], imatrix qw [B, 32], row sigma2 per block [B]."""
    xs = x.t().contiguous()
    w = qw.t() * sqrt(sigma2 + xs * xs)
    if name in ("Q4_0", "Q5_0"):
        return {"d": half(make_qx_quants(xs, ZERO_CODE[name], w))}
    d, the_min = make_qkx_quants(xs, w, GGML_TYPES[name].maxq, *IMPL_SEARCH)
    return {"d": half(d), "m": half(-the_min)}


def _legacy_chunk(t: GGMLType, x: Tensor, qw: Tensor | None,
                  sigma2: Tensor | None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The legacy types' fields and rounding for the rows x [R, K], each as [R, K/32]."""
    r, k = x.shape
    blocks = x.reshape(-1, 32)
    if qw is None or sigma2 is None:
        fields, rounding = _legacy_ref(t.name, blocks)
    else:
        per_block = qw.reshape(1, -1, 32).expand(r, -1, -1).reshape(-1, 32)
        fields, rounding = _legacy_impl(t.name, blocks, per_block, sigma2.repeat_interleave(k // 32)), {}
    return {key: v.reshape(r, -1) for key, v in fields.items()}, {key: v.reshape(r, -1) for key, v in rounding.items()}


def _kquant_fields(t: GGMLType, w: Tensor, qw: Tensor | None) -> dict[str, Tensor]:
    """The K-quants' fields for w [N, K]: the sub-block search a chunk of rows at a time, then the super-blocks."""
    n, k = w.shape
    per_block = t.block // t.group
    found: list[dict[str, Tensor]] = []
    for rows in _row_chunks(n, k, w.device):
        r = rows.stop - rows.start
        qws = None if qw is None else _columns(qw, t.group).repeat(1, r)
        xs = _columns(w[rows], t.group)
        found.append(q6_k_search(xs, qws) if t.name == "Q6_K" else affine_search(xs, qws, t.maxq, per_block))
    merged = {key: torch.cat([f[key] for f in found]) for key in found[0]}
    fields = q6_k_fields(merged, per_block) if t.name == "Q6_K" else affine_fields(merged, per_block)
    return {key: v.reshape(n, -1) for key, v in fields.items()}


def _check_importance(importance: Tensor, k: int) -> Tensor:
    if not isinstance(importance, Tensor) or tuple(importance.shape) != (k,) or not importance.is_floating_point():
        raise ValueError(f"importance must be a floating-point tensor [in_features] = [{k}], one value per input "
                         f"column; got {getattr(importance, 'shape', type(importance).__name__)}")
    qw = importance.detach().float()
    if not bool(torch.isfinite(qw).all()) or bool((qw < 0).any()):
        raise ValueError("importance must hold finite, non-negative values (e.g. the Hessian's diagonal)")
    return qw


def choose_grid(w: Tensor, type_name: str, importance: Tensor | None = None) -> BlockGrid:
    """llama.cpp's block parameters for w [N, K] in type_name: its _ref choice, or with importance [K] (one
    non-negative weight per input column, e.g. the Hessian's diagonal) its imatrix choice.

    Rows are handled CHUNK_ELEMENTS weights at a time; each search runs over all blocks of a chunk at once.
    """
    t = ggml_type(type_name)
    w = _check_weights(w, "w")
    n, k = w.shape
    check_row_length(t, k)
    qw = None if importance is None else _check_importance(importance, k).to(w.device)
    if t.name == "Q8_0":  # quantize_q8_0 ignores the imatrix
        qw = None
    sigma2 = _row_sigma2(w) if qw is not None and t.block == 32 else None
    if t.block == 256:
        return BlockGrid(t, _kquant_fields(t, w, qw), (n, k))
    chunks = [_legacy_chunk(t, w[rows], qw, None if sigma2 is None else sigma2[rows])
              for rows in _row_chunks(n, k, w.device)]
    fields = {key: torch.cat([c[0][key] for c in chunks]) for key in chunks[0][0]}
    rounding = {key: torch.cat([c[1][key] for c in chunks]) for key in chunks[0][1]}
    return BlockGrid(t, fields, (n, k), rounding)


def check_codes(codes: Tensor, grid: BlockGrid) -> None:
    """ValueError unless codes is a uint8 tensor of the grid's shape with values in 0..maxq."""
    if not isinstance(codes, Tensor) or codes.dtype != torch.uint8 or tuple(codes.shape) != grid.shape:
        got = f"{codes.dtype} of shape {tuple(codes.shape)}" if isinstance(codes, Tensor) else type(codes).__name__
        raise ValueError(f"{grid.type.name} codes must be a uint8 tensor of shape {grid.shape}; got {got}")
    if codes.numel() and int(codes.max()) > grid.type.maxq:
        raise ValueError(f"{grid.type.name} codes must lie in 0..{grid.type.maxq}; got {int(codes.max())}")


def _round_half_away(v: Tensor) -> Tensor:
    """C's roundf (halves away from zero), computed as gguf-py's np_roundf does, exactly in float32."""
    a = v.abs()
    floored = torch.floor(a)
    return torch.sign(v) * (floored + torch.floor(2 * (a - floored)))


def _rounding_params(grid: BlockGrid) -> dict[str, Tensor]:
    """What nearest_codes rounds with, [N, K/group] each: the K-quants' scale and bias, the legacy types' 1/d
    (and min), unrounded from `grid.rounding` where present."""
    if grid.type.block == 256:
        scale, bias = grid.affine()
        return {"scale": scale, "bias": bias}
    return grid.rounding or _stored_rounding(grid.type.name, grid.fields)


def _codes_chunk(t: GGMLType, x: Tensor, p: dict[str, Tensor]) -> Tensor:
    """nearest_codes for the rows x [R, K], given those rows' rounding parameters p."""
    r, k = x.shape
    xb = x.reshape(r, k // t.group, t.group)
    p = {key: value.unsqueeze(-1) for key, value in p.items()}
    if t.block == 256:
        scale = p["scale"]
        if t.name == "Q6_K":
            zero = ZERO_CODE["Q6_K"]
            levels = nearest_int(xb / scale).clamp_(-zero, zero - 1).add_(zero)
        else:
            levels = nearest_int((xb - p["bias"]) / scale).clamp_(0, t.maxq)
        return torch.where(scale != 0, levels, torch.zeros_like(levels)).to(torch.uint8).reshape(r, k)
    if t.name == "Q8_0":
        zero = ZERO_CODE["Q8_0"]
        levels = _round_half_away(xb * p["id"]).clamp_(-zero, zero - 1).add_(zero)
    elif t.name in ("Q4_1", "Q5_1"):
        levels = torch.trunc((xb - p["min"]) * p["id"] + 0.5)
    else:
        levels = torch.trunc(xb * p["id"] + (ZERO_CODE[t.name] + 0.5))
    return levels.nan_to_num_(nan=0.0).clamp_(0, t.maxq).to(torch.uint8).reshape(r, k)


def nearest_codes(w: Tensor, grid: BlockGrid) -> Tensor:
    """Codes [N, K] uint8 of w on the grid, by each type's own rounding in llama.cpp's _ref path.

    Q4_0/Q5_0: min(maxq, trunc(x/d + zero + 0.5)); Q4_1/Q5_1: trunc((x - min)/d + 0.5); Q8_0: roundf(x/d)
    + 128 (with `grid.rounding`'s unrounded 1/d and min where present); Q4_K/Q5_K: nearest_int((x + dmin*m)
    / (d*sc)), Q6_K: nearest_int(x / (d*sc)) + 32, clamped to the codes. A group whose scale is 0 gets code 0
    (every code has its value there). For a _ref grid of the legacy types these are llama.cpp's own bytes.
    """
    x = _check_weights(w, "w")
    if tuple(x.shape) != grid.shape:
        raise ValueError(f"w has shape {tuple(x.shape)} but the {grid.type.name} grid is for {grid.shape}")
    params = _rounding_params(grid)
    out = torch.empty(grid.shape, dtype=torch.uint8, device=x.device)
    for rows in _row_chunks(*grid.shape, x.device):
        out[rows] = _codes_chunk(grid.type, x[rows], {key: value[rows] for key, value in params.items()})
    return out


def dequantize(codes: Tensor, grid: BlockGrid) -> Tensor:
    """The float32 values [N, K] of codes on the grid, bit for bit as ggml (and gguf.quants) dequantize."""
    check_codes(codes, grid)
    n, k = grid.shape
    group = grid.type.group
    scale, bias = (p.unsqueeze(-1) for p in grid.affine())
    out = torch.empty(grid.shape, dtype=torch.float32, device=codes.device)
    zero = ZERO_CODE.get(grid.type.name)
    for rows in _row_chunks(n, k, codes.device):
        c = codes[rows].reshape(-1, k // group, group).float()
        value = scale[rows] * (c - zero) if zero is not None else scale[rows] * c + bias[rows]
        out[rows] = value.reshape(-1, k)
    return out
