"""A GGUF file read as the tensors of a Hugging Face model, one tensor at a time, under the model's own names.

The GGUF is untrusted input: its header is walked with every length bounded by the file (source/gguf_header.py)
before anything else parses it. Each tensor is located by the gguf package's memory-mapped GGUFReader, its bytes
read, dequantized by gguf itself a few rows at a time, renamed and un-permuted by the same per-tensor processor and
name map transformers' GGUF loader uses (transformers.modeling_gguf_pytorch_utils), and checked against the shape
the model needs. The config and tokenizer come from transformers' GGUF metadata parsing, which reads no tensor
data; the model is only built on the meta device, for its parameter names and shapes. transformers never runs code
from outside its own package here (trust_remote_code=False).

`GGUFPlan` is which GGUF tensor becomes which model tensor, checked before anything is read (import-gguf writes
it out; `GGUFSource` presents it to verify). Only architectures whose transformers processing is one GGUF tensor
in, one model tensor out are read (SUPPORTED); the others transformers can load (mixture-of-experts layouts that
merge or split tensors, models it loads through its newer packed path) are refused with one line.
"""
from __future__ import annotations

import io
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from quantkit.errors import QuantkitError, first_line
from quantkit.source.gguf_header import GGUFHeader, read_header

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType, ReaderTensor
    from transformers import PreTrainedConfig, PreTrainedTokenizerBase

# GGUF `general.architecture` values read here; tests/test_trust_gguf.py checks each against transformers' load
SUPPORTED = ("llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "starcoder2", "stablelm", "nemotron", "falcon",
             "bloom")
DEQUANTIZE_CHUNK_BYTES = 16 << 20  # float32 output per gguf dequantize call
UNQUANTIZED_TYPES = frozenset({"F32", "F16", "BF16", "F64"})  # ggml types that hold plain floats
# a base's model_type -> the model_type transformers reads from the GGUF llama.cpp writes for it (same tensors)
WRITTEN_AS = {"mistral": "llama"}
# config sizes a GGUF must share with the base it is compared against (the un-permutation depends on the heads)
MATCHED_SIZES = ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads", "num_key_value_heads")
IMPORT_REFUSAL = "import-gguf cannot convert it"
READ_REFUSAL = "quantkit cannot read it as this model"

Entry = tuple[str, str, tuple[int, ...]]  # (model tensor name, GGUF tensor name, shape)


def tensor_data(src: Path, header: GGUFHeader) -> dict[str, ReaderTensor]:
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


def read_metadata(src: Path) -> tuple[PreTrainedConfig, PreTrainedTokenizerBase, dict]:
    """(config, tokenizer, the config dict transformers' tensor processors read), all from the GGUF's metadata."""
    config, tokenizer, parsed = _parse_metadata(src, with_tokenizer=True)
    assert tokenizer is not None
    return config, tokenizer, parsed


def read_gguf_config(src: Path) -> tuple[PreTrainedConfig, dict]:
    """read_metadata without the tokenizer: (config, the config dict transformers' tensor processors read)."""
    config, _, parsed = _parse_metadata(src, with_tokenizer=False)
    return config, parsed


