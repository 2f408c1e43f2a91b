"""`quantkit inspect`: what a (quantized) checkpoint holds, read from config.json and safetensors headers only.

Never loads a tensor: shapes and dtypes come from the headers, sizes from the file system, and the manifest
check hashes files (integrity.py). GPTQ settings only in quantize_config.json (AutoGPTQ's layout) are read from
there (checkpoint.read_config). Mixture-of-Experts checkpoints keep one tensor per expert
(`...experts.<E>.<name>`): the module tables show one row per expert Linear with the number of experts, and the
report counts the experts of each layer.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.source.checkpoint import (
    INDEX_NAME,
    QUANTIZE_CONFIG_NAME,
    read_config,
    read_index,
    resolve_model_dir,
)
from quantkit.source.safetensors_header import DTYPE_BITS, FLOAT_DTYPES, read_header
from quantkit.verification.compat import compatibility_notes, layout_limits
from quantkit.verification.integrity import (
    MANIFEST_NAME,
    MODULE_SUFFIXES,
    IntegrityReport,
    check_manifest,
)

_NOT_LINEAR = re.compile(r"(embed|wte|wpe|norm|ln_|layernorm)", re.IGNORECASE)
_EXPERT = re.compile(r"(.+\.experts)\.(\d+)\.(.+)")  # block, expert number, the rest: one expert's tensor or Linear
_LAYER = re.compile(r"\.\d+\.")
EXPERT_SLOT = "[E]"  # where a row's pattern holds the expert numbers until they are written out


@dataclass
class InspectReport:
    """What `quantkit inspect` reports; sizes in bytes."""

    path: str
    quantization_config: dict | None
    quant_method: str | None
    bits: int | None
    group_size: int | None
    sym: bool | None
    desc_act: bool | None
    checkpoint_format: str | None
    quantizer: list[str]
    settings_file: str | None          # where the quantization settings came from: config.json or quantize_config.json
    modules_in_block_to_quantize: list | None
    modules_not_converted: list | None
    quantized_modules: list[dict] = field(default_factory=list)   # name, in_features, out_features, bytes, fp16_bytes
    float_linears: list[dict] = field(default_factory=list)       # name, shape, dtype, bytes
    experts: dict[str, int] = field(default_factory=dict)         # expert block of one layer -> its expert count
    size_on_disk: int = 0
    weight_files: int = 0
    weight_file_bytes: int = 0
    tensor_bytes: int = 0
    fp16_equivalent_bytes: int = 0
    quantized_bytes: int = 0
    quantized_fp16_bytes: int = 0
    manifest: dict = field(default_factory=dict)  # status (ok/mismatch/no manifest/invalid), files_checked, problems
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def compression(self) -> float | None:
        """fp16 size of every tensor / size as stored."""
        return self.fp16_equivalent_bytes / self.tensor_bytes if self.tensor_bytes else None

    @property
    def linear_compression(self) -> float | None:
        """fp16 size of the quantized Linears (K*N*2 + bias) / their GPTQ tensors."""
        return self.quantized_fp16_bytes / self.quantized_bytes if self.quantized_bytes else None

    def to_dict(self) -> dict:
        return {**self.__dict__, "compression": self.compression, "linear_compression": self.linear_compression}


def _headers(model_dir: Path, errors: list[str]) -> dict[str, dict]:
    """name -> {dtype, shape, bytes, file} from every safetensors header (safetensors_header.read_header, which
    checks offsets, sizes and dtypes); unreadable or inconsistent files become errors."""
    weight_map = read_index(model_dir)
    files = sorted(set(weight_map.values())) if weight_map is not None else sorted(
        p.name for p in model_dir.glob("*.safetensors"))
    out: dict[str, dict] = {}
    for filename in files:
        if not (model_dir / filename).is_file():
            errors.append(f"{INDEX_NAME} names {filename}, which is missing")
            continue
        try:
            header = read_header(model_dir / filename)
        except QuantkitError as e:
            errors.append(str(e))
            continue
        for name, info in header.items():
            start, end = info["data_offsets"]
            out[name] = {"dtype": info["dtype"], "shape": list(info["shape"]), "bytes": end - start, "file": filename}
    return out


def _manifest(model_dir: Path) -> dict:
    if not (model_dir / MANIFEST_NAME).is_file():
        return {"status": "no manifest", "files_checked": 0, "problems": [], "warnings": []}
    report = IntegrityReport(path=str(model_dir))
    check_manifest(model_dir, report, None)
    status = "invalid" if not report.manifest else "mismatch" if report.errors else "ok"
    return {"status": status, "files_checked": report.files_checked, "problems": list(report.errors),
            "warnings": list(report.warnings)}


def _module_shape(method: str, bits: int | None, tensors: dict[str, dict]) -> tuple[int, int] | None:
    """(in_features K, out_features N) of a packed Linear, from its header shapes."""
    qweight = tensors.get("qweight")
    if qweight is None or len(qweight["shape"]) != 2 or not bits:
        return None
    rows, cols = qweight["shape"]
    word = DTYPE_BITS[qweight["dtype"]]  # int32, or the pack_dtype GPTQModel was told to use
    if method == "awq":          # AWQ packs along the output dim: [K, N*b/32]
        return rows, cols * word // bits
    g_idx = tensors.get("g_idx")
    k = g_idx["shape"][0] if g_idx and len(g_idx["shape"]) == 1 else rows * word // bits
    return k, cols


_BNB_PARTS = {4: (".weight", ".weight.absmax", ".weight.quant_map", ".weight.nested_absmax", ".weight.nested_quant_map",
                 ".weight.quant_state.bitsandbytes__nf4", ".weight.quant_state.bitsandbytes__fp4"),
              8: (".weight", ".SCB", ".weight_format")}


def _bnb_modules(headers: dict, bits: int, report: InspectReport, in_module: set[str]) -> None:
    """bitsandbytes Linears: 4-bit stores two values per uint8 byte, 8-bit one int8 per value, plus their scales."""
    marker = ".SCB" if bits == 8 else ".weight.absmax"
    for module in sorted(n[: -len(marker)] for n in headers if n.endswith(marker)):
        if f"{module}.weight" not in headers:
            report.errors.append(f"{module}: holds {module}{marker} but no {module}.weight")
            continue
        parts = [f"{module}{sfx}" for sfx in _BNB_PARTS[bits] if f"{module}{sfx}" in headers]
        in_module.update(parts)
        stored = sum(headers[p]["bytes"] for p in parts)
        weight = headers[f"{module}.weight"]
        values = math.prod(weight["shape"]) * (2 if bits == 4 else 1)
        shape = weight["shape"] if bits == 8 else [None, None]
        report.quantized_modules.append({"name": module, "in_features": shape[1], "out_features": shape[0],
                                         "bytes": stored, "fp16_bytes": 2 * values})
        report.quantized_bytes += stored
        report.quantized_fp16_bytes += 2 * values


def _gptq_module(module: str, headers: dict, method: str, bits: int | None, report: InspectReport,
                 in_module: set[str]) -> tuple[int, int] | None:
    """Count one packed Linear (GPTQ or AWQ) into the report; returns its (out_features, in_features) when the
    headers tell them."""
    parts = {sfx: headers[f"{module}.{sfx}"] for sfx in MODULE_SUFFIXES if f"{module}.{sfx}" in headers}
    in_module.update(f"{module}.{sfx}" for sfx in parts)
    stored = sum(t["bytes"] for t in parts.values())
    kn = _module_shape(method, bits, parts)
    entry = {"name": module, "in_features": kn[0] if kn else None, "out_features": kn[1] if kn else None,
             "bytes": stored, "fp16_bytes": None}
    report.quantized_modules.append(entry)
    if not kn:
        if bits:  # without bits, the one error about the settings says why
            report.errors.append(f"{module}: cannot tell its shape from {module}.qweight (bits {bits!r})")
        report.fp16_equivalent_bytes += stored   # counted as stored: no fp16 size to compare with
        return None
    bias = parts.get("bias")
    fp16_bytes = kn[0] * kn[1] * 2 + (math.prod(bias["shape"]) * 2 if bias else 0)
    entry["fp16_bytes"] = fp16_bytes
    report.quantized_bytes += stored
    report.quantized_fp16_bytes += fp16_bytes
    return kn[1], kn[0]


def _other_tensors(headers: dict, in_module: set[str], report: InspectReport) -> None:
    """Count every tensor's bytes, and the float Linears left unquantized, into the report."""
    for name, info in sorted(headers.items()):
        report.tensor_bytes += info["bytes"]
        if name in in_module:
            continue
        numel = math.prod(info["shape"])
        report.fp16_equivalent_bytes += 2 * numel if info["dtype"] in FLOAT_DTYPES else info["bytes"]
        if (name.endswith(".weight") and len(info["shape"]) == 2 and info["dtype"] in FLOAT_DTYPES
                and not _NOT_LINEAR.search(name)):
            report.float_linears.append({"name": name[: -len(".weight")], "shape": info["shape"],
                                         "dtype": info["dtype"], "bytes": info["bytes"]})


