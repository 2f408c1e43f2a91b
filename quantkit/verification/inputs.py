"""What verify compares: the checkpoint's manifest (base model, per-layer losses), the base model, the tokenizer."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from quantkit.errors import QuantkitError, first_line
from quantkit.formats.registry import GGUF
from quantkit.source.checkpoint import resolve_model_dir
from quantkit.source.hub import cached_snapshot, looks_like_repo_id
from quantkit.verification.report import VerifyReport
from quantkit.write.manifest import MANIFEST_NAME

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

OUTLIER_FACTOR = 5  # a layer whose summed GPTQ loss exceeds this many times the median layer's stands out


def read_manifest(qdir: Path) -> dict | None:
    """The checkpoint's quantkit.json as a dict, or None when it is missing or unreadable (integrity reports why)."""
    path = qdir / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None
    return manifest if isinstance(manifest, dict) else None


def layer_summary(manifest: dict | None) -> list[dict]:
    """Per decoder layer: summed GPTQ loss, the worst module, and whether the layer stands out (more than
    OUTLIER_FACTOR times the median layer), from the manifest; empty for round-to-nearest runs or checkpoints
    without a manifest."""
    rows: list[dict] = []
    layers = (manifest or {}).get("layers")
    for layer in layers if isinstance(layers, list) else []:
        losses = layer.get("losses") if isinstance(layer, dict) else None
        if not isinstance(losses, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in losses.values()):
            continue  # not a layer entry quantkit writes: the summary is informative, never trusted
        if not losses or not any(v for v in losses.values()):
            continue
        worst = max(losses, key=lambda k: losses[k])
        index = layer.get("index")
        rows.append({"index": index if isinstance(index, int) and not isinstance(index, bool) else len(rows),
                     "total_loss": float(sum(losses.values())), "worst_module": worst,
                     "worst_loss": float(losses[worst]),
                     "damp_raised": layer.get("damp_raised") if isinstance(layer.get("damp_raised"), dict) else {}})
    if rows:
        totals = sorted(r["total_loss"] for r in rows)
        median = totals[len(totals) // 2]
        for r in rows:
            r["outlier"] = r["total_loss"] > OUTLIER_FACTOR * median
    return rows


def resolve_base(base: str | None, manifest: dict | None, report: VerifyReport) -> Path | None:
    """The base model's directory: the argument, else the one the manifest records when it is available here;
    records the choice (or why there is none) in the report."""
    if base is not None:
        report.base, report.base_origin = base, "argument"
        bdir = resolve_model_dir(base)
        report.base_path = str(bdir)
        return bdir
    if manifest is None:
        report.notes.append(f"no --base given, and without {MANIFEST_NAME} the checkpoint records no base: reporting "
                            "integrity and the quantized model's own perplexity only; pass --base MODEL to compare")
        return None
    source = manifest.get("source")
    recorded = source.get("model") if isinstance(source, dict) else None
    if not recorded:
        report.notes.append("no --base given and none recorded in the checkpoint: reporting integrity and the "
                            "quantized model's own perplexity only")
        return None
    recorded_dir = recorded_base_dir(recorded)
    if recorded_dir is None:
        report.notes.append(f"the base recorded in {MANIFEST_NAME} ({str(recorded)[:200]!r}) is not available here (a "
                            "recorded base is used only as a repo id in the local hub cache or an existing absolute "
                            "directory): reporting integrity and the quantized model's own perplexity only; pass "
                            "--base to compare")
        return None
    report.base, report.base_origin, report.base_path = recorded, "manifest", str(recorded_dir)
    report.notes.append(f"base model taken from {MANIFEST_NAME}: {recorded}")
    return recorded_dir


def recorded_base_dir(recorded: object) -> Path | None:
    """The base a checkpoint's own quantkit.json names, which whoever wrote that file chose: accepted only as a
    repo id already in the local hub cache or an existing absolute directory (never a relative path, which would
    be read from wherever verify runs), else None."""
    if not isinstance(recorded, str) or "\x00" in recorded or len(recorded) > 4096:
        return None
    if looks_like_repo_id(recorded) and not recorded.startswith((".", "/", "~")):
        return cached_snapshot(recorded)
    path = Path(recorded)
    if not path.is_absolute() or not path.is_dir():
        return None
    return path


def _load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:
        raise QuantkitError(f"cannot load the tokenizer from {path}: {first_line(e)}") from None


def shared_tokenizer(qdir: Path, bdir: Path | None, fmt: str | None = None) -> PreTrainedTokenizerBase:
    """The quantized checkpoint's tokenizer, refused when the base's has a different vocabulary (a GGUF file is
    evaluated with its base's tokenizer)."""
    if fmt == GGUF and bdir is not None:
        return _load_tokenizer(bdir)
    tok = _load_tokenizer(qdir)
    if bdir is not None and _load_tokenizer(bdir).get_vocab() != tok.get_vocab():
        raise QuantkitError(f"the tokenizers of {qdir} and {bdir} differ: the models would be compared on different "
                            "tokens; is --base the model this checkpoint was made from?")
    return tok
