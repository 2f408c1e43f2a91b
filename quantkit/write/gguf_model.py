"""A model as llama.cpp lays it out in GGUF: its architecture, hyperparameter keys, tensor names and q/k rows.

What is written is what llama.cpp's converter (convert_hf_to_gguf.py: TextModel, LlamaModel, Qwen2Model,
Qwen3Model) and llama-quantize write for the same model: `general.architecture` from the model type
(ARCHITECTURES), the hyperparameters under the architecture's keys, the rope scaling llama.cpp reads (linear and
YaRN as keys, Llama-3's as the `rope_freqs` tensor; other kinds are refused), `general.file_type` and
`general.quantization_version`; tensors named by gguf-py's own name map, llama's q/k rows permuted back to the
interleaved rope order (`rows_permutation`), rotary buffers dropped and a tied head not written. Config values
are read as untrusted (`model_shape`). The tokenizer's keys come from write/gguf_vocab.py, the file itself from
write/gguf_file.py.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from quantkit.errors import QuantkitError
from quantkit.untrusted import positive_int

if TYPE_CHECKING:
    from gguf import GGUFWriter

ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # model_type -> GGUF
PERMUTED_ARCHITECTURES = frozenset({"llama"})  # LlamaModel.undo_permute: llama.cpp runs llama with NORM rope
DROPPED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")  # ModelBase's filter
HEAD = "lm_head.weight"
QUERY_SUFFIXES = ("q_proj.weight", "q_proj.bias")
KEY_SUFFIXES = ("k_proj.weight", "k_proj.bias")
NAME_SUFFIXES = (".weight", ".bias")
GENERAL_TYPE = "model"
# rope kinds llama.cpp reads (TextModel.set_gguf_parameters, LlamaModel.generate_extra_tensors)
ROPE_KINDS = ("default", "linear", "yarn", "llama3")
# YaRN's optional keys (the first of each spelling found) -> gguf-py's writer method
YARN_OPTIONAL = ((("extrapolation_factor",), "add_rope_scaling_yarn_ext_factor"),
                 (("attention_factor", "attn_factor"), "add_rope_scaling_yarn_attn_factor"),
                 (("beta_fast",), "add_rope_scaling_yarn_beta_fast"),
                 (("beta_slow",), "add_rope_scaling_yarn_beta_slow"))
LLAMA3_DEFAULTS = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}  # generate_extra_tensors' defaults
ROPE_FREQS = "rope_freqs.weight"
DEFAULT_ROPE_THETA = 10000.0  # llama.cpp's freq_base when the config names none
TYPE_70B_LAYERS = 80  # llama.cpp's LLM_TYPE_70B: llama (with grouped-query attention) and qwen2 at 80 layers


@dataclass(frozen=True)
class ModelShape:
    """The config values a GGUF file is written from, checked."""
    arch: str
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    context: int
    vocab_size: int
    rms_eps: float
    tied: bool
    rope_theta: float | None
    rope: dict


def gguf_architecture(config: dict) -> str:
    """The GGUF `general.architecture` llama.cpp writes for this config's model_type; one line refusing others."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        raise QuantkitError(f"config.json: model_type {model_type!r} cannot be written as GGUF; quantkit writes "
                            f"{', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def model_shape(config: dict, where: str = "config.json") -> ModelShape:
    """The config's sizes, norm epsilon, tying and rope, each checked (type and range) before use."""
    arch = gguf_architecture(config)
    sizes = {key: positive_int(config, key, where) for key in ("num_hidden_layers", "hidden_size",
             "intermediate_size", "num_attention_heads", "max_position_embeddings", "vocab_size")}
    heads = sizes["num_attention_heads"]
    kv_heads = positive_int(config, "num_key_value_heads", where) if config.get("num_key_value_heads") is not None \
        else heads
    if heads % kv_heads:
        raise QuantkitError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                            f"{kv_heads}")
    if config.get("head_dim") is not None:
        head_dim = positive_int(config, "head_dim", where)
    elif sizes["hidden_size"] % heads:
        raise QuantkitError(f"{where}: hidden_size {sizes['hidden_size']} is not a multiple of num_attention_heads "
                            f"{heads}, and no head_dim is given")
    else:
        head_dim = sizes["hidden_size"] // heads
    if arch in PERMUTED_ARCHITECTURES and head_dim % 2:
        raise QuantkitError(f"{where}: head_dim {head_dim} is odd; rope needs pairs of dimensions")
    tied = config.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise QuantkitError(f"{where}: 'tie_word_embeddings' is {tied!r}, expected true or false")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise QuantkitError(f"{where}: the rope parameters are {rope!r}, expected an object")
    theta = rope.get("rope_theta", config.get("rope_theta"))
    return ModelShape(arch, sizes["num_hidden_layers"], sizes["hidden_size"], sizes["intermediate_size"], heads,
                      kv_heads, head_dim, sizes["max_position_embeddings"], sizes["vocab_size"],
                      positive_number(config, "rms_norm_eps", where), tied,
                      None if theta is None else positive_number({"rope_theta": theta}, "rope_theta", where),
                      rope)


