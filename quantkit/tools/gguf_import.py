"""import-gguf: a GGUF file -> a plain safetensors checkpoint (config, tokenizer, chat template, generation config).

The GGUF is untrusted input: its header is walked with every length bounded by the file (gguf_header.py) before
anything else parses it. The weights are converted one tensor at a time, so the peak memory is one tensor (plus
the tokenizer), not the model: each tensor is located by the gguf package's memory-mapped GGUFReader, its bytes
read, dequantized by gguf itself, renamed and un-permuted by the same per-tensor processor and name map
transformers' GGUF loader uses (transformers.modeling_gguf_pytorch_utils), cast, and streamed to quantkit's shard
writer. The config and tokenizer come from transformers' GGUF metadata parsing, which reads no tensor data; the
model itself is only built on the meta device, for its parameter names and shapes. transformers never runs code
from outside its own package here (trust_remote_code=False), so nothing prompts either.

Only architectures whose transformers processing is one GGUF tensor in, one model tensor out are converted
(SUPPORTED); the others transformers can load (mixture-of-experts layouts that merge or split tensors, models it
loads through its newer packed path) are refused with one line rather than converted differently.
"""
from __future__ import annotations

import io
import logging
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from quantkit.config import IMPORT_DTYPES
from quantkit.errors import QuantkitError, first_line
from quantkit.source.checkpoint import INDEX_NAME
from quantkit.source.gguf_header import GGUFHeader, read_header
from quantkit.untrusted import (
    fsync_dir,
    fsync_file,
    not_symlink,
    refuse_destructive_output,
    remove_tree,
)
from quantkit.write.shards import ShardWriter

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType, ReaderTensor
    from transformers import PreTrainedConfig, PreTrainedTokenizerBase

log = logging.getLogger("quantkit")

GGUF_MAGIC = b"GGUF"
DTYPES = {name: getattr(torch, name) for name in IMPORT_DTYPES}
# GGUF `general.architecture` values converted here; tests/test_trust_gguf.py checks each against transformers' load
SUPPORTED = ("llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "starcoder2", "stablelm", "nemotron", "falcon",
             "bloom")
# what import-gguf writes: --overwrite replaces a directory that holds these files and nothing else
OWN_FILES = frozenset({"config.json", "generation_config.json", INDEX_NAME, "tokenizer.json",
                       "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
                       "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json"})
OWN_SUFFIX = ".safetensors"
DEQUANTIZE_CHUNK_BYTES = 16 << 20  # float32 output per gguf dequantize call


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
    if header.architecture not in SUPPORTED:
        raise QuantkitError(f"{src} holds a {header.architecture!r} model, which import-gguf cannot convert tensor by "
                            f"tensor (it converts {', '.join(SUPPORTED)})")
    tensors = _tensor_data(src, header)
    config, tokenizer, parsed = _metadata(src)
    plan = _Plan(src, header, config, parsed, DTYPES[dtype])

    staging = out.parent / f".{out.name}.import-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir(parents=True)
    except OSError as e:
        raise QuantkitError(f"cannot create the output's staging directory {staging}: {e.strerror or e}") from None
    try:
        plan.write(tensors, staging, max_shard_bytes)
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


def _tensor_data(src: Path, header: GGUFHeader) -> dict[str, ReaderTensor]:
    """{GGUF name: the gguf package's ReaderTensor}: where each tensor's bytes lie, and the dtype and shape gguf
    dequantizes them in. Taken before the metadata is parsed, and the reader dropped at once: its own parse of the
    metadata (the vocabulary) is the largest thing it holds, and it is not needed here."""
    from gguf import GGUFReader

    try:
        tensors = {t.name: t for t in GGUFReader(src).tensors}
    except Exception as e:  # the header was checked; this is the gguf package disagreeing with that check
        raise QuantkitError(f"the gguf package cannot read {src}: {first_line(e)}") from None
    for t in header.tensors:
        read = tensors.get(t.name)
        if read is None or (read.data_offset, read.n_bytes) != (t.start, t.nbytes):
            raise QuantkitError(f"the gguf package reads tensor {t.name!r} of {src} differently from its header")
    return tensors


