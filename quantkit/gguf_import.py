"""import-gguf: a GGUF file -> a plain safetensors checkpoint (config, tokenizer, chat template, generation config).

transformers' GGUF loader dequantizes the file to float; its config then carries a GGUF
`quantization_config` that must be dropped, and the model cannot be `save_pretrained` as is, so the state
dict is written with quantkit's own shard writer.
"""
from __future__ import annotations

import shutil
import uuid
import warnings
from pathlib import Path

import torch

from .errors import QuantkitError
from .writer import ShardWriter

GGUF_MAGIC = b"GGUF"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def import_gguf(gguf_file: str | Path, out_dir: str | Path, *, dtype: str = "float32", max_shard_bytes: int = 2 * 10**9,
                overwrite: bool = False) -> Path:
    """Convert `gguf_file` into `out_dir`; the directory appears only once complete."""
    src = Path(gguf_file).expanduser()
    out = Path(out_dir).expanduser()
    if not src.is_file():
        raise QuantkitError(f"GGUF file {src} not found")
    with open(src, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise QuantkitError(f"{src} is not a GGUF file (its first bytes are not 'GGUF')")
    if dtype not in DTYPES:
        raise QuantkitError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise QuantkitError(f"{out} already exists; pass --overwrite to replace it")

    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
            model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=DTYPES[dtype])
    except Exception as e:
        raise QuantkitError(f"transformers cannot load {src}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

    staging = out.parent / f".{out.name}.import-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        _write_checkpoint(model, tokenizer, staging, max_shard_bytes, GenerationConfig)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _write_checkpoint(model, tokenizer, directory: Path, max_shard_bytes: int, GenerationConfig) -> None:
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = next(model.parameters()).dtype
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        ptr = model.get_input_embeddings().weight.data_ptr()
        for k in [k for k, v in state.items() if k.startswith("lm_head") and v.data_ptr() == ptr]:
            del state[k]
    writer = ShardWriter(directory, max_shard_bytes)
    for name in sorted(state, key=_natural_key):
        writer.add({name: state[name]})
    writer.finish()
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    generation = model.generation_config if model.generation_config is not None else GenerationConfig.from_model_config(config)
    generation.save_pretrained(directory)


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]
