"""llama.cpp's block bytes: codes and a BlockGrid packed into GGUF tensor data, and read back.

Layouts (ggml-common.h `block_*`, little-endian; a row is whole blocks, none crosses a row):
- Q4_0 d,qs[16] / Q4_1 d,m,qs[16]: qs[j] = code j | code j+16 << 4.
- Q5_0 d,qh[4],qs[16] / Q5_1 d,m,qh[4],qs[16]: qs as Q4 with the low 4 bits; qh, a u32, has bit 4 of code j
  in bit j.
- Q8_0 d,qs[32]: int8 q = code - 128.
- Q4_K d,dmin,scales[12],qs[128]: chunk c=0..3 is qs[32c..32c+31] = code 64c+l | code 64c+32+l << 4.
  Q5_K d,dmin,scales[12],qh[32],qs[128]: low 4 bits as Q4_K; bit 4 of code 64c+l is bit 2c of qh[l], of
  code 64c+32+l bit 2c+1. scales[12] holds the 6-bit sc, m of the 8 sub-blocks: for j<4, byte j = sc[j] |
  (sc[j+4] >> 4) << 6, byte j+4 = m[j] | (m[j+4] >> 4) << 6, byte j+8 = sc[j+4] & 15 | (m[j+4] & 15) << 4.
- Q6_K ql[128],qh[64],scales[16] int8,d (d last): two halves h of 128 codes v; for l<32,
  ql[64h+l] = v[l] & 15 | (v[l+64] & 15) << 4, ql[64h+32+l] = v[l+32] & 15 | (v[l+96] & 15) << 4,
  qh[32h+l] = v[l] >> 4 | (v[l+32] >> 4) << 2 | (v[l+64] >> 4) << 4 | (v[l+96] >> 4) << 6.
Every bit of a block belongs to exactly one field, so unpack then pack gives back the same bytes.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from quantkit.solve.ggml_grids import FIELDS, BlockGrid, GGMLType, check_codes, check_row_length, ggml_type

LOW = np.uint8(0x0F)
HALF = "<f2"  # ggml_half: little-endian float16


def _half_bytes(t: Tensor, shape: tuple[int, int]) -> np.ndarray:
    """A float16 field [N, nb] as bytes [N, nb, 2]."""
    return t.cpu().numpy().astype(HALF).view(np.uint8).reshape(*shape, 2)


def _half_field(b: np.ndarray) -> Tensor:
    """Bytes [N, nb, 2] as a float16 field [N, nb] (bits kept as they are)."""
    return torch.from_numpy(np.ascontiguousarray(b).view(HALF).astype(np.float16).reshape(b.shape[:2]))


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo & LOW) | ((hi & LOW) << 4)


def _pack_scales12(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 6-bit sc, m [N, nb, 8] -> scales [N, nb, 12]."""
    top_sc, top_m = (sc[..., 4:] >> 4) << 6, (m[..., 4:] >> 4) << 6
    return np.concatenate([sc[..., :4] | top_sc, m[..., :4] | top_m, _nibbles(sc[..., 4:], m[..., 4:])], axis=-1)