def inspect(model: str | Path) -> InspectReport:
    """Describe a checkpoint directory or cached repo id: quantization settings, quantized and float Linears,
    size and compression, manifest status, and compatibility notes.

    >>> report = inspect("quantkit/SmolLM2-135M-Instruct-gptq-4bit-g64")   # doctest: +SKIP
    >>> report.bits, report.group_size, report.manifest["status"]           # doctest: +SKIP
    (4, 64, 'ok')
    """
    model_dir = resolve_model_dir(str(model))
    config, settings_file = read_config(model_dir)
    raw = config.get("quantization_config") or None
    if raw is not None and not isinstance(raw, dict):
        raise QuantkitError(f"{model_dir}/config.json: quantization_config is not an object")
    qc: dict = raw or {}
    method = str(qc.get("quant_method")).lower() if qc.get("quant_method") else None
    bnb_bits = 4 if (qc.get("load_in_4bit") or qc.get("_load_in_4bit")) else 8
    bits = bnb_bits if method == "bitsandbytes" else qc.get("bits") if isinstance(qc.get("bits"), int) else None
    meta = qc.get("meta")
    quantizer = (meta.get("quantizer") if isinstance(meta, dict) else None) or []
    report = InspectReport(
        path=str(model_dir), quantization_config=qc or None, quant_method=method, bits=bits,
        group_size=qc.get("group_size"), sym=qc.get("sym"), desc_act=qc.get("desc_act"),
        checkpoint_format=qc.get("checkpoint_format", "gptq" if method == "gptq" else None),
        quantizer=[quantizer] if isinstance(quantizer, str) else quantizer if isinstance(quantizer, list) else [],
        settings_file=settings_file, modules_in_block_to_quantize=qc.get("modules_in_block_to_quantize"),
        modules_not_converted=qc.get("modules_to_not_convert"))

    files = [p for p in model_dir.rglob("*") if p.is_file()]
    report.size_on_disk = sum(p.stat().st_size for p in files)   # stat follows hub-cache symlinks to the blobs
    weight_sizes = [p.stat().st_size for p in files if p.suffix == ".safetensors"]
    report.weight_files, report.weight_file_bytes = len(weight_sizes), sum(weight_sizes)

    if not isinstance(config.get("model_type"), str):
        report.errors.append(f"{model_dir / 'config.json'} names no model_type: it is not a model's config")
    headers = _headers(model_dir, report.errors)
    modules = sorted(n[: -len(".qweight")] for n in headers if n.endswith(".qweight"))
    if modules and method == "gptq" and bits is None:
        where = "config.json quantization_config" if settings_file != QUANTIZE_CONFIG_NAME else QUANTIZE_CONFIG_NAME
        report.errors.append(f"{where}: bits = {qc.get('bits')!r}: expected an integer")
    report.experts = {block: len(numbers) for block, numbers in experts_by_block(headers).items()}
    in_module: set[str] = set()
    shapes: dict[str, tuple[int, int]] = {}
    if method == "bitsandbytes":
        _bnb_modules(headers, bnb_bits, report, in_module)
    for module in modules:
        shape = _gptq_module(module, headers, method or "gptq", bits, report, in_module)
        if shape is not None:
            shapes[module] = shape
    _other_tensors(headers, in_module, report)
    report.fp16_equivalent_bytes += report.quantized_fp16_bytes
    report.manifest = _manifest(model_dir)
    if qc:
        read_files = sorted({info["file"] for info in headers.values()})
        layout = layout_limits(settings_file == QUANTIZE_CONFIG_NAME, read_files, (model_dir / INDEX_NAME).is_file())
        report.notes = [limit.note for limit in layout] + compatibility_notes(qc, shapes or None)
    elif modules:
        report.errors.append(f"config.json has no quantization_config, but the checkpoint holds {modules[0]}.qweight")
    return report


