"""Which ggml type each tensor of a GGUF file gets: llama.cpp's per-tensor choice (src/llama-quant.cpp) as data.

`tensor_type` reproduces `llama_tensor_get_type` of llama-quantize for the file types `--gguf-type` accepts
(FILE_TYPES), without `--pure`, `--output-tensor-type`, `--token-embedding-type` or `--tensor-type` overrides:

- tensors llama.cpp never quantizes (`tensor_allows_quantization`: fewer than 2 dimensions, names not ending in
  `weight`, norms, routers) stay F32, as llama.cpp's converter writes them (KEPT_F32_*);
- the file type's default type (DEFAULT_TYPES), then the overrides of `llama_tensor_get_type_impl`:
  `output.weight`, and `token_embd.weight` when the file has no `output.weight` (tied embeddings): Q8_0 when the
  row length is not a multiple of the default type's block, else Q6_K unless the default is Q8_0;
  `attn_v` (also `attn_qkv`, `attn_kv_b`): Q4_K_M/Q5_K_M -> Q6_K where `use_more_bits`, Q4_K_S -> Q5_K for the
  first 4; 70B models (llama.cpp's LLM_TYPE_70B) Q4_K -> Q5_K; 8 experts -> Q8_0; `attn_k` with 8 experts ->
  Q8_0; any `ffn_down*`: Q4_K_M/Q5_K_M -> Q6_K where `use_more_bits`, Q4_K_S -> Q5_K for the first n/8 layers,
  Q4_0/Q5_0 -> Q4_1/Q5_1 for the first n/8 layers when an importance matrix is used; `attn_output` with 8
  experts: Q4_K_S/Q4_K_M -> Q5_K;
- the row-length fallback of `tensor_type_fallback` (FALLBACKS): Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, then
  F16 when the fallback's block does not divide the row either; llama.cpp refuses the other types.

llama.cpp counts attention-V tensors and ffn_down tensors as it meets them in layer order; for the architectures
quantkit writes every layer holds exactly one of each, so both counters are the layer number of `blk.N.` and their
totals the number of layers, which is what is used here.

Q4_K and Q5_K are quantkit's own file types, not llama.cpp ftypes: every quantizable tensor gets that type and
`output.weight` (or the tied `token_embd.weight`) follows the output rule above; the fallbacks apply. Their
`general.file_type` is that of Q4_K_M / Q5_K_M (`file_type_id`), the ftype whose default type they share.
"""
from __future__ import annotations

import re

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from quantkit.config import GGUF_FILE_TYPES
from quantkit.errors import QuantkitError

FILE_TYPES = GGUF_FILE_TYPES
# llama_ftype_get_default_type
DEFAULT_TYPES = {"Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q8_0": "Q8_0", "Q4_K": "Q4_K",
                 "Q5_K": "Q5_K", "Q6_K": "Q6_K", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K",
                 "Q5_K_M": "Q5_K"}
# the llama_ftype (gguf.LlamaFileType) written as general.file_type; quantkit's plain Q4_K/Q5_K take the _M one
FILE_TYPE_NAMES = {"Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1",
                   "Q8_0": "MOSTLY_Q8_0", "Q4_K": "MOSTLY_Q4_K_M", "Q5_K": "MOSTLY_Q5_K_M", "Q6_K": "MOSTLY_Q6_K",
                   "Q4_K_S": "MOSTLY_Q4_K_S", "Q4_K_M": "MOSTLY_Q4_K_M", "Q5_K_S": "MOSTLY_Q5_K_S",
                   "Q5_K_M": "MOSTLY_Q5_K_M"}
# quantkit's file types that are not llama.cpp ftypes: one type for every quantizable tensor but the output
PLAIN_FILE_TYPES = frozenset({"Q4_K", "Q5_K"})
# elements per block of the types chosen here, from gguf-py's table
BLOCK_ELEMENTS = {name: GGML_QUANT_SIZES[GGMLQuantizationType[name]][0]
                  for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "F16")}