def positive_number(mapping: dict, key: str, where: str) -> float:
    value = mapping.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise QuantkitError(f"{where}: {key!r} is {value!r}, expected a positive number")
    return float(value)


def rope_kind(shape: ModelShape, where: str = "config.json") -> str:
    """The rope scaling kind of the config, one llama.cpp reads for this architecture, else one line."""
    kind = shape.rope.get("rope_type", shape.rope.get("type", "default"))
    allowed = ROPE_KINDS if shape.arch in PERMUTED_ARCHITECTURES else ROPE_KINDS[:3]
    if "full_attention" in shape.rope or kind not in allowed:
        raise QuantkitError(f"{where}: rope scaling {kind!r} is not one llama.cpp reads for {shape.arch} (it reads "
                            f"{', '.join(allowed)})")
    return str(kind)


def is_type_70b(config: dict) -> bool:
    """Whether llama.cpp classes the model LLM_TYPE_70B (gguf_mix's attn_v rule)."""
    shape = model_shape(config)
    grouped = shape.n_heads != shape.n_kv_heads or shape.arch != "llama"
    return shape.n_layers == TYPE_70B_LAYERS and grouped and shape.arch in ("llama", "qwen2")


def add_model_metadata(kv: GGUFWriter, config: dict, *, name: str, file_type: int) -> None:
    """`general.*` and the architecture's hyperparameter and rope keys, in llama.cpp's converter's order."""
    shape = model_shape(config)
    kind = rope_kind(shape)
    kv.add_type(GENERAL_TYPE)
    kv.add_name(name)
    kv.add_block_count(shape.n_layers)
    kv.add_context_length(shape.context)
    kv.add_embedding_length(shape.hidden)
    kv.add_feed_forward_length(shape.intermediate)
    kv.add_head_count(shape.n_heads)
    kv.add_head_count_kv(shape.n_kv_heads)
    _add_rope_scaling(kv, shape, kind)
    if shape.rope_theta is not None:
        kv.add_rope_freq_base(shape.rope_theta)
    kv.add_layer_norm_rms_eps(shape.rms_eps)
    if shape.head_dim != shape.hidden // shape.n_heads:
        kv.add_key_length(shape.head_dim)
        kv.add_value_length(shape.head_dim)
    kv.add_file_type(file_type)
    if shape.arch == "llama":
        kv.add_vocab_size(shape.vocab_size)
        kv.add_rope_dimension_count(shape.head_dim)
    from gguf import GGML_QUANT_VERSION

    kv.add_quantization_version(GGML_QUANT_VERSION)