def experts_by_block(names: Iterable[str]) -> dict[str, set[int]]:
    """Expert block of one layer (e.g. model.layers.3.mlp.experts) -> the numbers of its experts, from the names
    of their tensors or Linears."""
    found: dict[str, set[int]] = {}
    for name in names:
        match = _EXPERT.fullmatch(name)
        if match:
            found.setdefault(match[1], set()).add(int(match[2]))
    return found


def _pattern(name: str) -> str:
    """A module's row: its name with layer numbers as `*`, and an expert's number as EXPERT_SLOT."""
    match = _EXPERT.fullmatch(name)
    if match:
        return f"{_LAYER.sub('.*.', match[1] + '.')}{EXPERT_SLOT}.{match[3]}"
    return _LAYER.sub(".*.", name)


def _numbers(values: set[int]) -> str:
    """Sorted numbers with runs as ranges: {0, 1, 2, 5} -> 0-2,5."""
    runs: list[list[int]] = []
    for v in sorted(values):
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _row_label(pattern: str, items: list[dict]) -> tuple[str, str]:
    """The row's pattern as shown, and for an expert row how many experts each layer holds (`x64`; else "")."""
    if EXPERT_SLOT not in pattern:
        return pattern, ""
    per_block = experts_by_block(item["name"] for item in items)
    numbers = _numbers(set().union(*per_block.values()))
    return pattern.replace(EXPERT_SLOT, f"[{numbers}]"), "x" + _span([len(n) for n in per_block.values()])


