"""`quantkit inspect FILE.gguf`: what a GGUF file holds, from its header and metadata, without reading a tensor.

The header is walked first by source/gguf_header.py (every length bounded by the file, the tensor table checked),
and only then parsed by the gguf package's GGUFReader for the metadata values: the architecture's sizes, the file
type, the tokenizer. Every value read is checked for its type before it is shown; one of the wrong type is an
error of the report, never a crash; the text report shows strings with their unprintable characters escaped.
Sizes come from the tensor table: bytes and elements per ggml type, and the bits per weight of the whole file's
tensor data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantkit.errors import QuantkitError, first_line
from quantkit.source.gguf_header import GGUF_MAGIC, GGUF_SUFFIX, read_header

if TYPE_CHECKING:
    from gguf import GGUFReader

QUANT_METHOD = "gguf"  # the report's quant_method, as verify names the format
# the report's hparams -> the metadata key that holds each ({arch} is general.architecture)
HPARAM_KEYS = {"layers": "{arch}.block_count", "hidden": "{arch}.embedding_length",
               "heads": "{arch}.attention.head_count", "kv_heads": "{arch}.attention.head_count_kv",
               "context": "{arch}.context_length", "vocab": "{arch}.vocab_size"}
FILE_TYPE_KEY = "general.file_type"
NAME_KEY = "general.name"
TOKENIZER_MODEL_KEY = "tokenizer.ggml.model"
TOKENIZER_PRE_KEY = "tokenizer.ggml.pre"
TOKENS_KEY = "tokenizer.ggml.tokens"
CHAT_TEMPLATE_KEY = "tokenizer.chat_template"
INTEGER_TYPES = frozenset({"UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64"})


@dataclass
class GGUFInspectReport:
    """What `quantkit inspect` reports for a GGUF file; sizes in bytes."""

    path: str
    architecture: str
    name: str | None = None
    file_type: str | None = None            # general.file_type as llama.cpp names it (MOSTLY_Q4_0, ...)
    hparams: dict[str, int | None] = field(default_factory=dict)  # layers, hidden, heads, kv_heads, context, vocab
    tensor_types: dict[str, dict[str, int]] = field(default_factory=dict)  # ggml type -> tensors, bytes, elements
    tensors: int = 0
    tensor_bytes: int = 0
    elements: int = 0
    size_on_disk: int = 0
    tokenizer_model: str | None = None
    tokenizer_pre: str | None = None
    chat_template: bool = False
    quant_method: str = QUANT_METHOD
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def bits_per_weight(self) -> float | None:
        """Bits of tensor data per element, over every tensor of the file."""
        return 8 * self.tensor_bytes / self.elements if self.elements else None

    def to_dict(self) -> dict:
        return {**self.__dict__, "bits_per_weight": self.bits_per_weight}


def is_gguf_file(path: Path) -> bool:
    """Whether `path` is a file to inspect as GGUF: named .gguf, or starting with GGUF's magic bytes."""
    if not path.is_file():
        return False
    if path.suffix == GGUF_SUFFIX:
        return True
    try:
        with open(path, "rb") as f:
            return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False


def inspect_gguf(path: str | Path) -> GGUFInspectReport:
    """Describe the GGUF file `path`: architecture, sizes, file type, tensor types and bytes, tokenizer.

    >>> r = inspect_gguf("SmolLM2-135M-Instruct.Q4_K_M.gguf")   # doctest: +SKIP
    >>> r.architecture, r.hparams["layers"], r.file_type         # doctest: +SKIP
    ('llama', 30, 'MOSTLY_Q4_K_M')
    """
    src = Path(path).expanduser()
    header = read_header(src)  # refuses, in one line, anything that does not lie inside the file
    report = GGUFInspectReport(path=str(src), architecture=header.architecture, size_on_disk=src.stat().st_size)
    for t in header.tensors:
        entry = report.tensor_types.setdefault(t.ggml_type.name, {"tensors": 0, "bytes": 0, "elements": 0})
        entry["tensors"] += 1
        entry["bytes"] += t.nbytes
        entry["elements"] += math.prod(t.dims)
    report.tensors = len(header.tensors)
    report.tensor_bytes = sum(e["bytes"] for e in report.tensor_types.values())
    report.elements = sum(e["elements"] for e in report.tensor_types.values())
    _metadata(_reader(src), report)
    return report


def _reader(src: Path) -> GGUFReader:
    from gguf import GGUFReader

    try:
        return GGUFReader(src)
    except Exception as e:  # the header was checked; this is the gguf package disagreeing with that check
        raise QuantkitError(f"the gguf package cannot read {src}: {first_line(e)}") from None


