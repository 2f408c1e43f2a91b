"""verify(): is a quantized artifact intact, and how far is it from its base model? No click, no printing.

Steps: the format (formats/registry.py, from the files or --format) -> integrity (integrity.py) -> resolve the
base (argument, else the one recorded in quantkit.json; inputs.py) -> the evaluation windows -> both models
compared on them, either whole in memory (quantkit's GPTQLinear loader or a float model read through the format's
view, or transformers; loading.py) or one decoder layer at a time (streamed.py, which also measures each layer's
error) -> perplexity, KL, top-1 agreement (metrics.py) -> greedy generations side by side (in memory only;
generations.py) -> thresholds (thresholds.py) -> a VerifyReport (report.py).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from quantkit.calibrate.precision import fast_float32_matmuls
from quantkit.config import DEFAULT_EVAL
from quantkit.errors import QuantkitError
from quantkit.formats.registry import GGUF, detect_format
from quantkit.source.calibration import evaluation_windows
from quantkit.verification.generations import SYSTEM_PROMPT, eos_ids, generations
from quantkit.verification.inputs import layer_summary, read_manifest, resolve_base, shared_tokenizer
from quantkit.verification.integrity import check_integrity
from quantkit.verification.loading import LOADERS, check_vocab, load, memory_budgets
from quantkit.verification.metrics import evaluate, model_logits
from quantkit.verification.modes import evaluation_device, generations_skipped, streams
from quantkit.verification.report import (
    DEFAULT_THRESHOLDS,
    EVAL_MAX_TOKENS,
    EVAL_SEQ_LEN,
    MAX_NEW_TOKENS,
    Progress,
    Thresholds,
    VerifyReport,
    no_progress,
)
from quantkit.verification.sources import artifact_path, model_config, open_source
from quantkit.verification.streamed import final_logits, run_layers, skeleton_for, streamed
from quantkit.verification.thresholds import apply_thresholds, gptaq_hint, integrity_failure

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

# what must agree between a quantized model and its base for their layers to be compared one by one
SAME_SHAPE = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")


def verify(quantized: str, base: str | None = None, *, fmt: str | None = None, eval_source: str = DEFAULT_EVAL,
           seq_len: int = EVAL_SEQ_LEN, max_tokens: int | None = EVAL_MAX_TOKENS, loader: str = "quantkit",
           max_memory: int | None = None, device: str = "auto", stream: str = "auto",
           thresholds: Thresholds = DEFAULT_THRESHOLDS, generate: bool = True, max_new_tokens: int = MAX_NEW_TOKENS,
           progress: Progress | None = None) -> VerifyReport:
    """Check QUANTIZED (directory, cached repo id or .gguf file) for integrity and against BASE; see the module
    docstring.

    :param base: the reference model; None uses the base recorded in the checkpoint's quantkit.json if present.
    :param fmt: the artifact's format (formats.registry.formats()); None detects it from the files.
    :param eval_source: built-in evaluation set, local .txt/.jsonl/.parquet file, or hf:<dataset>.
    :param max_tokens: evaluate at most this many tokens (whole windows of seq_len).
    :param loader: "quantkit" (pure torch, exact dequantization) or "transformers" (the deploy path).
    :param max_memory: bytes of RAM both models' weights may use together in memory; layers beyond it go to disk.
    :param device: "auto", "cpu" or "cuda": where the streamed evaluation runs the layers.
    :param stream: "on": layer by layer; "off": both models whole in memory; "auto": layer by layer unless
        max_memory asks for the whole models with offloaded layers (or the loader is transformers).
    :param progress: called as progress(stage, done, total) during long steps.
    """
    if loader not in LOADERS:
        raise QuantkitError(f"unknown loader {loader!r}; use one of {', '.join(LOADERS)}")
    t0 = time.perf_counter()
    progress = progress or no_progress
    qpath = artifact_path(quantized)
    fmt = detect_format(qpath, fmt)
    mode = streams(stream, device, loader, max_memory)
    run_on = evaluation_device(device, mode)
    progress("checking integrity", 0, 1)
    report = VerifyReport(quantized=quantized, quantized_path=str(qpath), loader=loader, format=fmt,
                          integrity=check_integrity(qpath, progress, fmt), thresholds=thresholds)
    if not report.integrity.ok:
        report.failures.append(integrity_failure(report))
        return _finished(report, t0)
    manifest = read_manifest(qpath) if qpath.is_dir() else None
    report.layers = layer_summary(manifest)
    bdir = resolve_base(base, manifest, report)
    if fmt == GGUF and bdir is None:
        raise QuantkitError(f"{qpath} is a GGUF file: verify compares it with the Hugging Face checkpoint it was made "
                            "from; pass --base MODEL")
    progress("preparing evaluation text", 0, 1)
    bfmt = detect_format(bdir) if bdir is not None else None  # a base may itself be quantized (a model against
    tokenizer = shared_tokenizer(qpath, bdir, fmt)             # itself, or against another quantization)
    windows = evaluation_windows(tokenizer, eval_source, seq_len, max_tokens)
    report.eval = {"source": eval_source, "seq_len": seq_len, "windows": int(windows.shape[0]),
                   "max_tokens": max_tokens, "mode": "streamed" if mode else "in memory", "device": str(run_on)}
    if mode:
        _compare_streamed(qpath, fmt, bdir, bfmt, windows, run_on, report, progress)
        skipped = generations_skipped(qpath, fmt, bdir, bfmt, max_memory) if generate else None
        if skipped is not None:
            report.notes.append(f"generations need both models whole in RAM: not run ({skipped})")
            generate = False
    if not mode or generate:
        with tempfile.TemporaryDirectory(prefix="quantkit-offload-") as offload:
            qmodel, bmodel = _load_both(qpath, bdir, fmt, bfmt, loader, max_memory, Path(offload), report,
                                        progress)
            _compare(qmodel, bmodel, tokenizer, qpath, None if mode else windows, report,
                     max_new_tokens if generate else None, progress)
            del qmodel, bmodel
    report.failures.extend(apply_thresholds(report, thresholds))
    report.notes.extend(gptaq_hint(report, manifest))
    return _finished(report, t0)


def _load_both(qdir: Path, bdir: Path | None, fmt: str | None, bfmt: str | None, loader: str, max_memory: int | None,
               offload: Path, report: VerifyReport,
               progress: Progress) -> tuple[PreTrainedModel, PreTrainedModel | None]:
    """Both models within the memory budget (layers beyond it offloaded under `offload`), same vocabulary."""
    budgets = memory_budgets(qdir, bdir, loader, max_memory, fmt, bfmt)
    progress("loading quantized model", 0, 1)
    own_config = model_config(bdir) if fmt == GGUF and bdir is not None else None  # a GGUF is built as its base
    qmodel, report.load["quantized"] = load(qdir, loader, budgets[0], offload / "quantized", report, fmt, own_config)
    bmodel = None
    if bdir is not None:
        progress("loading base model", 0, 1)
        bmodel, report.load["base"] = load(bdir, loader, budgets[1], offload / "base", report, bfmt)
    check_vocab(qmodel, bmodel)
    return qmodel, bmodel


def _compare(qmodel: PreTrainedModel, bmodel: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase,
             qdir: Path, windows: Tensor | None, report: VerifyReport, max_new_tokens: int | None,
             progress: Progress) -> None:
    """Evaluate both models on the windows (None: already evaluated layer by layer) and, unless max_new_tokens is
    None, generate side by side."""
    with fast_float32_matmuls(torch.device("cpu")):  # through oneDNN where that keeps float32's accuracy
        if windows is not None:
            evaluate(model_logits(qmodel, windows), model_logits(bmodel, windows) if bmodel is not None else None,
                     windows, report, progress)
        if max_new_tokens is not None:
            report.generation_config = {"max_new_tokens": max_new_tokens, "do_sample": False,
                                        "eos_token_ids": eos_ids(tokenizer, qdir), "system_prompt": SYSTEM_PROMPT}
            report.generations = generations(qmodel, bmodel, tokenizer, qdir, max_new_tokens, progress, report.notes)


def _compare_streamed(qpath: Path, fmt: str | None, bdir: Path | None, bfmt: str | None, windows: Tensor,
                      device: torch.device,
                      report: VerifyReport, progress: Progress) -> None:
    """Both models one decoder layer at a time (streamed.py): the metrics, and each layer's error."""
    base_config = model_config(bdir) if bdir is not None else None
    q_config = base_config if fmt == GGUF else model_config(qpath)
    assert q_config is not None  # a GGUF always has a base (verify refuses it without one)
    q_model, q_prefix, q_layers = skeleton_for(q_config)
    quant = streamed(q_model, q_prefix, q_layers, open_source(qpath, fmt, q_model))
    base = None
    if bdir is not None and base_config is not None:
        b_model, b_prefix, b_layers = skeleton_for(base_config)
        base = streamed(b_model, b_prefix, b_layers, open_source(bdir, bfmt, b_model))
        check_vocab(q_model, b_model)
        check_same_shape(q_config, base_config)
    try:
        with fast_float32_matmuls(device):
            q_hidden, b_hidden, report.layer_errors = run_layers(quant, base, windows, device, progress)
            with final_logits(quant, q_hidden, device) as q_logits:
                if base is None or b_hidden is None:
                    evaluate(q_logits, None, windows, report, progress)
                else:
                    with final_logits(base, b_hidden, device) as b_logits:
                        evaluate(q_logits, b_logits, windows, report, progress)
    finally:
        quant.source.close()
        if base is not None:
            base.source.close()


def check_same_shape(q_config: PretrainedConfig, b_config: PretrainedConfig) -> None:
    """The two models have the same layers and widths, else the layer-by-layer comparison would pair a layer's
    output with another shape's."""
    for key in SAME_SHAPE:
        q, b = (getattr(c.get_text_config(), key, None) for c in (q_config, b_config))
        if q != b:
            raise QuantkitError(f"the quantized model's {key} is {q} and the base's {b}: is --base the model it was "
                                "made from?")


def _finished(report: VerifyReport, t0: float) -> VerifyReport:
    report.seconds = round(time.perf_counter() - t0, 2)
    return report
