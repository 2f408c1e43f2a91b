"""formats/gguf.py: a GGUF file read as the tensors of its base Hugging Face model. GGUF files are made here from a
tiny llama the way llama.cpp converts one (its tensor names, q/k permuted, its metadata and byte-level vocabulary),
with every tensor type gguf-py quantizes; what the source presents must be, bit for bit, what transformers' own
GGUF loader makes of the file, and a damaged or mismatched file is one line naming it."""
import json
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_model

from quantkit.errors import QuantkitError

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType

# every type gguf-py 0.19's gguf.quants.quantize writes (its K-types dequantize only: K_TYPES below)
QUANTIZED = (T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.MXFP4, T.TQ1_0, T.TQ2_0)
# K-types, which gguf-py cannot quantize: random blocks with their fp16 scales (byte offsets in a block) set finite
K_TYPES = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}
SHAPE = dict(hidden_size=256, intermediate_size=512)  # rows of whole 256-element blocks, so every type fits


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf LlamaModel.permute, which transformers' GGUF loader undoes."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _k_blocks(a: np.ndarray, qtype) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(a.size)
    raw = rng.integers(0, 256, (a.shape[0], a.shape[1] // block, size), dtype=np.uint8)
    for at in K_TYPES[qtype]:
        raw[:, :, at:at + 2] = np.frombuffer(np.float16(2e-4).tobytes(), np.uint8)
    return raw.reshape(a.shape[0], -1)


def write_gguf(base: Path, path: Path, types: dict[str, object] | None = None, tied: bool = False,
               edit: dict[str, np.ndarray] | None = None) -> Path:
    """The model in `base` as a llama GGUF: types {GGUF tensor name: ggml type} (F32 where not named; 1-D tensors
    stay F32); tied drops the output head (what llama.cpp writes for a tied model); edit replaces tensors."""
    from safetensors.numpy import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    config = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = {hf: g for g, hf in get_gguf_hf_weights_map(model, TensorProcessor(), model_type="llama").items()}
    state = load_file(base / "model.safetensors")
    if "lm_head.weight" not in state and not tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    tok = json.loads((base / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["id"] for t in tok["added_tokens"]}

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(config.max_position_embeddings)
    w.add_block_count(config.num_hidden_layers)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_dimension_count(config.head_dim)
    w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if i in specials else 1 for _, i in vocab])
    w.add_token_merges([" ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(config.bos_token_id)
    w.add_eos_token_id(config.eos_token_id)
    w.add_unk_token_id(tok["model"]["vocab"]["<unk>"])
    for hf_name, a in state.items():
        if tied and hf_name == "lm_head.weight":
            continue
        name = names[hf_name]
        a = a.astype(np.float32)
        if name.endswith("attn_q.weight"):
            a = _permute(a, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            a = _permute(a, config.num_key_value_heads)
        a = (edit or {}).get(name, a)
        qtype = (types or {}).get(name, T.F32)
        if a.ndim == 1 or qtype == T.F32:
            w.add_tensor(name, a)
        elif qtype in K_TYPES:
            w.add_tensor(name, _k_blocks(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def every_type(base: Path) -> dict[str, object]:
    """Each 2-D tensor of the model a type, round robin, so that every type is in one file."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base)
    names = ["token_embd.weight", "output.weight"] + [
        f"blk.{i}.{p}.weight" for i in range(config.num_hidden_layers)
        for p in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
    types = [*QUANTIZED, *K_TYPES]
    return {n: types[i % len(types)] for i, n in enumerate(names)}


def transformers_state(gguf_file: Path) -> dict[str, torch.Tensor]:
    """What transformers' own GGUF loader makes of the file (float32)."""
    return dict(transformers_model(gguf_file).state_dict())


def transformers_model(gguf_file: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                    dtype=torch.float32, trust_remote_code=False).eval()


def model_from(source, config) -> torch.nn.Module:
    """A meta model of `config` filled from `source` one tensor at a time (buffers such as rotary tables real)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name, _ in model.named_parameters():  # a tied head is not listed apart: it is the embeddings
        set_module_tensor_to_device(model, name, "cpu", value=source.get(name))
    return model.eval()


def perplexity(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(perplexity, logits) of the model on the token windows."""
    with torch.no_grad():
        out = model(tokens, labels=tokens)
    return float(out.loss.exp()), out.logits


def base_config(base: Path, **overrides):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(base, **overrides)


def base_names(base: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(base / "model.safetensors", "pt") as f:
        return sorted(f.keys())


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_tokenizer) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("base"), tiny_tokenizer, **SHAPE)


@pytest.fixture(scope="module")
def mixed(base, tmp_path_factory) -> Path:
    """The base as GGUF, its 2-D tensors in every type gguf-py writes (and the K-types)."""
    return write_gguf(base, tmp_path_factory.mktemp("mixed") / "model.gguf", every_type(base))


# --- what the source presents ---------------------------------------------------------------------------------------

def test_every_tensor_is_what_transformers_loads_bit_for_bit(base, mixed):
    from quantkit.formats.gguf import open_gguf

    source = open_gguf(mixed, base_config(base))
    theirs = transformers_state(mixed)
    assert sorted(source.names()) == base_names(base) == sorted(theirs)
    for name in source.names():
        ours = source.get(name)
        assert ours.dtype == torch.float32 and source.shape(name) == tuple(ours.shape), name
        assert torch.equal(ours, theirs[name]), name
    source.close()
    expected = {t.name for t in [*QUANTIZED, *K_TYPES]} | {"F32"}
    assert set(source.tensor_types) == expected and source.architecture == "llama"
    assert sum(source.tensor_types.values()) == len(source.names())
    assert source.ggml_type("model.layers.0.self_attn.q_proj.weight") == every_type(base)["blk.0.attn_q.weight"].name
    assert not source.is_quantized("model.norm.weight") and source.is_quantized("model.layers.0.mlp.up_proj.weight")


def test_the_model_built_from_the_source_has_transformers_perplexity(base, mixed, tiny_tokenizer):
    from quantkit.config import DEFAULT_CALIB
    from quantkit.formats.gguf import open_gguf
    from quantkit.source.calibration import load_documents

    text = " ".join(load_documents(DEFAULT_CALIB)[:20])
    tokens = torch.tensor(tiny_tokenizer(text)["input_ids"][:4 * 128]).reshape(4, 128)
    config = base_config(base)
    ours, our_logits = perplexity(model_from(open_gguf(mixed, config), config), tokens)
    theirs, their_logits = perplexity(transformers_model(mixed), tokens)
    assert abs(ours / theirs - 1) < 0.01, (ours, theirs)
    # the same weights in the same architecture: a random tiny model's perplexity barely sees attention, its
    # logits do (a q/k left permuted)
    assert torch.allclose(our_logits, their_logits, rtol=0, atol=1e-5)


def test_without_a_config_it_reads_the_model_the_gguf_describes(base, mixed):
    from quantkit.formats.gguf import open_gguf

    source = open_gguf(mixed)
    assert source.config.model_type == "llama" and source.config.hidden_size == SHAPE["hidden_size"]
    assert sorted(source.names()) == base_names(base)
    assert torch.equal(source.get("lm_head.weight"), transformers_state(mixed)["lm_head.weight"])


def test_the_metadata_gives_the_base_vocabulary(base, mixed, tiny_tokenizer):
    from quantkit.formats.gguf import read_metadata

    config, tokenizer, _ = read_metadata(mixed)
    assert config.vocab_size == base_config(base).vocab_size
    # transformers' byte-level GGUF tokenizer adds GPT-2's "<|endoftext|>" past the model's vocabulary when the
    # file has no such token: the ids the model has rows for are the base's
    vocab = tokenizer.get_vocab()
    assert {t: i for t, i in vocab.items() if i < config.vocab_size} == tiny_tokenizer.get_vocab()
    text = "The quick brown fox jumps over the lazy dog."
    assert tokenizer(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]


def test_the_registry_detects_a_gguf(mixed):
    from quantkit.formats import registry

    assert registry.detect_format(mixed) == registry.GGUF


# --- tied embeddings: what the base's checkpoint would hold ---------------------------------------------------------

@pytest.fixture(scope="module")
def tied_base(tmp_path_factory, tiny_tokenizer) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tied"), tiny_tokenizer, tie_word_embeddings=True, **SHAPE)


def test_a_tied_gguf_of_a_tied_base_holds_the_embeddings_once(tied_base, tmp_path):
    from quantkit.formats.gguf import open_gguf

    path = write_gguf(tied_base, tmp_path / "model.gguf", {"token_embd.weight": T.Q8_0}, tied=True)
    source = open_gguf(path, base_config(tied_base))
    theirs = transformers_state(path)
    assert sorted(source.names()) == base_names(tied_base) and "lm_head.weight" not in source
    assert all(torch.equal(source.get(n), theirs[n]) for n in source.names())


def test_a_tied_gguf_read_as_an_untied_base_gives_the_head_the_embeddings(base, tmp_path):
    from quantkit.formats.gguf import open_gguf

    path = write_gguf(base, tmp_path / "model.gguf", {"token_embd.weight": T.Q4_0}, tied=True)
    source = open_gguf(path, base_config(base))
    assert sorted(source.names()) == base_names(base)
    embeddings = transformers_state(path)["model.embed_tokens.weight"]
    assert torch.equal(source.get("lm_head.weight"), embeddings)
    assert torch.equal(source.get("model.embed_tokens.weight"), embeddings)


def test_a_mistral_base_reads_the_llama_gguf_llama_cpp_writes_for_it(tmp_path, tiny_tokenizer):
    from quantkit.formats.gguf import open_gguf

    base = make_tiny_model(tmp_path / "mistral", tiny_tokenizer, model_type="mistral", **SHAPE)
    path = write_gguf(base, tmp_path / "model.gguf", {"blk.0.attn_q.weight": T.Q4_1, "blk.1.attn_k.weight": T.Q5_0})
    source = open_gguf(path, base_config(base))
    theirs = transformers_state(path)  # transformers reads it as llama: the same tensor names
    assert source.config.model_type == "llama" and sorted(source.names()) == base_names(base) == sorted(theirs)
    assert all(torch.equal(source.get(n), theirs[n]) for n in source.names())


# --- damaged or mismatched files: one line naming the file ----------------------------------------------------------

def _one_line(call) -> str:
    with pytest.raises(QuantkitError) as e:
        call()
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def test_a_truncated_gguf_is_one_line(base, mixed, tmp_path):
    from quantkit.formats.gguf import open_gguf

    path = tmp_path / "model.gguf"
    path.write_bytes(mixed.read_bytes()[:-1000])
    message = _one_line(lambda: open_gguf(path, base_config(base)))
    assert message.startswith(f"{path} is not a valid GGUF file: tensor ") and "lies past the end of the file" in message


def test_a_tensor_of_the_wrong_shape_is_one_line(base, tmp_path):
    from quantkit.formats.gguf import open_gguf

    path = write_gguf(base, tmp_path / "model.gguf", edit={"blk.1.ffn_up.weight": np.zeros((256, 256), np.float32)})
    message = _one_line(lambda: open_gguf(path, base_config(base)))
    assert message == (f"{path}: tensor 'blk.1.ffn_up.weight' has shape [256, 256], the model's "
                       "model.layers.1.mlp.up_proj.weight needs [512, 256]; quantkit cannot read it as this model")


def test_another_architecture_is_one_line(base, mixed):
    from quantkit.formats.gguf import open_gguf

    qwen = base_config(base).to_dict()
    qwen.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    from transformers import Qwen2Config

    message = _one_line(lambda: open_gguf(mixed, Qwen2Config(**qwen)))
    assert message == (f"{mixed} holds a 'llama' model, the base is a 'qwen2' model; compare it with the model it "
                       "was converted from")


@pytest.mark.parametrize("key,value", [("num_hidden_layers", 3), ("hidden_size", 128), ("vocab_size", 600),
                                       ("num_key_value_heads", 4)])
def test_other_sizes_are_one_line(base, mixed, key, value):
    from quantkit.formats.gguf import open_gguf

    wanted = getattr(base_config(base), key)
    message = _one_line(lambda: open_gguf(mixed, base_config(base, **{key: value})))
    assert message == (f"{mixed} does not match the base: its {key} is {wanted}, the base's is {value}; compare it "
                       "with the model it was converted from")


def test_an_output_head_a_tied_base_has_no_room_for_is_one_line(tied_base, tmp_path):
    from quantkit.formats.gguf import open_gguf

    path = write_gguf(tied_base, tmp_path / "model.gguf")
    message = _one_line(lambda: open_gguf(path, base_config(tied_base)))
    assert message == (f"{path}: tensor 'output.weight' would become lm_head.weight, which the llama model does not "
                       "hold apart (tied or unknown); quantkit cannot read it as this model")


def test_a_scale_that_is_not_a_number_is_one_line_naming_the_tensor(base, mixed, tmp_path):
    from quantkit.formats.gguf import open_gguf
    from quantkit.source.gguf_header import read_header

    path = Path(shutil.copy(mixed, tmp_path / "model.gguf"))
    entry = next(t for t in read_header(path).tensors if t.ggml_type == T.Q8_0)  # d comes first in a Q8_0 block
    data = bytearray(path.read_bytes())
    struct.pack_into("<e", data, entry.start, float("nan"))
    path.write_bytes(bytes(data))
    source = open_gguf(path, base_config(base))
    name = next(n for n in source.names() if source.ggml_type(n) == "Q8_0")
    message = _one_line(lambda: source.get(name))
    assert message == f"{path}: tensor {entry.name!r} ({name}) dequantizes to NaN or Inf values"