def _parse_metadata(src: Path, with_tokenizer: bool) -> tuple[PreTrainedConfig, PreTrainedTokenizerBase | None,
                                                              dict]:
    from transformers import AutoConfig, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    tokenizer = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = AutoConfig.from_pretrained(str(src.parent), gguf_file=src.name, trust_remote_code=False)
            if with_tokenizer:
                tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name,
                                                          trust_remote_code=False)
            parsed = load_gguf_checkpoint(str(src), return_tensors=False)["config"]
    except Exception as e:
        raise QuantkitError(f"transformers cannot load {src}: {first_line(e)}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config, tokenizer, parsed


def check_supported(src: Path, header: GGUFHeader, reader: str) -> None:
    """Refuse an architecture transformers does not convert one tensor in, one tensor out."""
    if header.architecture not in SUPPORTED:
        raise QuantkitError(f"{src} holds a {header.architecture!r} model, which {reader} cannot convert tensor by "
                            f"tensor (it converts {', '.join(SUPPORTED)})")


def check_matches(src: Path, own: PreTrainedConfig, base: PreTrainedConfig) -> None:
    """The GGUF's own config (`own`) describes the base's architecture at the base's sizes."""
    base_type = base.model_type
    if own.model_type not in (base_type, WRITTEN_AS.get(base_type)):
        raise QuantkitError(f"{src} holds a {own.model_type!r} model, the base is a {base_type!r} model; compare it "
                            "with the model it was converted from")
    for key in MATCHED_SIZES:
        value, wanted = getattr(own, key, None), getattr(base, key, None)
        if value is None and wanted is None:
            continue  # a size this architecture does not have (bloom's key/value heads)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise QuantkitError(f"{src}: its metadata gives {key} = {value!r}, not a positive integer")
        if value != wanted:
            raise QuantkitError(f"{src} does not match the base: its {key} is {value}, the base's is {wanted}; "
                                "compare it with the model it was converted from")


class GGUFPlan:
    """Which GGUF tensor becomes which model tensor, of what shape, in the order a checkpoint lists them; every
    parameter of the model must come from exactly one GGUF tensor (an untied output head may share the
    embeddings' when the GGUF ties them), which is checked before anything is read. `refusal` ends the messages
    of a GGUF the reader cannot convert."""

    def __init__(self, src: Path, header: GGUFHeader, config: PreTrainedConfig, parsed: dict,
                 refusal: str = IMPORT_REFUSAL) -> None:
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        self.src, self.refusal = src, refusal
        layers = getattr(config, "num_hidden_layers", None)
        if isinstance(layers, int) and layers > len(header.tensors):  # before anything is built for each layer
            raise QuantkitError(f"{src} is not a valid GGUF file: its metadata claims {layers} layers, and it holds "
                                f"{len(header.tensors)} tensors; download or convert it again")
        self.processor = TENSOR_PROCESSORS.get(header.architecture, TensorProcessor)(config=parsed)
        self.names, shapes, head, embeddings = self._model(header, config)
        chosen: dict[str, str] = {}
        for t in header.tensors:
            name = self.names.get(t.name)
            if name is None:
                continue  # a tensor the model has no parameter for (rope_freqs): transformers skips it too
            if name not in shapes:
                raise QuantkitError(f"{src}: tensor {t.name!r} would become {name}, which the {config.model_type} "
                                    f"model does not hold apart (tied or unknown); {refusal}")
            if name in chosen:
                raise QuantkitError(f"{src}: tensors {chosen[name]!r} and {t.name!r} both become {name}")
            check_shape(src, t.name, tuple(reversed(t.dims)), name, shapes[name], refusal)  # processors keep shapes
            chosen[name] = t.name
        if head in shapes and head not in chosen and embeddings in chosen and shapes[head] == shapes[embeddings]:
            chosen[head] = chosen[embeddings]  # a GGUF that ties the head, read as a model that does not
        missing = sorted(set(shapes) - set(chosen), key=natural_key)
        if missing:
            raise QuantkitError(f"{src} has no tensor for {missing[0]} ({len(missing)} of the model's "
                                f"{len(shapes)} tensors missing); {refusal}")
        self.order: list[Entry] = [(name, chosen[name], shapes[name]) for name in sorted(chosen, key=natural_key)]

    def _model(self, header: GGUFHeader, config: PreTrainedConfig) -> tuple[dict[str, str], dict[str, tuple[int, ...]],
                                                                            str, str]:
        """({GGUF name: model name}, the meta model's tensor shapes as its checkpoint holds them (a tied head left
        out), the name of its output head, the name of its embeddings)."""
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
            # the GGUF's architecture names its tensors (a Mistral base's GGUF is a llama one)
            names = get_gguf_hf_weights_map(model, self.processor, model_type=header.architecture)
        except Exception as e:
            raise QuantkitError(f"transformers cannot build the model {self.src} describes: {first_line(e)}") from None
        shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        params = list(model.named_parameters(remove_duplicate=False))
        embeddings = model.get_input_embeddings().weight
        output = model.get_output_embeddings()
        head_weight = getattr(output, "weight", None)
        embeddings_name = next((n for n, p in params if p is embeddings), "")
        head_name = next((n for n, p in params if p is head_weight and n != embeddings_name), "")
        if head_name and head_weight is embeddings:
            del shapes[head_name]  # tied: the checkpoint holds the embeddings once
        return names, shapes, head_name, embeddings_name

    def read(self, f: io.BufferedReader, t: ReaderTensor, name: str, shape: tuple[int, ...]) -> Tensor:
        """Tensor `t` (of tensor_data) as model tensor `name`: read, dequantized, processed, shape checked;
        float32."""
        gguf_name = t.name
        data = read_bytes(f, t, self.src)
        try:
            weights = dequantize(data, t.tensor_type)
        except NotImplementedError:
            raise QuantkitError(f"{self.src}: tensor {gguf_name!r} is stored as {t.tensor_type.name}, which the "
                                "gguf package cannot dequantize") from None
        del data
        side: dict = {"tensors": {}}
        try:
            result = self.processor.process(weights=weights, name=gguf_name, tensor_key_mapping=self.names,
                                            parsed_parameters=side)
        except (ValueError, ZeroDivisionError) as e:  # a reshape by head counts the metadata got wrong
            raise QuantkitError(f"{self.src}: transformers cannot process tensor {gguf_name!r}: {first_line(e)}; "
                                f"{self.refusal}") from None
        if result.name != gguf_name or side["tensors"]:
            raise QuantkitError(f"{self.src}: transformers converts tensor {gguf_name!r} together with others; "
                                f"{self.refusal}")
        del weights
        # torch shares the array's memory; a copy only where a processor's result is not contiguous and writable
        tensor = torch.from_numpy(np.require(result.weights, requirements=("C", "W")))
        check_shape(self.src, gguf_name, tuple(tensor.shape), name, shape, self.refusal)
        return tensor


def check_shape(src: Path, gguf_name: str, shape: tuple[int, ...], name: str, expected: tuple[int, ...],
                refusal: str) -> None:
    if shape != expected:
        raise QuantkitError(f"{src}: tensor {gguf_name!r} has shape {list(shape)}, the model's {name} needs "
                            f"{list(expected)}; {refusal}")


def read_bytes(f: io.BufferedReader, t: ReaderTensor, src: Path) -> np.ndarray:
    """The bytes of tensor `t` (a ReaderTensor), read into memory in the dtype and shape of the reader's view of
    them. Read, not taken from the mapping: pages of a mapped file stay in the process's memory once touched."""
    data = np.empty(t.data.shape, dtype=t.data.dtype)
    f.seek(t.data_offset)
    if f.readinto(data.reshape(-1).view(np.uint8).data) != data.nbytes:
        raise QuantkitError(f"{src} is truncated: tensor {t.name!r} ends past the end of the file; download or "
                            "convert it again")
    return data


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """gguf's own dequantize, a few rows at a time into one float32 array: its intermediates (several times the
    size of what they dequantize) then stay small beside the tensor. Blocks never span rows, so the values are
    those of one call on the whole tensor."""
    from gguf.quants import dequantize as gguf_dequantize

    rows = data.reshape(-1, data.shape[-1])
    first = gguf_dequantize(rows[:1], qtype)
    if rows.shape[0] == 1:
        return first.reshape(*data.shape[:-1], first.shape[-1])
    out = np.empty((rows.shape[0], first.shape[-1]), dtype=first.dtype)
    step = max(1, DEQUANTIZE_CHUNK_BYTES // out[0].nbytes)
    for start in range(0, rows.shape[0], step):
        out[start:start + step] = gguf_dequantize(rows[start:start + step], qtype)
    return out.reshape(*data.shape[:-1], out.shape[-1])


def natural_key(name: str) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


class GGUFSource:
    """A GGUF file as a `TensorReader` (source/checkpoint.py): the model's tensors by their Hugging Face names, each
    dequantized to float32 when it is read; one tensor in memory at a time.

    architecture: the file's general.architecture; tensor_types: {ggml type: how many of the file's tensors are
    stored in it}; config: the model the GGUF's own metadata describes."""

    def __init__(self, path: Path, header: GGUFHeader, tensors: dict[str, ReaderTensor], plan: GGUFPlan,
                 config: PreTrainedConfig) -> None:
        self.path, self.architecture, self.config = path, header.architecture, config
        self.tensor_types = dict(Counter(t.ggml_type.name for t in header.tensors))
        self._types = {t.name: t.ggml_type.name for t in header.tensors}
        self._tensors, self._plan = tensors, plan
        self._entries = {name: (gguf_name, shape) for name, gguf_name, shape in plan.order}
        self._file: io.BufferedReader | None = None

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return list(self._entries)

    def _entry(self, name: str) -> tuple[str, tuple[int, ...]]:
        if name not in self._entries:
            raise QuantkitError(f"tensor {name} is not in {self.path} (the model it is read as has no such tensor)")
        return self._entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def ggml_type(self, name: str) -> str:
        """The ggml type model tensor `name` is stored in ("Q4_K", "F32", ...)."""
        return self._types[self._entry(name)[0]]

    def is_quantized(self, name: str) -> bool:
        """Whether model tensor `name` is stored in a quantized ggml type."""
        return self.ggml_type(name) not in UNQUANTIZED_TYPES

    def get(self, name: str) -> Tensor:
        gguf_name, shape = self._entry(name)
        if self._file is None:
            try:
                self._file = open(self.path, "rb")  # held across reads, closed by close()
            except OSError as e:
                raise QuantkitError(f"cannot read GGUF file {self.path}: {e.strerror or e}") from None
        tensor = self._plan.read(self._file, self._tensors[gguf_name], name, shape)
        if not torch.isfinite(tensor).all():
            raise QuantkitError(f"{self.path}: tensor {gguf_name!r} ({name}) dequantizes to NaN or Inf values")
        return tensor

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def open_gguf(path: Path, config: PreTrainedConfig | None = None) -> GGUFSource:
    """The GGUF file `path` read as the model `config` describes (a base it is compared against: the GGUF must be
    that architecture at the same sizes), or with config None as the model its own metadata describes."""
    src = Path(path).expanduser()
    header = read_header(src)
    check_supported(src, header, "quantkit")
    tensors = tensor_data(src, header)
    own, parsed = read_gguf_config(src)
    if config is not None:
        check_matches(src, own, config)
    plan = GGUFPlan(src, header, own if config is None else config, parsed, READ_REFUSAL)
    return GGUFSource(src, header, tensors, plan, own)