def _metadata(reader: GGUFReader, report: GGUFInspectReport) -> None:
    """The report's metadata values, each checked for its type (a wrong one becomes an error of the report)."""
    fields = reader.fields
    for hparam, pattern in HPARAM_KEYS.items():
        report.hparams[hparam] = _integer(fields, pattern.format(arch=report.architecture), report)
    tokens = fields.get(TOKENS_KEY)
    if report.hparams["vocab"] is None and tokens is not None and _type_names(tokens)[:1] == ["ARRAY"]:
        report.hparams["vocab"] = len(tokens.data)  # llama.cpp's vocabulary size when the key is absent
    file_type = _integer(fields, FILE_TYPE_KEY, report)
    if file_type is not None:
        from gguf import LlamaFileType

        try:
            report.file_type = LlamaFileType(file_type).name
        except ValueError:
            report.errors.append(f"metadata {FILE_TYPE_KEY} = {file_type}: not a llama.cpp file type")
    report.name = _string(fields, NAME_KEY, report)
    report.tokenizer_model = _string(fields, TOKENIZER_MODEL_KEY, report)
    report.tokenizer_pre = _string(fields, TOKENIZER_PRE_KEY, report)
    report.chat_template = bool(_string(fields, CHAT_TEMPLATE_KEY, report))
    if report.tokenizer_model is None:
        report.notes.append(f"no {TOKENIZER_MODEL_KEY}: llama.cpp cannot load this file without a tokenizer")


def _type_names(f: Any) -> list[str]:
    return [t.name for t in f.types]


def _integer(fields: dict, key: str, report: GGUFInspectReport) -> int | None:
    """The non-negative integer metadata value at `key`; None (and an error) when it is of another type."""
    f = fields.get(key)
    if f is None:
        return None
    value = f.contents() if _type_names(f) and _type_names(f)[0] in INTEGER_TYPES else None
    if not isinstance(value, int) or value < 0:
        report.errors.append(f"metadata {key} ({'/'.join(_type_names(f)) or 'no type'}): expected a non-negative "
                             "integer")
        return None
    return value


def _string(fields: dict, key: str, report: GGUFInspectReport) -> str | None:
    """The string metadata value at `key`; None (and an error) when it is of another type."""
    f = fields.get(key)
    if f is None:
        return None
    if _type_names(f) != ["STRING"]:
        report.errors.append(f"metadata {key} ({'/'.join(_type_names(f)) or 'no type'}): expected a string")
        return None
    try:
        return str(f.contents())
    except UnicodeDecodeError:
        report.errors.append(f"metadata {key}: not UTF-8")
        return None


def format_inspect_gguf(r: GGUFInspectReport) -> str:
    """The human-readable report of `quantkit inspect` for a GGUF file: key facts, then one row per ggml type."""
    from quantkit.tools.inspect import human_size

    h = r.hparams
    bpw = f"{r.bits_per_weight:.2f} bits per weight" if r.bits_per_weight is not None else "no tensors"
    kv = f" ({h['kv_heads']} kv)" if h.get("kv_heads") not in (None, h.get("heads")) else ""
    sizes = (f"{_value(h.get('layers'))} layers, hidden {_value(h.get('hidden'))}, {_value(h.get('heads'))} "
             f"heads{kv}, context {_value(h.get('context'))}, vocab {_value(h.get('vocab'))}")
    tokenizer = shown(r.tokenizer_model) if r.tokenizer_model else "none"
    if r.tokenizer_pre:
        tokenizer += f" (pre {shown(r.tokenizer_pre)})"
    tokenizer += f", chat template {'yes' if r.chat_template else 'no'}"
    lines = [f"path          {shown(r.path)}",
             f"quantization  gguf {r.file_type or 'file type not stated'}, {bpw}",
             f"model         {shown(r.architecture)}{f' ({shown(r.name)})' if r.name else ''}: {sizes}",
             f"tokenizer     {tokenizer}",
             f"size on disk  {human_size(r.size_on_disk)}  ({human_size(r.tensor_bytes)} of tensor data in "
             f"{r.tensors} tensor{'s' if r.tensors != 1 else ''})"]
    if r.tensor_types:
        rows = [["ggml type", "tensors", "elements", "size", "bits/weight"]]
        ordered = sorted(r.tensor_types.items(), key=lambda kv: -kv[1]["bytes"])
        for name, e in ordered:
            rows.append([name, str(e["tensors"]), str(e["elements"]), human_size(e["bytes"]),
                         f"{8 * e['bytes'] / e['elements']:.2f}" if e["elements"] else "-"])
        rows.append(["total", str(r.tensors), str(r.elements), human_size(r.tensor_bytes),
                     f"{r.bits_per_weight:.2f}" if r.bits_per_weight is not None else "-"])
        widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
        lines.append("")
        lines += ["  " + "  ".join(cell.ljust(w) if c == 0 else cell.rjust(w)
                                   for c, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
    if r.notes or r.errors:
        lines.append("")
    lines += [f"error: {e}" for e in r.errors]
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


def shown(text: str) -> str:
    """A string from the file's metadata as the text report shows it: characters that are not printable (control
    characters such as ESC and newline, invisible format characters) as Python escapes, so a name cannot move the
    cursor, clear the terminal or start a line of its own."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _value(v: int | None) -> str:
    return "?" if v is None else str(v)
