"""verify(): is a quantized checkpoint intact, and how far is it from its base model? No click, no printing.

Steps: integrity (integrity.py) -> resolve the base (argument, else the one recorded in quantkit.json; inputs.py)
-> load both (quantkit's pure-torch GPTQLinear loader, or transformers + optimum + gptqmodel; loading.py) ->
stream the evaluation windows through both, one window at a time (perplexity, KL, top-1 agreement; metrics.py)
-> greedy generations side by side (generations.py) -> thresholds (thresholds.py) -> a VerifyReport (report.py).
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
from quantkit.source.calibration import evaluation_windows
from quantkit.source.checkpoint import resolve_model_dir
from quantkit.verification.generations import SYSTEM_PROMPT, eos_ids, generations
from quantkit.verification.inputs import layer_summary, read_manifest, resolve_base, shared_tokenizer
from quantkit.verification.integrity import check_integrity
from quantkit.verification.loading import LOADERS, check_vocab, load, memory_budgets
from quantkit.verification.metrics import evaluate
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
from quantkit.verification.thresholds import apply_thresholds, gptaq_hint, integrity_failure

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def verify(quantized: str, base: str | None = None, *, eval_source: str = DEFAULT_EVAL, seq_len: int = EVAL_SEQ_LEN,
           max_tokens: int | None = EVAL_MAX_TOKENS, loader: str = "quantkit", max_memory: int | None = None,
           thresholds: Thresholds = DEFAULT_THRESHOLDS, generate: bool = True, max_new_tokens: int = MAX_NEW_TOKENS,
           progress: Progress | None = None) -> VerifyReport:
    """Check QUANTIZED (directory or cached repo id) for integrity and against BASE; see the module docstring.

    :param base: the reference model; None uses the base recorded in the checkpoint's quantkit.json if present.
    :param eval_source: built-in evaluation set, local .txt/.jsonl/.parquet file, or hf:<dataset>.
    :param max_tokens: evaluate at most this many tokens (whole windows of seq_len).
    :param loader: "quantkit" (pure torch, exact dequantization) or "transformers" (optimum + gptqmodel).
    :param max_memory: bytes of RAM both models' weights may use together; layers beyond it go to disk.
    :param progress: called as progress(stage, done, total) during long steps.
    """
    if loader not in LOADERS:
        raise QuantkitError(f"unknown loader {loader!r}; use one of {', '.join(LOADERS)}")
    t0 = time.perf_counter()
    progress = progress or no_progress
    qdir = resolve_model_dir(quantized)
    progress("checking integrity", 0, 1)
    report = VerifyReport(quantized=quantized, quantized_path=str(qdir), loader=loader,
                          integrity=check_integrity(qdir, progress), thresholds=thresholds)
    if not report.integrity.ok:
        report.failures.append(integrity_failure(report))
        return _finished(report, t0)
    manifest = read_manifest(qdir)
    report.layers = layer_summary(manifest)
    bdir = resolve_base(base, manifest, report)
    progress("preparing evaluation text", 0, 1)
    tokenizer = shared_tokenizer(qdir, bdir)
    windows = evaluation_windows(tokenizer, eval_source, seq_len, max_tokens)
    report.eval = {"source": eval_source, "seq_len": seq_len, "windows": int(windows.shape[0]),
                   "max_tokens": max_tokens}
    with tempfile.TemporaryDirectory(prefix="quantkit-offload-") as offload:
        qmodel, bmodel = _load_both(qdir, bdir, loader, max_memory, Path(offload), report, progress)
        _compare(qmodel, bmodel, tokenizer, qdir, windows, report, max_new_tokens if generate else None, progress)
        del qmodel, bmodel
    report.failures.extend(apply_thresholds(report, thresholds))
    report.notes.extend(gptaq_hint(report, manifest))
    return _finished(report, t0)


def _load_both(qdir: Path, bdir: Path | None, loader: str, max_memory: int | None, offload: Path,
               report: VerifyReport, progress: Progress) -> tuple[PreTrainedModel, PreTrainedModel | None]:
    """Both models within the memory budget (layers beyond it offloaded under `offload`), same vocabulary."""
    budgets = memory_budgets(qdir, bdir, loader, max_memory)
    progress("loading quantized model", 0, 1)
    qmodel, report.load["quantized"] = load(qdir, loader, budgets[0], offload / "quantized", report)
    bmodel = None
    if bdir is not None:
        progress("loading base model", 0, 1)
        bmodel, report.load["base"] = load(bdir, loader, budgets[1], offload / "base", report)
    check_vocab(qmodel, bmodel)
    return qmodel, bmodel


def _compare(qmodel: PreTrainedModel, bmodel: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase,
             qdir: Path, windows: Tensor, report: VerifyReport, max_new_tokens: int | None,
             progress: Progress) -> None:
    """Evaluate both models on the windows and, unless max_new_tokens is None, generate side by side."""
    with fast_float32_matmuls(torch.device("cpu")):  # through oneDNN where that keeps float32's accuracy
        evaluate(qmodel, bmodel, windows, report, progress)
        if max_new_tokens is not None:
            report.generation_config = {"max_new_tokens": max_new_tokens, "do_sample": False,
                                        "eos_token_ids": eos_ids(tokenizer, qdir), "system_prompt": SYSTEM_PROMPT}
            report.generations = generations(qmodel, bmodel, tokenizer, qdir, max_new_tokens, progress, report.notes)


def _finished(report: VerifyReport, t0: float) -> VerifyReport:
    report.seconds = round(time.perf_counter() - t0, 2)
    return report
