"""Random-weight checkpoints of a real architecture's shape, written tensor by tensor (for scale and memory tests).

GPTQ's cost depends on the shapes, not the values, so a Llama-2-7B-shaped checkpoint of random weights measures
time and memory as well as the real one, and needs nothing downloaded. The tokenizer is a byte-level BPE trained
on the built-in calibration text.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from quantkit.config import DEFAULT_CALIB
from quantkit.errors import QuantkitError
from quantkit.source.calibration import load_documents
from quantkit.write.shards import ShardWriter

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

INIT_STD = 0.02  # transformers' initializer_range: activations stay finite through many random layers


def train_tokenizer(vocab_size: int, n_docs: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the first n_docs calibration documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(load_documents(DEFAULT_CALIB)[:n_docs], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def shape_config(shape: str, layers: int | None = None, **overrides) -> dict:
    """config.json of a built-in shape (see quantkit.tools.estimate.BUILTIN_CONFIGS), optionally with fewer layers."""
    from quantkit.tools.estimate import BUILTIN_CONFIGS

    if shape not in BUILTIN_CONFIGS:
        raise QuantkitError(f"unknown shape {shape!r}; choose one of {', '.join(BUILTIN_CONFIGS)}")
    config = {k: v for k, v in BUILTIN_CONFIGS[shape].items() if not k.startswith("_")}
    if layers is not None:
        if layers < 1:
            raise QuantkitError(f"--layers must be at least 1, got {layers}")
        config["num_hidden_layers"] = layers
    config.update(overrides)
    return config


def write_synthetic_checkpoint(out: Path, config: dict, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                               max_shard_bytes: int = 2 * 10**9, tokenizer_vocab: int = 4096,
                               device: str = "cpu") -> int:
    """Write config.json, a tokenizer and random safetensors shards to `out`; returns the bytes of weights.

    Parameters come from the meta-device model of the config, so any architecture transformers knows works,
    and only one tensor is ever in memory. device "cuda" draws the numbers there, faster
    (other numbers than the CPU's for the same seed).
    """
    from transformers import AutoConfig

    from quantkit.source.skeleton import build_skeleton

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise QuantkitError(f"{out} already exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    dtype_name = str(dtype).removeprefix("torch.")
    hf_config = AutoConfig.for_model(**{**config, "torch_dtype": dtype_name})
    tokenizer = train_tokenizer(min(tokenizer_vocab, hf_config.vocab_size))
    hf_config.bos_token_id, hf_config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    skeleton = build_skeleton(hf_config)

    generator = torch.Generator(device).manual_seed(seed)
    writer = ShardWriter(out, max_shard_bytes)
    for name, param in skeleton.named_parameters():  # tied weights appear once
        if param.dim() == 1 and "norm" in name:
            tensor = torch.ones(param.shape, dtype=dtype)
        elif param.dim() == 1:
            tensor = torch.zeros(param.shape, dtype=dtype)
        else:
            tensor = (torch.randn(param.shape, generator=generator, device=device) * INIT_STD).to("cpu", dtype)
        writer.add({name: tensor})
        del tensor
    writer.finish()
    hf_config.use_cache = True
    hf_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "SYNTHETIC.md").write_text(
        "Random weights (normal, std 0.02; norms 1) in the shape of "
        f"{json.dumps({k: config[k] for k in sorted(config)})}.\nFor time and memory measurements only: "
        "this model generates noise.\n")
    return writer.total_bytes
