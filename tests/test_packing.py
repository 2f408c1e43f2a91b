import pytest
import torch

from quantkit.write.packing import (
    pack_last_dim,
    pack_qweight,
    pack_qzeros,
    unpack_last_dim,
    unpack_qweight,
    unpack_qzeros,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(1, 32), (7, 64), (3, 96), (96, 256), (5, 576)])
def test_pack_unpack_roundtrip(bits, shape):
    g = torch.Generator().manual_seed(bits * 1000 + shape[1])
    q = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int32)
    packed = pack_last_dim(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (shape[0], shape[1] * bits // 32)
    assert torch.equal(unpack_last_dim(packed, bits, shape[1]), q)


@pytest.mark.parametrize("bits,n", [(2, 16), (4, 8), (4, 24), (8, 4), (8, 12)])
def test_lengths_not_multiple_of_32_roundtrip(bits, n):
    q = torch.randint(0, 2**bits, (3, n), dtype=torch.int32)
    assert torch.equal(unpack_last_dim(pack_last_dim(q, bits), bits, n), q)


def test_known_4bit_layout_low_bits_first():
    q = torch.arange(8, dtype=torch.int32).reshape(1, 8)  # 0..7 -> nibbles 0x76543210
    assert int(pack_last_dim(q, 4)[0, 0]) == 0x76543210


def test_sign_bit_wraps_to_negative_int32():
    q = torch.full((1, 8), 15, dtype=torch.int32)
    assert int(pack_last_dim(q, 4)[0, 0]) == -1


def test_3bit_straddles_words_like_autogptq():
    # value 10 sits at stream bits 30..32: low two bits end word 0, its high bit starts word 1
    q = torch.zeros(1, 32, dtype=torch.int32)
    q[0, 10] = 0b111
    w = pack_last_dim(q, 3)[0]
    assert (int(w[0]) & 0xFFFFFFFF) == 0b11 << 30 and int(w[1]) == 1 and int(w[2]) == 0
    q = torch.zeros(1, 32, dtype=torch.int32)
    q[0, 21] = 0b111  # stream bits 63..65
    w = pack_last_dim(q, 3)[0]
    assert (int(w[1]) & 0xFFFFFFFF) == 1 << 31 and int(w[2]) == 0b11 and int(w[0]) == 0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qweight_and_qzeros_orientation(bits):
    n_out, n_in, groups = 64, 96, 3
    codes = torch.randint(0, 2**bits, (n_out, n_in), dtype=torch.int32)
    qweight = pack_qweight(codes, bits)
    assert qweight.shape == (n_in * bits // 32, n_out)
    assert torch.equal(unpack_qweight(qweight, bits, n_in), codes)
    zeros = torch.randint(0, 2**bits, (groups, n_out), dtype=torch.int32)
    qzeros = pack_qzeros(zeros, bits)
    assert qzeros.shape == (groups, n_out * bits // 32)
    assert torch.equal(unpack_qzeros(qzeros, bits, n_out), zeros)


def test_pack_rejects_values_out_of_range():
    with pytest.raises(ValueError, match="outside"):
        pack_last_dim(torch.full((2, 32), 16, dtype=torch.int32), bits=4)
    with pytest.raises(ValueError, match="outside"):
        pack_last_dim(torch.full((2, 32), -1, dtype=torch.int32), bits=4)


def test_pack_rejects_bad_lengths_and_bits():
    with pytest.raises(ValueError, match="divisible by 32"):
        pack_last_dim(torch.zeros(1, 48, dtype=torch.int32), bits=3)
    with pytest.raises(ValueError, match="bits must be"):
        pack_last_dim(torch.zeros(1, 32, dtype=torch.int32), bits=5)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("chunk", [1, 100, 2**21])  # one row at a time (a row wider than the chunk), a few, all
def test_packing_in_chunks_gives_the_same_words(bits, chunk, monkeypatch):
    """Rows are packed a bounded number of values at a time (the int64 working copies stay small on a GPU);
    the words do not depend on where the chunks fall."""
    import quantkit.write.packing as packing

    values = torch.randint(0, 2**bits, (37, 192), dtype=torch.int32)
    monkeypatch.setattr(packing, "PACK_VALUES", 2**30)
    whole = pack_last_dim(values, bits)
    monkeypatch.setattr(packing, "PACK_VALUES", chunk)
    assert torch.equal(pack_last_dim(values, bits), whole)
    assert torch.equal(unpack_last_dim(whole, bits, 192), values)
