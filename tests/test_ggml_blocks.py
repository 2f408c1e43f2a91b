"""quantkit/write/ggml_blocks.py: llama.cpp's block bytes, checked against gguf-py's dequantize on random grids
and codes, round trips both ways, a few hand-checked bytes, and the refusal of bad inputs."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from quantkit.solve.ggml_grids import FIELDS, GGML_TYPES, BlockGrid, dequantize, field_shape
from quantkit.write.ggml_blocks import pack, unpack

NAMES = tuple(GGML_TYPES)
# float16 values a random grid draws some of its d/dmin/m from: 0, -0, the largest, subnormals, negatives
SPECIAL_HALVES = torch.tensor([0.0, -0.0, 65504.0, -65504.0, 2.0**-24, -(2.0**-24), 6.1e-5, 1.0, -3.5])


def random_grid(name, n, k, seed):
    """A grid with random fields (finite float16 spanning the whole range, 6-bit / int8 scales) and codes."""
    g = torch.Generator().manual_seed(seed)
    fields = {}
    for key, (dtype, per_group) in FIELDS[name].items():
        shape = field_shape(GGML_TYPES[name], per_group, (n, k))
        if dtype == torch.float16:
            value = torch.randn(shape, generator=g) * torch.exp(4 * torch.randn(shape, generator=g))
            special = SPECIAL_HALVES[torch.randint(len(SPECIAL_HALVES), shape, generator=g)]
            value = torch.where(torch.rand(shape, generator=g) < 0.1, special, value)
            fields[key] = value.clamp(-65504, 65504).half()
        elif dtype == torch.uint8:
            fields[key] = torch.randint(0, 64, shape, generator=g, dtype=torch.uint8)
        else:
            fields[key] = torch.randint(-128, 128, shape, generator=g).to(torch.int8)
    grid = BlockGrid(GGML_TYPES[name], fields, (n, k))
    codes = torch.randint(0, grid.type.maxq + 1, (n, k), generator=g).to(torch.uint8)
    return codes, grid


def affine_values(codes, grid):
    scale, bias = grid.affine()
    n, k = grid.shape
    return (scale.unsqueeze(-1) * codes.reshape(n, -1, grid.type.group).float() + bias.unsqueeze(-1)).reshape(n, k)


def same_fields(a, b):
    return a.keys() == b.keys() and all(
        torch.equal(a[key].view(torch.int16) if a[key].dtype == torch.float16 else a[key],
                    b[key].view(torch.int16) if b[key].dtype == torch.float16 else b[key]) for key in a)


@pytest.mark.parametrize("name", NAMES)
def test_random_grids_and_codes_read_back_by_gguf_bit_for_bit(name):
    for seed in range(3):
        codes, grid = random_grid(name, 6, 1024, seed)
        data = pack(codes, grid)
        t = grid.type
        assert data.dtype == np.uint8 and data.shape == (6, 1024 // t.block * t.block_bytes)
        theirs = gguf_dequantize(data, GGMLQuantizationType[name])
        ours = dequantize(codes, grid)
        assert np.array_equal(ours.numpy().view(np.int32), theirs.view(np.int32))
        assert torch.equal(affine_values(codes, grid), ours)


@pytest.mark.parametrize("name", NAMES)
def test_unpack_inverts_pack(name):
    codes, grid = random_grid(name, 5, 512, 11)
    got_codes, got_grid = unpack(pack(codes, grid), name, 512)
    assert got_codes.dtype == torch.uint8 and torch.equal(got_codes, codes)
    assert got_grid.type == grid.type and got_grid.shape == grid.shape
    assert same_fields(got_grid.fields, grid.fields)


@pytest.mark.parametrize("name", NAMES)
def test_pack_inverts_unpack_on_any_bytes(name):
    t = GGML_TYPES[name]
    data = np.random.default_rng(5).integers(0, 256, (4, 2 * t.block_bytes), dtype=np.uint8)
    codes, grid = unpack(data, name, 2 * t.block)
    assert int(codes.max()) <= t.maxq
    assert np.array_equal(pack(codes, grid), data)


def test_hand_checked_bytes():
    # Q4_0: d = 1.0 is 0x3C00 little-endian; byte j holds code j (low nibble) and code j+16 (high nibble)
    codes = torch.arange(32, dtype=torch.uint8).remainder(16).reshape(1, 32)
    q4 = pack(codes, BlockGrid(GGML_TYPES["Q4_0"], {"d": torch.ones(1, 1).half()}, (1, 32)))
    assert q4.tolist()[0] == [0x00, 0x3C] + [j | (j << 4) for j in range(16)]
    # Q5_0: only code 31 (element 31) has bit 4 set: the u32 qh is 1 << 31
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 31] = 31
    q5 = pack(codes, BlockGrid(GGML_TYPES["Q5_0"], {"d": torch.ones(1, 1).half()}, (1, 32)))
    assert q5[0, 2:6].tolist() == [0, 0, 0, 0x80] and q5[0, 21] == 0xF0
    # Q8_0: code 128 is q = 0, code 0 is q = -128
    codes = torch.tensor([[128, 0] + [255] * 30], dtype=torch.uint8)
    q8 = pack(codes, BlockGrid(GGML_TYPES["Q8_0"], {"d": torch.ones(1, 1).half()}, (1, 32)))
    assert q8[0, 2:5].tolist() == [0x00, 0x80, 0x7F]
    # Q4_K: sub-block 5's sc = 0b110101 and m = 0b101010 split over bytes 9 (low nibbles) and 1, 5 (top bits)
    sc = torch.zeros(1, 8, dtype=torch.uint8)
    m = torch.zeros(1, 8, dtype=torch.uint8)
    sc[0, 5], m[0, 5] = 0b110101, 0b101010
    grid = BlockGrid(GGML_TYPES["Q4_K"], {"d": torch.ones(1, 1).half(), "dmin": torch.zeros(1, 1).half(),
                                          "sc": sc, "m": m}, (1, 256))
    scales = pack(torch.zeros(1, 256, dtype=torch.uint8), grid)[0, 4:16].tolist()
    assert scales[1] == 0b11 << 6 and scales[5] == 0b10 << 6 and scales[9] == 0b1010_0101
    # Q6_K: d comes last, after ql[128], qh[64] and the 16 int8 scales
    grid = BlockGrid(GGML_TYPES["Q6_K"], {"d": torch.ones(1, 1).half(),
                                          "sc": torch.full((1, 16), -1, dtype=torch.int8)}, (1, 256))
    q6 = pack(torch.full((1, 256), 63, dtype=torch.uint8), grid)[0]
    assert q6[208:].tolist() == [0x00, 0x3C] and q6[192:208].tolist() == [0xFF] * 16
    assert q6[:192].tolist() == [0xFF] * 192


def test_bad_inputs_raise_clear_errors():
    codes, grid = random_grid("Q4_K", 2, 512, 0)
    with pytest.raises(ValueError, match="Q4_K codes must lie in 0..15; got 16"):
        pack(torch.full((2, 512), 16, dtype=torch.uint8), grid)
    with pytest.raises(ValueError, match=r"Q4_K codes must be a uint8 tensor of shape \(2, 512\); got torch.float32"):
        pack(codes.float(), grid)
    with pytest.raises(ValueError, match=r"got torch.uint8 of shape \(2, 256\)"):
        pack(codes[:, :256], grid)
    with pytest.raises(ValueError, match="pack needs a BlockGrid"):
        pack(codes, grid.fields)
    data = pack(codes, grid)
    with pytest.raises(ValueError, match="Q4_K data must be a 2-D uint8 array"):
        unpack(data.astype(np.int16), "Q4_K", 512)
    with pytest.raises(ValueError, match="Q4_K data must be a 2-D uint8 array"):
        unpack(data.reshape(-1), "Q4_K", 512)
    with pytest.raises(ValueError, match="a Q4_K row of 256 elements has 144 bytes; the data has 288"):
        unpack(data, "Q4_K", 256)
    with pytest.raises(ValueError, match="Q4_K needs a row length .* multiple of its block of 256 elements; got 500"):
        unpack(data, "Q4_K", 500)
    with pytest.raises(ValueError, match="unknown ggml type 'IQ4_XS'"):
        unpack(data, "IQ4_XS", 512)
