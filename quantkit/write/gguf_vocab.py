"""A model's tokenizer as GGUF metadata, as llama.cpp's converter writes a byte-level BPE ("gpt2") tokenizer.

The tokens and their types follow convert_hf_to_gguf.py's `get_vocab_base` (the tokenizer loaded by transformers,
trust_remote_code=False): every id below config.json's vocab_size, ids the tokenizer lacks as `[PAD<i>]` UNUSED;
added tokens CONTROL when special or looking special (`<|...|>`, ...), else USER_DEFINED; the rest NORMAL. The
merges, special token ids, add_bos/add_eos flags and chat template (chat_template.jinja included) come from gguf-py's
own `gguf.SpecialVocab`. For llama, LlamaModel.set_vocab's two additions: `add_space_prefix` from
tokenizer_config.json's `add_prefix_space`, and `add_bos_token` false at a vocabulary of 49152 (llama.cpp's rule for
Granite/SmolLM-sized vocabularies).

`tokenizer.ggml.pre` names the pre-tokenizer llama.cpp must run. llama.cpp's converter finds it by hashing the
token ids of a check text; that hash is taken first, against the entries of llama.cpp's table for the vocabularies
of the architectures written here (PRE_BY_HASH). A tokenizer not in it (a new vocabulary) is named from the
structure of tokenizer.json's pre-tokenizer instead (PRE_BY_STRUCTURE: GPT-2's ByteLevel regex "gpt-2"; digits split
one by one before it "smollm"; Llama-3's split regex "llama-bpe"; Qwen2's "qwen2"). Anything else is refused with
one line rather than written as "default", whose regex would split text differently from the model's tokenizer.
SentencePiece tokenizers (tokenizer.model, or a byte-fallback BPE) are refused too: they need llama.cpp's
SentencePiece path, which is not written here.
"""
from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gguf import TokenType

from quantkit.errors import QuantkitError, first_line
from quantkit.untrusted import positive_int, read_json

if TYPE_CHECKING:
    from gguf import GGUFWriter

TOKENIZER_MODEL = "gpt2"  # tokenizer.ggml.model of a byte-level BPE vocabulary
SENTENCEPIECE_FILE = "tokenizer.model"
# convert_hf_to_gguf.py's check text; the sha256 of str(tokenizer.encode(CHECK_TEXT)) identifies a vocabulary
CHECK_TEXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ "
              "(multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
              "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
              "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
              "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
PRE_BY_HASH = {  # convert_hf_to_gguf.py get_vocab_base_pre, the entries of the vocabularies written here
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen/Qwen3-Embedding-0.6B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",  # R1-Distill-Qwen-1.5B
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # mistralai/Mistral-Nemo-Base
}
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BYTE_LEVEL_REGEX = ("ByteLevel", False, True)  # ByteLevel(add_prefix_space=False, use_regex=True): GPT-2's regex
BYTE_LEVEL_ONLY = ("ByteLevel", False, False)  # the byte mapping after a Split
PRE_BY_STRUCTURE = {  # tokenizer.json pre_tokenizer, as `pre_structure` reads it -> llama.cpp's pre-tokenizer
    (BYTE_LEVEL_REGEX,): "gpt-2",
    (("Digits", True), BYTE_LEVEL_REGEX): "smollm",
    (("Split", LLAMA3_SPLIT, "Isolated", False), BYTE_LEVEL_ONLY): "llama-bpe",
    (("Split", QWEN2_SPLIT, "Isolated", False), BYTE_LEVEL_ONLY): "qwen2",
}
NORMALIZERS = (None, {"type": "NFC"})  # normalizers the named pre-tokenizers are used with
LOOKS_SPECIAL = ("<pad>", "<mask>", "<2mass>", "[@BOS@]")  # TextModel.does_token_look_special
SPECIAL_BRACKETS = (("<|", "|>"), ("<｜", "｜>"), ("<unused", ">"))
SMALL_VOCAB_WITHOUT_BOS = 49152  # LlamaModel.set_vocab: add_bos_token false at this vocabulary size
PAD_TOKEN = "[PAD{}]"


def add_tokenizer(kv: GGUFWriter, model_dir: Path, config: dict, arch: str) -> None:
    """The tokenizer keys of the model in `model_dir` (its tokenizer as transformers loads it, and the side files
    gguf.SpecialVocab reads) into `kv`."""
    from gguf import SpecialVocab

    tokenizer = load_tokenizer(model_dir)
    backend = byte_level_backend(tokenizer, model_dir)
    tokens, types = vocabulary(tokenizer, positive_int(config, "vocab_size", str(model_dir / "config.json")),
                               model_dir)
    kv.add_tokenizer_model(TOKENIZER_MODEL)
    kv.add_tokenizer_pre(pre_tokenizer(backend, tokenizer, model_dir))
    kv.add_token_list(tokens)
    kv.add_token_types(types)
    try:
        special = SpecialVocab(model_dir, load_merges=True)
    except (ValueError, OSError) as e:  # json/merges errors of the side files
        raise QuantkitError(f"gguf cannot read the tokenizer files of {model_dir}: {first_line(e)}") from None
    if not special.merges:
        raise QuantkitError(f"{model_dir}: the tokenizer files hold no merges; a byte-level BPE tokenizer needs them")
    if arch == "llama" and len(tokens) == SMALL_VOCAB_WITHOUT_BOS:
        special.add_special_token["bos"] = False
    special.add_to_gguf(kv, quiet=True)
    if arch == "llama":
        prefix = tokenizer_config(model_dir).get("add_prefix_space")
        if isinstance(prefix, bool):
            kv.add_add_space_prefix(prefix)