def _add_rope_scaling(kv: GGUFWriter, shape: ModelShape, kind: str) -> None:
    from gguf import RopeScalingType

    rope, where = shape.rope, "config.json rope parameters"
    if kind == "linear":
        kv.add_rope_scaling_type(RopeScalingType.LINEAR)
        kv.add_rope_scaling_factor(positive_number(rope, "factor", where))
    elif kind == "yarn":
        kv.add_rope_scaling_type(RopeScalingType.YARN)
        kv.add_rope_scaling_factor(positive_number(rope, "factor", where))
        kv.add_rope_scaling_orig_ctx_len(positive_int(rope, "original_max_position_embeddings", where))
        for keys, method in YARN_OPTIONAL:
            key = next((k for k in keys if rope.get(k) is not None), None)
            if key is not None:
                getattr(kv, method)(positive_number(rope, key, where))


def extra_tensors(config: dict) -> dict[str, np.ndarray]:
    """Tensors llama.cpp generates from the config: Llama-3's rope frequency factors (`rope_freqs.weight`, F32),
    computed as LlamaModel.generate_extra_tensors does, with the original context length taken from the rope
    parameters, where transformers reads it (llama.cpp reads a top-level key, absent from Llama-3 configs, and
    falls back to the same 8192)."""
    shape = model_shape(config)
    if rope_kind(shape) != "llama3":
        return {}
    where = "config.json rope parameters"
    params = {key: positive_number({key: shape.rope.get(key, default)}, key, where)
              for key, default in LLAMA3_DEFAULTS.items()}
    base = shape.rope_theta if shape.rope_theta is not None else DEFAULT_ROPE_THETA
    freqs = 1.0 / (base ** (torch.arange(0, shape.head_dim, 2, dtype=torch.float32) / shape.head_dim))
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    context = params["original_max_position_embeddings"]
    if high < low:
        raise QuantkitError(f"{where}: high_freq_factor {high} is below low_freq_factor {low}")
    wavelen = 2 * math.pi / freqs
    smooth = (context / wavelen - low) / (high - low)
    factors = 1 / ((1 - smooth) / params["factor"] + smooth)
    factors = torch.where(wavelen < context / high, torch.ones_like(factors), factors)
    factors = torch.where(wavelen > context / low, torch.full_like(factors, params["factor"]), factors)
    return {ROPE_FREQS: factors.to(torch.float32).numpy()}


@functools.lru_cache(maxsize=8)
def _name_map(arch: str, n_layers: int) -> Any:
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    by_name = {value: key for key, value in MODEL_ARCH_NAMES.items()}
    return get_tensor_name_map(by_name[arch], n_layers)


def gguf_tensor_name(hf_name: str, config: dict) -> str | None:
    """The GGUF name of checkpoint tensor `hf_name` (gguf-py's name map); None for what llama.cpp does not write
    (rotary buffers, the head when tied); one line for a tensor llama.cpp has no place for."""
    shape = model_shape(config)
    if hf_name.endswith(DROPPED_SUFFIXES) or (hf_name == HEAD and shape.tied):
        return None
    name = _name_map(shape.arch, shape.n_layers).get_name(hf_name, try_suffixes=NAME_SUFFIXES)
    if name is None:
        raise QuantkitError(f"tensor {hf_name} has no place in llama.cpp's {shape.arch} GGUF layout")
    return name


def rows_permutation(hf_name: str, config: dict) -> Tensor | None:
    """Row indices `p` such that `w[p]` is llama.cpp's permuted q/k weight or bias (LlamaModel.permute: within a
    head, row 2j+i comes from row i*head_dim/2+j); None for other tensors and architectures. Rows are permuted
    whole, so it applies to packed GGUF rows too."""
    shape = model_shape(config)
    if shape.arch not in PERMUTED_ARCHITECTURES:
        return None
    if hf_name.endswith(QUERY_SUFFIXES):
        heads = shape.n_heads
    elif hf_name.endswith(KEY_SUFFIXES):
        heads = shape.n_kv_heads
    else:
        return None
    return torch.arange(heads * shape.head_dim).reshape(heads, 2, shape.head_dim // 2).transpose(1, 2).reshape(-1)