FALLBACKS = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # tensor_type_fallback
LAST_FALLBACK = "F16"  # when the fallback's block does not divide the row either
UNQUANTIZED = "F32"  # what llama.cpp's converter writes for the tensors below, which llama-quantize keeps as they are

# tensor_allows_quantization (the parts that can occur in the architectures quantkit writes), as data: a tensor
# is kept when it has fewer dimensions, its name does not end with the suffix, or contains one of the parts
MIN_QUANTIZED_DIMS = 2
QUANTIZED_SUFFIX = "weight"
KEPT_F32_PARTS = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight")
KEPT_F32_NAMES = frozenset({"position_embd.weight", "token_types.weight"})

OUTPUT = "output.weight"
TOKEN_EMBD = "token_embd.weight"
# llama.cpp's tensor categories, tested in its order (tensor_get_category); attn_v's covers attn_qkv and attn_kv_b
CATEGORIES = (("attn_v", ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight")), ("attn_k", ("attn_k.weight",)),
              ("attn_q", ("attn_q.weight",)), ("attn_output", ("attn_output.weight",)), ("ffn_up", ("ffn_up",)),
              ("ffn_gate", ("ffn_gate",)), ("ffn_down", ("ffn_down",)))
# the bumps of llama_tensor_get_type_impl for the file types above: (category, file types, rule, new type)
# rules: "more_bits" = use_more_bits(i, n); "first_4" = i < 4; "first_eighth" = i < n/8
BUMPS = (("attn_v", ("Q4_K_M", "Q5_K_M"), "more_bits", "Q6_K"),
         ("attn_v", ("Q4_K_S",), "first_4", "Q5_K"),
         ("ffn_down", ("Q4_K_M", "Q5_K_M"), "more_bits", "Q6_K"),
         ("ffn_down", ("Q4_K_S",), "first_eighth", "Q5_K"))
IMATRIX_BUMPS = (("ffn_down", ("Q4_0",), "first_eighth", "Q4_1"), ("ffn_down", ("Q5_0",), "first_eighth", "Q5_1"))
MIXTRAL_EXPERTS = 8  # n_expert == 8: attn_v and attn_k -> Q8_0, attn_output -> Q5_K for Q4_K_S/Q4_K_M
MIXTRAL_TYPES = {"attn_v": ("Q8_0", FILE_TYPES), "attn_k": ("Q8_0", FILE_TYPES),
                 "attn_output": ("Q5_K", ("Q4_K_S", "Q4_K_M"))}
TYPE_70B_BUMP = (("Q4_K",), "Q5_K")  # attn_v of an LLM_TYPE_70B model
_LAYER = re.compile(r"blk\.(\d+)\.")


def file_type_id(file_type: str) -> int:
    """The llama_ftype value written as `general.file_type` for `file_type` (one of FILE_TYPES)."""
    from gguf import LlamaFileType

    check_file_type(file_type)
    return int(LlamaFileType[FILE_TYPE_NAMES[file_type]])


def check_file_type(file_type: str) -> None:
    if file_type not in FILE_TYPES:
        raise QuantkitError(f"unknown GGUF type {file_type!r}; choose one of {', '.join(FILE_TYPES)}")


def kept_unquantized(gguf_name: str, n_dims: int) -> bool:
    """Whether llama.cpp keeps tensor `gguf_name` unquantized (F32 from its converter) whatever the file type."""
    return (n_dims < MIN_QUANTIZED_DIMS or not gguf_name.endswith(QUANTIZED_SUFFIX) or gguf_name in KEPT_F32_NAMES
            or any(part in gguf_name for part in KEPT_F32_PARTS))


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama-quant.cpp's use_more_bits: the first and last eighth of the layers, and every third in between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def tensor_type(file_type: str, gguf_name: str, n_layers: int, row_length: int, n_experts: int = 0, *,
                tied_embeddings: bool = False, n_dims: int = 2, imatrix: bool = False,
                type_70b: bool = False) -> str:
    """The ggml type name llama-quantize gives tensor `gguf_name` (rows of `row_length` elements, `n_dims`
    dimensions) in a `file_type` file of a model with `n_layers` layers and `n_experts` experts per MoE layer;
    "F32" for the tensors it never quantizes. `tied_embeddings`: the file has no output.weight; `imatrix`: the
    weights are quantized with an importance matrix; `type_70b`: llama.cpp classes the model LLM_TYPE_70B
    (gguf_model.is_type_70b)."""
    check_file_type(file_type)
    if kept_unquantized(gguf_name, n_dims):
        return UNQUANTIZED
    default = DEFAULT_TYPES[file_type]
    if gguf_name == OUTPUT or (tied_embeddings and gguf_name == TOKEN_EMBD):
        chosen = output_type(default, row_length)
    elif file_type in PLAIN_FILE_TYPES:
        chosen = default
    else:
        chosen = _mixed_type(file_type, gguf_name, n_layers, n_experts, imatrix, type_70b)
    return fallback(chosen, gguf_name, row_length)