def _metadata(src: Path) -> tuple[PreTrainedConfig, PreTrainedTokenizerBase, dict]:
    """(config, tokenizer, the config dict transformers' tensor processors read), all from the GGUF's metadata."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = AutoConfig.from_pretrained(str(src.parent), gguf_file=src.name, trust_remote_code=False)
            tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name, trust_remote_code=False)
            parsed = load_gguf_checkpoint(str(src), return_tensors=False)["config"]
    except Exception as e:
        raise QuantkitError(f"transformers cannot load {src}: {first_line(e)}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config, tokenizer, parsed


class _Plan:
    """Which GGUF tensor becomes which model tensor, of what shape, in the order the checkpoint lists them; every
    parameter of the model must come from exactly one GGUF tensor, which is checked before anything is read."""

    def __init__(self, src: Path, header: GGUFHeader, config: PreTrainedConfig, parsed: dict,
                 dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
        )

        self.src, self.dtype = src, dtype
        layers = getattr(config, "num_hidden_layers", None)
        if isinstance(layers, int) and layers > len(header.tensors):  # before anything is built for each layer
            raise QuantkitError(f"{src} is not a valid GGUF file: its metadata claims {layers} layers, and it holds "
                                f"{len(header.tensors)} tensors; download or convert it again")
        self.processor = TENSOR_PROCESSORS.get(header.architecture, TensorProcessor)(config=parsed)
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=dtype)
            self.names = get_gguf_hf_weights_map(model, self.processor)
        except Exception as e:
            raise QuantkitError(f"transformers cannot build the model {src} describes: {first_line(e)}") from None
        shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        if getattr(config, "tie_word_embeddings", False):
            embeddings = model.get_input_embeddings().weight
            for name, p in model.named_parameters(remove_duplicate=False):
                if name.startswith("lm_head") and p is embeddings:
                    del shapes[name]  # tied: the checkpoint holds the embeddings once
        chosen: dict[str, str] = {}
        for t in header.tensors:
            name = self.names.get(t.name)
            if name is None:
                continue  # a tensor the model has no parameter for (rope_freqs): transformers skips it too
            if name not in shapes:
                raise QuantkitError(f"{src}: tensor {t.name!r} would become {name}, which the {config.model_type} "
                                    "model does not hold apart (tied or unknown); import-gguf cannot convert it")
            if name in chosen:
                raise QuantkitError(f"{src}: tensors {chosen[name]!r} and {t.name!r} both become {name}")
            _check_shape(src, t.name, tuple(reversed(t.dims)), name, shapes[name])  # the processors keep shapes
            chosen[name] = t.name
        missing = sorted(set(shapes) - set(chosen), key=_natural_key)
        if missing:
            raise QuantkitError(f"{src} has no tensor for {missing[0]} ({len(missing)} of the model's "
                                f"{len(shapes)} tensors missing); import-gguf cannot convert it")
        self.order = [(name, chosen[name], shapes[name]) for name in sorted(chosen, key=_natural_key)]

    def write(self, tensors: dict[str, ReaderTensor], directory: Path, max_shard_bytes: int) -> None:
        """Each tensor (of _tensor_data) read, dequantized, processed, cast and written in turn; one is held at a
        time."""
        writer = ShardWriter(directory, max_shard_bytes)
        with open(self.src, "rb") as f:
            for name, gguf_name, shape in self.order:
                self._convert(f, tensors[gguf_name], name, shape, writer)
        writer.finish()

    def _convert(self, f: io.BufferedReader, t: ReaderTensor, name: str, shape: tuple[int, ...],
                 writer: ShardWriter) -> None:
        gguf_name = t.name
        data = _read(f, t, self.src)
        try:
            weights = _dequantize(data, t.tensor_type)
        except NotImplementedError:
            raise QuantkitError(f"{self.src}: tensor {gguf_name!r} is stored as {t.tensor_type.name}, which the "
                                "gguf package cannot dequantize") from None
        del data
        side: dict = {"tensors": {}}
        result = self.processor.process(weights=weights, name=gguf_name, tensor_key_mapping=self.names,
                                        parsed_parameters=side)
        if result.name != gguf_name or side["tensors"]:
            raise QuantkitError(f"{self.src}: transformers converts tensor {gguf_name!r} together with others; "
                                "import-gguf cannot convert it")
        del weights
        # torch shares the array's memory; a copy only where a processor's result is not contiguous and writable
        tensor = torch.from_numpy(np.require(result.weights, requirements=("C", "W")))
        _check_shape(self.src, gguf_name, tuple(tensor.shape), name, shape)
        writer.add({name: tensor.to(self.dtype)})


def _check_shape(src: Path, gguf_name: str, shape: tuple[int, ...], name: str, expected: tuple[int, ...]) -> None:
    if shape != expected:
        raise QuantkitError(f"{src}: tensor {gguf_name!r} has shape {list(shape)}, the model's {name} needs "
                            f"{list(expected)}; import-gguf cannot convert it")


def _read(f: io.BufferedReader, t: ReaderTensor, src: Path) -> np.ndarray:
    """The bytes of tensor `t` (a ReaderTensor), read into memory in the dtype and shape of the reader's view of
    them. Read, not taken from the mapping: pages of a mapped file stay in the process's memory once touched."""
    data = np.empty(t.data.shape, dtype=t.data.dtype)
    f.seek(t.data_offset)
    if f.readinto(data.reshape(-1).view(np.uint8).data) != data.nbytes:
        raise QuantkitError(f"{src} is truncated: tensor {t.name!r} ends past the end of the file; download or "
                            "convert it again")
    return data


def _dequantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """gguf's own dequantize, a few rows at a time into one float32 array: its intermediates (several times the
    size of what they dequantize) then stay small beside the tensor. Blocks never span rows, so the values are
    those of one call on the whole tensor."""
    from gguf.quants import dequantize

    rows = data.reshape(-1, data.shape[-1])
    first = dequantize(rows[:1], qtype)
    if rows.shape[0] == 1:
        return first.reshape(*data.shape[:-1], first.shape[-1])
    out = np.empty((rows.shape[0], first.shape[-1]), dtype=first.dtype)
    step = max(1, DEQUANTIZE_CHUNK_BYTES // out[0].nbytes)
    for start in range(0, rows.shape[0], step):
        out[start:start + step] = dequantize(rows[start:start + step], qtype)
    return out.reshape(*data.shape[:-1], out.shape[-1])


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


def _natural_key(name: str) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in name.split(".")]
