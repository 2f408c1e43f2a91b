"""import-gguf: a GGUF file -> a plain safetensors checkpoint (config, tokenizer, chat template, generation config).

The GGUF is read by formats/gguf.py (its header bounded by the file, then which GGUF tensor becomes which model
tensor, checked, before anything is read), one tensor at a time, so the peak memory is one tensor (plus the
tokenizer), not the model: each is read, dequantized by gguf itself, renamed and un-permuted as transformers' GGUF
loader does, cast, and streamed to quantkit's shard writer. The config and tokenizer come from transformers' GGUF
metadata parsing, which reads no tensor data. transformers never runs code from outside its own package here
(trust_remote_code=False), so nothing prompts either.

Only architectures whose transformers processing is one GGUF tensor in, one model tensor out are converted
(SUPPORTED, in formats/gguf.py); the others are refused with one line rather than converted differently.
"""
from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from quantkit.config import IMPORT_DTYPES
from quantkit.errors import QuantkitError
from quantkit.formats.gguf import SUPPORTED as SUPPORTED  # the architectures import-gguf converts
from quantkit.formats.gguf import GGUFPlan, check_supported, read_metadata, tensor_data
from quantkit.source.checkpoint import INDEX_NAME
from quantkit.source.gguf_header import GGUF_MAGIC, read_header
from quantkit.untrusted import (
    fsync_dir,
    fsync_file,
    not_symlink,
    refuse_destructive_output,
    remove_tree,
)
from quantkit.write.shards import ShardWriter

if TYPE_CHECKING:
    from gguf import ReaderTensor

log = logging.getLogger("quantkit")

DTYPES = {name: getattr(torch, name) for name in IMPORT_DTYPES}
# what import-gguf writes: --overwrite replaces a directory that holds these files and nothing else
OWN_FILES = frozenset({"config.json", "generation_config.json", INDEX_NAME, "tokenizer.json",
                       "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
                       "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json"})
OWN_SUFFIX = ".safetensors"


def import_gguf(gguf_file: str | Path, out_dir: str | Path, *, dtype: str = "float32", max_shard_bytes: int = 2 * 10**9,
                overwrite: bool = False) -> Path:
    """Convert `gguf_file` into `out_dir`; the directory appears only once complete, and an output it replaces
    (--overwrite) is renamed aside first and deleted only after the new one is in place."""
    src = Path(gguf_file).expanduser()
    out = Path(out_dir).expanduser()
    if not src.is_file():
        raise QuantkitError(f"GGUF file {src} not found")
    with open(src, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise QuantkitError(f"{src} is not a GGUF file (its first bytes are not 'GGUF')")
    if dtype not in DTYPES:
        raise QuantkitError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    _refuse_out(out, src, overwrite)
    header = read_header(src)
    check_supported(src, header, "import-gguf")
    tensors = tensor_data(src, header)
    config, tokenizer, parsed = read_metadata(src)
    plan = GGUFPlan(src, header, config, parsed)

    staging = out.parent / f".{out.name}.import-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir(parents=True)
    except OSError as e:
        raise QuantkitError(f"cannot create the output's staging directory {staging}: {e.strerror or e}") from None
    try:
        _write(plan, tensors, staging, max_shard_bytes, DTYPES[dtype])
        config.dtype = DTYPES[dtype]
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(config).save_pretrained(staging)
        _refuse_out(out, src, overwrite)  # again: the conversion took a while
        _swap_in(staging, out)
    finally:
        remove_tree(staging, out.parent, "staging directory")
    return out


def _refuse_out(out: Path, src: Path, overwrite: bool) -> None:
    """Refuse, before any work, an OUT that import-gguf must not write or replace: a link, a file, the GGUF's own
    directory or the current directory (or one holding either), an output that exists without --overwrite, and
    with --overwrite any non-empty directory holding something import-gguf does not write."""
    not_symlink(out, "output directory")
    refuse_destructive_output(out, src.parent, "the GGUF file's directory", str(out))
    if out.exists() and not out.is_dir():
        raise QuantkitError(f"{out} exists and is not a directory; choose a new directory for the output")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise QuantkitError(f"{out} already exists; pass --overwrite to replace it")
    for entry in sorted(out.iterdir()):
        ours = entry.name in OWN_FILES or entry.name.endswith(OWN_SUFFIX)
        if not ours or entry.is_symlink() or not entry.is_file():
            raise QuantkitError(f"{out} holds {entry.name!r}, which import-gguf does not write; --overwrite replaces "
                                "only an earlier import-gguf output, so choose a new directory")


def _write(plan: GGUFPlan, tensors: dict[str, ReaderTensor], directory: Path, max_shard_bytes: int,
           dtype: torch.dtype) -> None:
    """Each tensor of the plan (of tensor_data) read, dequantized, processed, cast and written in turn; one is held
    at a time."""
    writer = ShardWriter(directory, max_shard_bytes)
    with open(plan.src, "rb") as f:
        for name, gguf_name, shape in plan.order:
            writer.add({name: plan.read(f, tensors[gguf_name], name, shape).to(dtype)})
    writer.finish()


def _swap_in(staging: Path, out: Path) -> None:
    """staging becomes out: its files made durable, an existing out renamed aside, staging renamed in, the parent
    made durable, and only then the old out deleted. An empty out is replaced by the rename itself."""
    for f in staging.iterdir():
        fsync_file(f)
    fsync_dir(staging)
    old = None
    try:
        if out.is_dir() and any(out.iterdir()):
            old = out.with_name(f".{out.name}.replaced-{uuid.uuid4().hex[:8]}")
            out.rename(old)
        staging.rename(out)
    except OSError as e:
        if old is not None:
            old.rename(out)
        raise QuantkitError(f"cannot move the converted checkpoint into {out}: {e.strerror or e}; {out} is as it "
                            "was") from None
    fsync_dir(out.parent)
    if old is not None:
        try:
            remove_tree(old, out.parent, "replaced output")
        except OSError as e:
            log.warning("could not delete the replaced output %s: %s", old, e.strerror or e)