def output_type(default: str, row_length: int) -> str:
    """The output head's type (and the tied embeddings'): Q8_0 when the default type's block does not divide the
    row, else Q6_K unless the default is Q8_0."""
    if row_length % BLOCK_ELEMENTS[default] != 0 or default == "Q8_0":
        return "Q8_0"
    return "Q6_K"


def category(gguf_name: str) -> str | None:
    """llama.cpp's tensor category of a layer tensor (None: none that changes a type here)."""
    for name, parts in CATEGORIES:
        if any(part in gguf_name for part in parts):
            return name
    return None


def layer_of(gguf_name: str, n_layers: int) -> int:
    match = _LAYER.match(gguf_name)
    if match is None or int(match.group(1)) >= n_layers:
        raise QuantkitError(f"tensor {gguf_name!r} names no layer below {n_layers}; llama.cpp cannot place it")
    return int(match.group(1))


def _mixed_type(file_type: str, gguf_name: str, n_layers: int, n_experts: int, imatrix: bool,
                type_70b: bool) -> str:
    chosen = DEFAULT_TYPES[file_type]
    kind = category(gguf_name)
    if kind is None or gguf_name == TOKEN_EMBD:
        return chosen
    if n_experts == MIXTRAL_EXPERTS and kind in MIXTRAL_TYPES:
        mixtral_type, file_types = MIXTRAL_TYPES[kind]
        if file_type in file_types:
            return mixtral_type
    bumps = BUMPS + (IMATRIX_BUMPS if imatrix else ())
    layer = layer_of(gguf_name, n_layers) if kind in ("attn_v", "ffn_down") else 0
    for bump_kind, file_types, rule, new_type in bumps:
        if bump_kind == kind and file_type in file_types and _applies(rule, layer, n_layers):
            chosen = new_type
            break
    if kind == "attn_v" and type_70b and chosen in TYPE_70B_BUMP[0]:
        chosen = TYPE_70B_BUMP[1]
    return chosen


def _applies(rule: str, layer: int, n_layers: int) -> bool:
    if rule == "more_bits":
        return use_more_bits(layer, n_layers)
    if rule == "first_4":
        return layer < 4
    return layer < n_layers // 8


def fallback(chosen: str, gguf_name: str, row_length: int) -> str:
    """tensor_type_fallback: a type whose block does not divide the row becomes FALLBACKS', then F16."""
    if row_length % BLOCK_ELEMENTS[chosen] == 0:
        return chosen
    if chosen not in FALLBACKS:
        raise QuantkitError(f"tensor {gguf_name!r}: its rows of {row_length} are not a multiple of "
                            f"{BLOCK_ELEMENTS[chosen]}, and llama.cpp has no fallback for {chosen}; choose a "
                            "K-quant GGUF type")
    second = FALLBACKS[chosen]
    return second if row_length % BLOCK_ELEMENTS[second] == 0 else LAST_FALLBACK
