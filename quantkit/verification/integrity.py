"""Is a checkpoint intact and self-consistent? Manifest hashes, safetensors headers, GPTQ config vs tensors.

Reads only headers, hashes and the small per-module tensors (g_idx, scales); never builds a model. Every
problem names the file or tensor it concerns. Errors mean the checkpoint must not be trusted; warnings are
facts a user should know (e.g. a file the manifest does not list); notes are known loader limits and what could
not be checked (`Unchecked`: a checkpoint another tool wrote has no quantkit.json to check against).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from quantkit.errors import QuantkitError, first_line
from quantkit.formats.registry import GGUF, QUANT_METHODS
from quantkit.source.checkpoint import (
    CONFIG_NAME,
    INDEX_NAME,
    QUANTIZE_CONFIG_NAME,
    SafetensorsCheckpoint,
    check_config_fits,
    read_config,
    read_quantize_config,
)
from quantkit.source.safetensors_header import FLOAT_DTYPES, IntegrityError, read_header
from quantkit.untrusted import field as json_field
from quantkit.untrusted import file_record, read_json, relative_name, sha256_file
from quantkit.verification.compat import layout_limits, loader_limits
from quantkit.verification.format_checks import check_gguf, check_view
from quantkit.verification.integrity_report import MAX_LISTED, UNCHECKED_WORDS, IntegrityReport, Unchecked
from quantkit.write.gptq_format import QUANT_SUFFIXES
from quantkit.write.manifest import MANIFEST_NAME
from quantkit.write.packing import SUPPORTED_BITS

# quant_methods checked through their format's view (formats/); GPTQ has checks of its own here
VIEW_METHODS = {method: fmt for method, fmt in QUANT_METHODS.items() if method != "gptq"}
MODULE_SUFFIXES = (*QUANT_SUFFIXES, "bias")  # the tensors of one quantized Linear
Progress = Callable[[str, int, int], None]
SAME_IN_BOTH_FILES = ("bits", "group_size", "desc_act", "sym", "checkpoint_format")  # config.json vs quantize_config
PACK_DTYPE = "int32"  # the one word GPTQ packs codes into that quantkit reads (GPTQModel's pack_dtype may differ)
OVERRIDES = ("bits", "group_size", "sym", "desc_act")  # settings a GPTQModel `dynamic` rule may change per module


def read_headers(checkpoint: SafetensorsCheckpoint) -> dict[str, dict]:
    """name -> {"dtype", "shape", "file"} for every tensor of a (sharded) checkpoint, from the headers it has
    read and checked (each file's once)."""
    out: dict[str, dict] = {}
    weight_map = checkpoint.weight_map
    for filename in sorted(set(weight_map.values())):
        for name, info in checkpoint.header(filename).items():
            out[name] = {"dtype": info["dtype"], "shape": list(info["shape"]), "file": filename}
    missing = [n for n, f in weight_map.items() if n not in out]
    if missing:
        raise IntegrityError(f"{weight_map[missing[0]]}: the index lists tensor {missing[0]}, which the file lacks")
    return out


def check_integrity(model_dir: Path, progress: Progress | None = None, fmt: str | None = None) -> IntegrityReport:
    """Every check that needs no model: manifest hashes, shard headers, quantization_config vs tensors (a GGUF
    file: its header, every length bounded by the file). fmt: the artifact's format (formats.registry)."""
    report = IntegrityReport(path=str(model_dir))
    if fmt == GGUF:
        check_gguf(model_dir, report)
        return report
    check_manifest(model_dir, report, progress)
    if not report.ok:
        return report  # damaged files: reading them further would only add noise
    try:
        config, report.settings_file = read_config(model_dir)
        checkpoint = SafetensorsCheckpoint(model_dir)
        headers = read_headers(checkpoint)
        check_config_fits(config, checkpoint)
    except QuantkitError as e:
        report.errors.append(str(e))
        return report
    try:
        _check_quantization(config, model_dir, checkpoint, headers, report)
        _check_float_tensors(checkpoint, headers, report)
    except QuantkitError as e:
        report.errors.append(str(e))
    finally:
        checkpoint.close()
    return report


def check_manifest(model_dir: Path, report: IntegrityReport, progress: Progress | None) -> None:
    path = model_dir / MANIFEST_NAME
    if not path.is_file():
        report.unchecked = list(Unchecked)
        report.notes.append(f"no {MANIFEST_NAME} manifest (not written by quantkit), so these go unchecked: "
                            f"{'; '.join(UNCHECKED_WORDS[u] for u in report.unchecked)}")
        return
    try:
        files = _manifest_files(path)
    except QuantkitError as e:
        report.errors.append(f"{MANIFEST_NAME}: not a valid quantkit manifest ({e})")
        return
    report.manifest = True
    for i, (name, entry) in enumerate(sorted(files.items())):
        if progress:
            progress("hashing files", i, len(files))
        file = model_dir / name
        if not file.is_file():
            report.errors.append(f"{name}: listed in {MANIFEST_NAME} but missing")
            continue
        size = file.stat().st_size
        if "size" in entry and size != entry["size"]:
            report.errors.append(f"{name}: {size} bytes, {MANIFEST_NAME} says {entry['size']} (truncated or replaced)")
            continue
        if sha256_file(file) != entry["sha256"]:
            report.errors.append(f"{name}: sha256 differs from {MANIFEST_NAME} (file corrupted or modified)")
        report.files_checked += 1
    if progress:
        progress("hashing files", len(files), len(files))
    listed = set(files) | {MANIFEST_NAME}
    extra = sorted(p.name for p in model_dir.iterdir() if p.is_file() and p.name not in listed)
    if extra:
        report.warnings.append(f"files not in {MANIFEST_NAME}: {', '.join(extra)}")


def _manifest_files(path: Path) -> dict[str, dict]:
    """The manifest's `files`: plain names of files directly in the checkpoint, each with a sha256 and a size."""
    files = json_field(read_json(path, "manifest"), "files", dict, MANIFEST_NAME)
    for name in files:
        relative_name(name, MANIFEST_NAME)
        if "/" in name:
            raise QuantkitError(f"file name {name!r} is not a file at the checkpoint's top level")
        file_record(json_field(files, name, dict, "files"), f"the entry of {name!r}", size_required=False)
    return files


def _check_quantization(config: dict, model_dir: Path, checkpoint: SafetensorsCheckpoint, headers: dict,
                        report: IntegrityReport) -> None:
    qcfg = config.get("quantization_config")
    if not qcfg:
        stray = [n for n in headers if n.endswith(".qweight")]
        if stray:
            report.errors.append(f"config.json has no quantization_config, but the checkpoint holds {stray[0]}")
        else:
            report.notes.append("unquantized checkpoint (no quantization_config): only file checks apply")
        return
    if qcfg.get("quant_method") in VIEW_METHODS:
        check_view(model_dir, VIEW_METHODS[qcfg["quant_method"]], qcfg, headers, report)
        if qcfg["quant_method"] == "bitsandbytes":  # the loaders' limits known for it; the others' are not listed
            report.add_limits(loader_limits(qcfg))
        return
    settings = _settings(qcfg, report)
    if settings is None:
        return
    report.quantization = settings
    if report.settings_file == CONFIG_NAME and (model_dir / QUANTIZE_CONFIG_NAME).is_file():
        _compare_quantize_config(qcfg, model_dir, report)
    modules = sorted(n[: -len(".qweight")] for n in headers if n.endswith(".qweight"))
    if not modules:
        report.errors.append("quantization_config says GPTQ, but no tensor ends in .qweight")
        return
    report.quantized_modules = len(modules)
    problems: list[str] = []
    shapes: dict[str, tuple[int, int]] = {}
    for module in modules:
        shape = _check_module(module, settings, checkpoint, headers, problems)
        if shape is not None:
            shapes[module] = shape
    report.errors.extend(problems[:MAX_LISTED])
    if len(problems) > MAX_LISTED:
        report.errors.append(f"... and {len(problems) - MAX_LISTED} more tensor problems")
    files = sorted(set(checkpoint.weight_map.values()))
    report.add_limits(layout_limits(report.settings_file == QUANTIZE_CONFIG_NAME, files,
                                    (model_dir / INDEX_NAME).is_file()) + loader_limits(qcfg, shapes or None))


def _compare_quantize_config(qcfg: dict, model_dir: Path, report: IntegrityReport) -> None:
    """quantize_config.json, beside a config.json that has a quantization_config, says the same."""
    try:
        other = read_quantize_config(model_dir)
    except QuantkitError as e:
        report.errors.append(first_line(e))
        return
    differ = [k for k in SAME_IN_BOTH_FILES if k in other and other[k] != qcfg.get(k, other[k])]
    if differ:
        report.errors.append(f"quantize_config.json disagrees with config.json on {', '.join(differ)}")


def _settings(qcfg: dict, report: IntegrityReport) -> dict | None:
    """The GPTQ settings quantkit checks and loads, or None (and errors naming the settings' file) when they are
    not ones it can."""
    where = "config.json quantization_config." if report.settings_file == CONFIG_NAME else f"{report.settings_file}: "
    bad = lambda key, value, want: report.errors.append(f"{where}{key} = {value!r}: {want}")  # noqa: E731
    if qcfg.get("quant_method") != "gptq":
        bad("quant_method", qcfg.get("quant_method"), f"quantkit reads {', '.join(QUANT_METHODS)} checkpoints")
        return None
    bits, group, fmt = qcfg.get("bits"), qcfg.get("group_size", -1), qcfg.get("checkpoint_format", "gptq")
    n_errors = len(report.errors)
    if bits not in SUPPORTED_BITS:
        bad("bits", bits, f"expected one of {SUPPORTED_BITS}")
    if not isinstance(group, int) or isinstance(group, bool) or (group != -1 and group <= 0):
        bad("group_size", group, "expected -1 or a positive integer")
    if fmt not in ("gptq", "gptq_v2"):
        bad("checkpoint_format", fmt, "expected 'gptq' or 'gptq_v2'")
    for key in ("desc_act", "sym"):
        if not isinstance(qcfg.get(key, False), bool):
            bad(key, qcfg.get(key), "expected true or false")
    if qcfg.get("pack_dtype", PACK_DTYPE) != PACK_DTYPE:
        bad("pack_dtype", qcfg.get("pack_dtype"), f"quantkit reads codes packed into {PACK_DTYPE} only")
    overrides = _per_module_overrides(qcfg)
    if overrides:
        bad("dynamic", overrides[0], "per-module settings (GPTQModel's dynamic) that differ from the checkpoint's "
            "own are not supported: quantkit checks and loads one setting for every module")
    if len(report.errors) > n_errors:
        return None
    return {"bits": bits, "group_size": group, "sym": qcfg.get("sym", True), "desc_act": qcfg.get("desc_act", False),
            "checkpoint_format": fmt, "lm_head": bool(qcfg.get("lm_head", False))}


def _per_module_overrides(qcfg: dict) -> list[str]:
    """The rules of a GPTQModel `dynamic` map that give some modules other bits, group size, sym or desc_act
    ("-:" rules, which leave modules unquantized, change nothing quantkit reads); a map of another shape is one
    rule of its own."""
    dynamic = qcfg.get("dynamic")
    if dynamic is None:
        return []
    if not isinstance(dynamic, dict):
        return [str(dynamic)[:80]]
    return [str(rule)[:80] for rule, override in dynamic.items() if not str(rule).startswith("-:") and (
        not isinstance(override, dict) or any(k in override and override[k] != qcfg.get(k) for k in OVERRIDES))]


def _check_module(module: str, s: dict, checkpoint: SafetensorsCheckpoint, headers: dict,
                  problems: list[str]) -> tuple[int, int] | None:
    """Shapes, dtypes and g_idx of one quantized Linear; returns its weight's (out_features N, in_features K), or
    None when they cannot be told or K is 0."""
    missing = [sfx for sfx in ("qzeros", "scales", "g_idx") if f"{module}.{sfx}" not in headers]
    if missing:
        problems.append(f"{module}: tensor {module}.{missing[0]} is missing")
        return None
    info: dict[str, dict] = {sfx: headers[f"{module}.{sfx}"] for sfx in MODULE_SUFFIXES if f"{module}.{sfx}" in headers}
    bits, group = s["bits"], s["group_size"]
    want_dtypes = {"qweight": ("I32",), "qzeros": ("I32",), "g_idx": ("I32",), "scales": ("F16", "BF16", "F32")}
    for sfx, allowed in want_dtypes.items():
        if info[sfx]["dtype"] not in allowed:
            problems.append(f"{module}.{sfx}: dtype {info[sfx]['dtype']}, expected {' or '.join(allowed)}")
            return None
    kp, n = (info["qweight"]["shape"] + [0, 0])[:2]
    k = kp * 32 // bits
    n_groups = 1 if group == -1 else math.ceil(k / group)
    expect = {"qweight": [kp, n], "g_idx": [k], "scales": [n_groups, n], "qzeros": [n_groups, n * bits // 32]}
    if (n * bits) % 32 or len(info["qweight"]["shape"]) != 2:
        problems.append(f"{module}.qweight: shape {info['qweight']['shape']} cannot hold {bits}-bit codes")
        return None
    if "bias" in info:
        expect["bias"] = [n]
    for sfx, shape in expect.items():
        if info[sfx]["shape"] != shape:
            problems.append(f"{module}.{sfx}: shape {info[sfx]['shape']}, expected {shape} for a [{n}, {k}] weight at "
                            f"{bits} bits, group size {group} (from {module}.qweight {info['qweight']['shape']})")
            return None
    g_idx = checkpoint.get(f"{module}.g_idx").long()
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
        problems.append(f"{module}.g_idx: values in [{int(g_idx.min())}, {int(g_idx.max())}], outside [0, {n_groups})")
        return None
    effective = k if group == -1 else group
    if not s["desc_act"] and not torch.equal(g_idx, torch.arange(k) // effective):
        problems.append(f"{module}.g_idx: not channel // group_size although desc_act is false; kernels that ignore "
                        "g_idx would dequantize it differently")
    elif s["desc_act"] and int(torch.bincount(g_idx, minlength=n_groups).max()) > effective:
        problems.append(f"{module}.g_idx: a group holds more than group_size={effective} channels")
    scales = checkpoint.get(f"{module}.scales")
    if not torch.isfinite(scales).all():
        problems.append(f"{module}.scales: holds NaN or Inf")
    elif s["sym"] and bool((scales <= 0).any()):
        problems.append(f"{module}.scales: holds zero or negative scales")
    return (n, k) if k else None


def _check_float_tensors(checkpoint: SafetensorsCheckpoint, headers: dict, report: IntegrityReport) -> None:
    """NaN/Inf in unquantized tensors (embeddings, norms, head, biases), read one at a time."""
    bad = []
    for name, info in headers.items():
        if info["dtype"] in FLOAT_DTYPES and not name.endswith(".scales"):
            if not torch.isfinite(checkpoint.get(name)).all():
                bad.append(name)
    report.errors.extend(f"{name} ({headers[name]['file']}): holds NaN or Inf" for name in bad[:MAX_LISTED])


def describe_quantization(q: dict, long: bool = False) -> str:
    """One phrase for a report's `quantization` settings (GPTQ, bitsandbytes, GGUF, or another format's)."""
    if q.get("quant_method") == "bitsandbytes":
        return f"bitsandbytes {q.get('quant_type', 'int8')} ({q['bits']}-bit)"
    if q.get("quant_method") == GGUF:
        types = sorted(q["types"].items(), key=lambda kv: -kv[1])
        return f"GGUF {q['architecture']}: " + ", ".join(f"{n} {kind}" for kind, n in types)
    if q.get("quant_method", "gptq") != "gptq":  # another format's settings, as its layout reports them
        return f"{q.get('quant_method')} " + ", ".join(f"{k} {v}" for k, v in q.items() if k != "quant_method"
                                                      and isinstance(v, (bool, int, float, str)))
    if not long:
        return f"{q['bits']}-bit g{q['group_size']} {'sym' if q['sym'] else 'asym'} {q['checkpoint_format']}"
    group = "per row" if q["group_size"] == -1 else q["group_size"]
    return (f"{q['bits']}-bit, group size {group}, {'symmetric' if q['sym'] else 'asymmetric'}, "
            f"desc_act {q['desc_act']}, format {q['checkpoint_format']}")


def raise_for(report: IntegrityReport) -> None:
    """One line naming the first problem (and how many more)."""
    if report.errors:
        more = f" (+{len(report.errors) - 1} more problems)" if len(report.errors) > 1 else ""
        raise IntegrityError(f"integrity check failed: {report.errors[0]}{more}")


__all__ = ["IntegrityError", "IntegrityReport", "check_integrity", "read_header", "read_headers", "raise_for",
           "MANIFEST_NAME", "INDEX_NAME", "MODULE_SUFFIXES"]