def _span(counts: list[int]) -> str:
    return str(counts[0]) if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"


def _by_pattern(modules: list[dict]) -> dict[str, list[dict]]:
    """Modules grouped by name, layer numbers as `*` and experts in one row (their count aligned after it)."""
    groups: dict[str, list[dict]] = {}
    for m in modules:
        groups.setdefault(_pattern(m["name"]), []).append(m)
    labels = {pattern: _row_label(pattern, items) for pattern, items in groups.items()}
    width = max((len(shown) for shown, each in labels.values() if each), default=0)
    return {f"{shown:<{width}}  {each}" if each else shown: groups[p] for p, (shown, each) in labels.items()}


def _experts_line(experts: dict[str, int]) -> str:
    """How many experts each layer holds, per expert block: `4 per layer in 2 layers (model.layers.*.mlp.experts)`."""
    by_pattern: dict[str, list[int]] = {}
    for block, count in experts.items():
        by_pattern.setdefault(_LAYER.sub(".*.", block + ".")[:-1], []).append(count)
    return "; ".join(f"{_span(counts)} per layer in {len(counts)} layer{'s' if len(counts) != 1 else ''} ({pattern})"
                     for pattern, counts in sorted(by_pattern.items()))


def human_size(n: int | None) -> str:
    """Bytes with a binary unit: 512 B, 41.0 KiB, 1.23 MiB, 2.10 GiB."""
    if n is None:
        return "?"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}" if unit != "KiB" else f"{n / div:.1f} {unit}"
    return f"{n} B"


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return ["  " + "  ".join(cell.rjust(w) if c in right else cell.ljust(w)
                             for c, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]


def format_inspect(r: InspectReport) -> str:
    """The human-readable report of `quantkit inspect`: key facts, then one row per module pattern."""
    if r.quant_method == "bitsandbytes":
        qc = r.quantization_config or {}
        desc = f"bitsandbytes {qc.get('bnb_4bit_quant_type', 'nf4') if r.bits == 4 else 'LLM.int8'} ({r.bits}-bit)"
    elif r.quant_method:
        group = "per row" if r.group_size == -1 else f"group {r.group_size}"
        desc = f"{r.quant_method} {r.bits}-bit, {group}, {'sym' if r.sym else 'asym'}"
        desc += f", desc_act {'on' if r.desc_act else 'off'}"
        if r.checkpoint_format:
            desc += f", checkpoint_format {r.checkpoint_format}"
        if r.quantizer:
            desc += f"  (by {', '.join(map(str, r.quantizer))})"
        if r.settings_file == QUANTIZE_CONFIG_NAME:
            desc += f"  (settings from {QUANTIZE_CONFIG_NAME})"
    else:
        desc = "none (no quantization_config in config.json)"
    lines = [f"path          {r.path}", f"quantization  {desc}"]
    if r.experts:
        lines.append(f"experts       {_experts_line(r.experts)}")
    if r.modules_in_block_to_quantize:
        lines.append(f"quantized in each block: {json.dumps(r.modules_in_block_to_quantize)}")
    if r.modules_not_converted:
        listed = r.modules_not_converted
        named = ", ".join(map(str, listed)) if isinstance(listed, list) else json.dumps(listed)
        lines.append(f"not converted: {named}")
    lines.append(f"size on disk  {human_size(r.size_on_disk)}  ({human_size(r.weight_file_bytes)} in {r.weight_files} "
                 f"safetensors file{'s' if r.weight_files != 1 else ''})")
    if r.linear_compression:
        lines.append(f"compression   quantized Linears {r.linear_compression:.2f}x smaller than fp16 "
                     f"({human_size(r.quantized_bytes)} vs {human_size(r.quantized_fp16_bytes)}); whole checkpoint "
                     f"{r.compression:.2f}x ({human_size(r.tensor_bytes)} vs {human_size(r.fp16_equivalent_bytes)})")
    m = r.manifest
    if m["status"] == "ok":
        manifest = f"ok: {m['files_checked']} files match quantkit.json (sha256 and size)"
    elif m["status"] == "no manifest":
        manifest = "no manifest (no quantkit.json: file hashes not checked)"
    else:
        manifest = f"{m['status'].upper()}: {len(m['problems'])} problem{'s' if len(m['problems']) != 1 else ''}"
    lines.append(f"manifest      {manifest}")
    lines += [f"  - {p}" for p in m["problems"][:10]]
    lines += [f"  ({w})" for w in m.get("warnings", [])]

    groups = _by_pattern(r.quantized_modules)
    if groups:
        rows = [["quantized modules", "count", "in x out", "size", "as fp16"]]
        for pattern, items in groups.items():
            dims = sorted({f"{q['in_features']} x {q['out_features']}" if q["in_features"] else "packed flat"
                           for q in items})  # bitsandbytes 4-bit keeps the shape only inside its quant_state
            rows.append([pattern, str(len(items)), dims[0] if len(dims) == 1 else "mixed",
                         human_size(sum(q["bytes"] for q in items)),
                         human_size(sum(q["fp16_bytes"] or 0 for q in items))])
        rows.append(["total", str(len(r.quantized_modules)), "", human_size(r.quantized_bytes),
                     human_size(r.quantized_fp16_bytes)])
        lines += [""] + _table(rows, right={1, 3, 4})
    floats = _by_pattern(r.float_linears)
    if floats:
        rows = [["left in float", "count", "in x out", "dtype", "size"]]
        for pattern, items in floats.items():
            out_f, in_f = items[0]["shape"]
            rows.append([pattern, str(len(items)), f"{in_f} x {out_f}", items[0]["dtype"],
                         human_size(sum(f["bytes"] for f in items))])
        lines += [""] + _table(rows, right={1, 4})
    if r.notes or r.errors:
        lines.append("")
    lines += [f"error: {e}" for e in r.errors]
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)
