"""GPTQ int32 bit-packing: the bit layout here *is* the on-disk format.

Values are unsigned integers in [0, 2**bits). Along the packed dimension they form a little-endian bit
stream: value j occupies stream bits [bits*j, bits*j + bits), and int32 word w holds stream bits
[32*w, 32*w + 32). For 2/4/8 bits that is "value j of each run of 32/bits sits at bits [bits*j, ...) of one
word"; for 3 bits, 32 values span 3 words and values 10 and 21 straddle word boundaries (AutoGPTQ's layout).

`qweight` packs along the input dimension (rows of the transposed [K, N] code matrix), `qzeros` along the
output dimension; both use `pack_last_dim` / `unpack_last_dim` on a suitably transposed view.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from quantkit.config import SUPPORTED_BITS

_BLOCK = 32  # values per block; a block packs into exactly `bits` int32 words


def packed_length(n_values: int, bits: int) -> int:
    """Number of int32 words that hold `n_values` values of `bits` bits; raises if the format cannot."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if (n_values * bits) % 32:
        need = 32 if bits == 3 else 32 // bits
        raise ValueError(f"{bits}-bit packing needs a length divisible by {need}, got {n_values}")
    return n_values * bits // 32


def _block_layout(bits: int) -> list[tuple[int, int, int]]:
    """(value index, word index, bit shift) for each value of a 32-value block."""
    return [(j, (bits * j) // 32, (bits * j) % 32) for j in range(_BLOCK)]


# values packed at a time: the int64 working copies stay a small fraction of the codes' size, not a whole matrix's
PACK_VALUES = 2**21


def pack_last_dim(values: Tensor, bits: int) -> Tensor:
    """Pack integer `values` [..., C] into int32 [..., C*bits/32] along the last dimension."""
    n = values.shape[-1]
    n_words = packed_length(n, bits)
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 2**bits):
        raise ValueError(f"values outside [0, {2**bits}) cannot be packed in {bits} bits")
    rows = values.reshape(math.prod(values.shape[:-1]), n)  # not -1: a zero-width C leaves it ambiguous
    out = torch.empty(rows.shape[0], n_words, dtype=torch.int32, device=values.device)
    step = max(1, PACK_VALUES // max(n, 1))
    for start in range(0, rows.shape[0], step):
        out[start:start + step] = _pack_rows(rows[start:start + step], bits, n_words)
    return out.reshape(*values.shape[:-1], n_words)


def _pack_rows(values: Tensor, bits: int, n_words: int) -> Tensor:
    """pack_last_dim for a 2-D block of rows (values checked already)."""
    pad = (-values.shape[-1]) % _BLOCK
    v = torch.nn.functional.pad(values.to(torch.int64), (0, pad))
    v = v.reshape(values.shape[0], -1, _BLOCK)  # [rows, blocks, 32]
    words = torch.zeros(*v.shape[:-1], bits, dtype=torch.int64, device=values.device)  # [rows, blocks, bits]
    for j, w, shift in _block_layout(bits):
        words[..., w] |= (v[..., j] << shift) & 0xFFFFFFFF
        if shift + bits > 32:  # the value straddles into the next word
            words[..., w + 1] |= v[..., j] >> (32 - shift)
    words = words.reshape(values.shape[0], -1)[:, :n_words]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's-complement int32


def unpack_last_dim(packed: Tensor, bits: int, n_values: int) -> Tensor:
    """Inverse of `pack_last_dim`: int32 [..., C*bits/32] -> int32 values [..., C]."""
    n_words = packed_length(n_values, bits)
    if packed.shape[-1] != n_words:
        raise ValueError(f"expected {n_words} packed words for {n_values} {bits}-bit values, got {packed.shape[-1]}")
    words = packed.to(torch.int64) & 0xFFFFFFFF
    pad_words = (-n_words) % bits
    words = torch.nn.functional.pad(words, (0, pad_words)).reshape(*packed.shape[:-1], -1, bits)
    mask = (1 << bits) - 1
    out = torch.empty(*words.shape[:-1], _BLOCK, dtype=torch.int64, device=packed.device)
    for j, w, shift in _block_layout(bits):
        val = words[..., w] >> shift
        if shift + bits > 32:
            val = val | (words[..., w + 1] << (32 - shift))
        out[..., j] = val & mask
    return out.reshape(*packed.shape[:-1], -1)[..., :n_values].to(torch.int32)


def pack_qweight(codes: Tensor, bits: int) -> Tensor:
    """codes int [N, K] (out, in) -> qweight int32 [K*bits/32, N], packed along the input dim."""
    return pack_last_dim(codes, bits).t().contiguous()


def unpack_qweight(qweight: Tensor, bits: int, in_features: int) -> Tensor:
    """qweight int32 [K*bits/32, N] -> codes int32 [N, K]."""
    return unpack_last_dim(qweight.t(), bits, in_features).contiguous()


def pack_qzeros(zeros: Tensor, bits: int) -> Tensor:
    """zeros int [n_groups, N] -> qzeros int32 [n_groups, N*bits/32], packed along the output dim."""
    return pack_last_dim(zeros, bits)


def unpack_qzeros(qzeros: Tensor, bits: int, out_features: int) -> Tensor:
    return unpack_last_dim(qzeros, bits, out_features)