def tokenizer_config(model_dir: Path) -> dict:
    path = model_dir / "tokenizer_config.json"
    return read_json(path, "tokenizer config") if path.is_file() else {}


def byte_level_backend(tokenizer: Any, model_dir: Path) -> dict:
    """The loaded tokenizer's own description (tokenizers' JSON), which must be a byte-level BPE tokenizer (what
    llama.cpp calls "gpt2"). It, not tokenizer.json, says how transformers tokenizes: a model's tokenizer class
    may set its own pre-tokenizer (Qwen2's regex)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    description = json.loads(backend.to_str()) if backend is not None else {}
    model, decoder = description.get("model"), description.get("decoder")
    if (not isinstance(model, dict) or model.get("type") != "BPE" or model.get("byte_fallback")
            or not isinstance(decoder, dict) or decoder.get("type") != "ByteLevel"):
        raise QuantkitError(f"the tokenizer of {model_dir} is not a byte-level BPE tokenizer (SentencePiece-style "
                            "or another model); quantkit writes byte-level BPE tokenizers to GGUF")
    return description


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    if not (model_dir / "tokenizer.json").is_file() and (model_dir / SENTENCEPIECE_FILE).is_file():
        raise QuantkitError(f"{model_dir} has a SentencePiece tokenizer ({SENTENCEPIECE_FILE}); quantkit writes "
                            "byte-level BPE tokenizers to GGUF")
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as e:  # transformers raises many types for files it cannot use
        raise QuantkitError(f"transformers cannot load the tokenizer of {model_dir}: {first_line(e)}") from None


def vocabulary(tokenizer: Any, vocab_size: int, model_dir: Path) -> tuple[list[str], list[int]]:
    """(tokens, token types) for ids 0..vocab_size-1, as TextModel.get_vocab_base lists them."""
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise QuantkitError(f"the tokenizer of {model_dir} has token id {max(vocab.values())}, not below "
                            f"config.json's vocab_size {vocab_size}")
    by_id = {index: token for token, index in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoders = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []  # gguf.TokenType values
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(PAD_TOKEN.format(i))
            types.append(TokenType.UNUSED)
            continue
        kind = TokenType.NORMAL
        if token in added:
            if not decoders[i].normalized:  # llama.cpp expects added tokens pre-normalized
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            kind = TokenType.CONTROL if decoders[i].special or looks_special(token) else TokenType.USER_DEFINED
            if kind == TokenType.USER_DEFINED:
                token = token.replace("\u2581", " ")
        tokens.append(token)
        types.append(kind)
    return tokens, types


def looks_special(token: str) -> bool:
    return token in LOOKS_SPECIAL or any(token.startswith(a) and token.endswith(b) for a, b in SPECIAL_BRACKETS)


def pre_tokenizer(backend: dict, tokenizer: Any, model_dir: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: by the check-text hash, else by the structure of the
    loaded tokenizer's pre-tokenizer (`backend`, byte_level_backend's)."""
    ids = tokenizer.encode(CHECK_TEXT)
    named = PRE_BY_HASH.get(sha256(str(ids).encode()).hexdigest())
    if named is not None:
        return named
    structure = pre_structure(backend.get("pre_tokenizer"))
    if backend.get("normalizer") in NORMALIZERS and structure in PRE_BY_STRUCTURE:
        return PRE_BY_STRUCTURE[structure]
    shown = json.dumps(backend.get("pre_tokenizer"))[:80]
    raise QuantkitError(f"the tokenizer of {model_dir}: its pre-tokenizer {shown} is none llama.cpp knows by name "
                        f"(quantkit recognizes {', '.join(sorted(set(PRE_BY_STRUCTURE.values())))}); llama.cpp would "
                        "split text differently")


def pre_structure(pre: Any) -> tuple:
    """A tokenizer.json pre_tokenizer as a tuple of its steps' settings that change the token ids."""
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    if not isinstance(steps, list):
        return ()
    return tuple(_step(step) for step in steps)


def _step(step: Any) -> tuple:
    if not isinstance(step, dict):
        return ("unknown",)
    kind = step.get("type")
    if kind == "ByteLevel":
        return (kind, step.get("add_prefix_space", True), step.get("use_regex", True))
    if kind == "Digits":
        return (kind, step.get("individual_digits", False))
    if kind == "Split":
        pattern = step.get("pattern")
        regex = pattern.get("Regex") if isinstance(pattern, dict) else None
        return (kind, regex, step.get("behavior"), step.get("invert", False))
    return (str(kind),)