def _unpack_scales12(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scales [N, nb, 12] -> sc, m [N, nb, 8] (ggml-quants.c get_scale_min_k4)."""
    low_sc, low_m, mixed = q[..., :4], q[..., 4:8], q[..., 8:]
    sc = np.concatenate([low_sc & 63, (mixed & LOW) | ((low_sc >> 6) << 4)], axis=-1)
    m = np.concatenate([low_m & 63, (mixed >> 4) | ((low_m >> 6) << 4)], axis=-1)
    return sc, m


def _pack_quants(name: str, c: np.ndarray) -> list[np.ndarray]:
    """The code bytes of blocks c [N, nb, block], in the block's field order."""
    n, nb, _ = c.shape
    if name in ("Q4_0", "Q4_1"):
        return [_nibbles(c[..., :16], c[..., 16:])]
    if name in ("Q5_0", "Q5_1"):
        qh = np.packbits((c >> 4) & 1, axis=-1, bitorder="little")
        return [qh, _nibbles(c[..., :16], c[..., 16:])]
    if name == "Q8_0":
        return [c ^ np.uint8(0x80)]
    if name in ("Q4_K", "Q5_K"):
        pairs = c.reshape(n, nb, 4, 2, 32)
        qs = _nibbles(pairs[..., 0, :], pairs[..., 1, :]).reshape(n, nb, 128)
        if name == "Q4_K":
            return [qs]
        shifts = (2 * np.arange(4).reshape(4, 1, 1) + np.arange(2).reshape(1, 2, 1)).astype(np.uint8)
        qh = np.bitwise_or.reduce(((pairs >> 4) & 1) << shifts, axis=(2, 3)).astype(np.uint8)
        return [qh, qs]
    v = c.reshape(n, nb, 2, 4, 32)
    ql = np.concatenate([_nibbles(v[..., 0, :], v[..., 2, :]), _nibbles(v[..., 1, :], v[..., 3, :])], axis=-1)
    shifts = (2 * np.arange(4)).astype(np.uint8).reshape(4, 1)
    qh = np.bitwise_or.reduce((v >> 4) << shifts, axis=3).astype(np.uint8)
    return [ql.reshape(n, nb, 128), qh.reshape(n, nb, 64)]


def _unpack_quants(name: str, q: np.ndarray) -> np.ndarray:
    """Codes [N, nb, block] from the code bytes q [N, nb, bytes] (everything after the scale fields)."""
    n, nb, _ = q.shape
    if name in ("Q4_0", "Q4_1"):
        return np.concatenate([q & LOW, q >> 4], axis=-1)
    if name in ("Q5_0", "Q5_1"):
        high = np.unpackbits(q[..., :4], axis=-1, bitorder="little") << 4
        return np.concatenate([q[..., 4:] & LOW, q[..., 4:] >> 4], axis=-1) | high
    if name == "Q8_0":
        return q ^ np.uint8(0x80)
    if name in ("Q4_K", "Q5_K"):
        qs = q[..., -128:].reshape(n, nb, 4, 1, 32)
        pairs = np.concatenate([qs & LOW, qs >> 4], axis=3)
        if name == "Q5_K":
            shifts = (2 * np.arange(4).reshape(4, 1, 1) + np.arange(2).reshape(1, 2, 1)).astype(np.uint8)
            pairs |= ((q[..., :32].reshape(n, nb, 1, 1, 32) >> shifts) & 1) << 4
        return pairs.reshape(n, nb, 256)
    ql = q[..., :128].reshape(n, nb, 2, 2, 32)
    qh = q[..., 128:192].reshape(n, nb, 2, 1, 32) >> (2 * np.arange(4)).astype(np.uint8).reshape(4, 1)
    low = np.stack([ql[..., 0, :] & LOW, ql[..., 1, :] & LOW, ql[..., 0, :] >> 4, ql[..., 1, :] >> 4], axis=3)
    return (low | ((qh & 3) << 4)).reshape(n, nb, 256)


def pack(codes: Tensor, grid: BlockGrid) -> np.ndarray:
    """Codes [N, K] uint8 (0..maxq) on grid as GGUF tensor data: uint8 [N, K/block * block_bytes]."""
    if not isinstance(grid, BlockGrid):
        raise ValueError(f"pack needs a BlockGrid; got {type(grid).__name__}")
    check_codes(codes, grid)
    t = grid.type
    n, k = grid.shape
    shape = (n, k // t.block)
    c = codes.cpu().numpy().reshape(n, k // t.block, t.block)
    f = {key: value.cpu() for key, value in grid.fields.items()}
    if t.name in ("Q4_K", "Q5_K"):
        head = [_half_bytes(f["d"], shape), _half_bytes(f["dmin"], shape),
                _pack_scales12(f["sc"].numpy().reshape(*shape, 8), f["m"].numpy().reshape(*shape, 8))]
        parts = head + _pack_quants(t.name, c)
    elif t.name == "Q6_K":
        sc = f["sc"].numpy().view(np.uint8).reshape(*shape, 16)
        parts = _pack_quants(t.name, c) + [sc, _half_bytes(f["d"], shape)]
    else:
        parts = [_half_bytes(f[key], shape) for key in FIELDS[t.name]] + _pack_quants(t.name, c)
    out = np.concatenate(parts, axis=-1)
    return out.reshape(n, -1)


def _check_data(data: np.ndarray, t: GGMLType, n_in: int) -> np.ndarray:
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise ValueError(f"{t.name} data must be a 2-D uint8 array [rows, row_bytes]; got "
                         f"{getattr(data, 'dtype', type(data).__name__)} with shape {getattr(data, 'shape', None)}")
    check_row_length(t, n_in)
    row_bytes = n_in // t.block * t.block_bytes
    if data.shape[1] != row_bytes:
        raise ValueError(f"a {t.name} row of {n_in} elements has {row_bytes} bytes; the data has {data.shape[1]}")
    return data.reshape(data.shape[0], n_in // t.block, t.block_bytes)


def unpack(data: np.ndarray, type_name: str, n_in: int) -> tuple[Tensor, BlockGrid]:
    """GGUF tensor data uint8 [N, row_bytes] of type_name with rows of n_in elements -> (codes [N, n_in], grid)."""
    t = ggml_type(type_name)
    blocks = _check_data(data, t, n_in)
    n, nb = blocks.shape[:2]
    if t.name in ("Q4_K", "Q5_K"):
        sc, m = _unpack_scales12(blocks[..., 4:16])
        fields = {"d": _half_field(blocks[..., 0:2]), "dmin": _half_field(blocks[..., 2:4]),
                  "sc": torch.from_numpy(sc.reshape(n, -1).copy()), "m": torch.from_numpy(m.reshape(n, -1).copy())}
        codes = _unpack_quants(t.name, blocks[..., 16:])
    elif t.name == "Q6_K":
        fields = {"d": _half_field(blocks[..., 208:210]),
                  "sc": torch.from_numpy(blocks[..., 192:208].reshape(n, -1).view(np.int8).copy())}
        codes = _unpack_quants(t.name, blocks[..., :192])
    else:
        names = list(FIELDS[t.name])
        fields = {key: _half_field(blocks[..., 2 * i:2 * i + 2]) for i, key in enumerate(names)}
        codes = _unpack_quants(t.name, blocks[..., 2 * len(names):])
    grid = BlockGrid(t, fields, (n, n_in))
    return torch.from_numpy(np.ascontiguousarray(codes, dtype=np.uint8).reshape(n, n_in)), grid
