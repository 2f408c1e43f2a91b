"""Perplexity and next-token comparisons on fixed token windows. Pure torch over loaded models.

Computed in float32 from the logits:
  perplexity      exp(mean next-token NLL) over all predicted tokens of non-overlapping windows
  KL              KL(P_base || P_quant) of the next-token distributions at every position (base = reference);
                  reported as the mean and the 99th percentile over positions
  top-1 agreement fraction of positions where both models' most likely next token is the same
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from quantkit.verification.report import Progress, VerifyReport

if TYPE_CHECKING:
    from transformers import PreTrainedModel

MAX_EXP = 700  # exp() of larger values overflows a float64; such perplexities are reported as inf
KL_PERCENTILE = 99
WindowLogits = Callable[[int], Tensor]  # window index -> its next-token logits [T-1, V], float32


@torch.no_grad()
def window_nll(model: nn.Module, windows: Tensor, batch_size: int = 4) -> Tensor:
    """Mean next-token negative log-likelihood of each window [n, seq_len] -> float64 [n]."""
    out = []
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start:start + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="none").view(ids.shape[0], -1)
        out.append(nll.mean(dim=1).double())
    return torch.cat(out)


def perplexity(model: nn.Module, windows: Tensor, batch_size: int = 4) -> float:
    """exp of the mean NLL over all predicted tokens of non-overlapping windows."""
    return math.exp(float(window_nll(model, windows, batch_size).mean()))


@torch.inference_mode()
def logits(model: PreTrainedModel, ids: Tensor) -> Tensor:
    """Next-token logits [T-1, V] in float32 for one window [T]."""
    return model(input_ids=ids[None], use_cache=False).logits[0, :-1].float()


@torch.inference_mode()
def quantized_nll(q_logits: Tensor, targets: Tensor, chunk: int = 256) -> Tensor:
    """Per-position NLL (float64) of the quantized model alone, chunked over T."""
    return torch.cat([-torch.log_softmax(q_logits[s:s + chunk], dim=-1).gather(-1, targets[s:s + chunk, None])[:, 0]
                      .double() for s in range(0, targets.shape[0], chunk)])


@torch.inference_mode()
def compare_window(q_logits: Tensor, b_logits: Tensor, targets: Tensor,
                   chunk: int = 256) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-position (quantized NLL, base NLL, KL(base || quantized), top-1 agreement), float64/bool, chunked over T."""
    q_nll, b_nll, kl, agree = [], [], [], []
    for s in range(0, targets.shape[0], chunk):
        q = torch.log_softmax(q_logits[s:s + chunk], dim=-1)              # [t, V]
        b = torch.log_softmax(b_logits[s:s + chunk], dim=-1)
        tgt = targets[s:s + chunk, None]
        q_nll.append(-q.gather(-1, tgt)[:, 0].double())
        b_nll.append(-b.gather(-1, tgt)[:, 0].double())
        kl.append((b.exp() * (b - q)).sum(-1).double().clamp(min=0))  # rounding can dip a hair below 0
        agree.append(b.argmax(-1) == q.argmax(-1))
    return torch.cat(q_nll), torch.cat(b_nll), torch.cat(kl), torch.cat(agree)


def model_logits(model: PreTrainedModel, windows: Tensor) -> WindowLogits:
    """Window i's next-token logits from a whole model in memory."""
    return lambda i: logits(model, windows[i])


def evaluate(q_logits: WindowLogits, b_logits: WindowLogits | None, windows: Tensor, report: VerifyReport,
             progress: Progress) -> None:
    """Both models' logits, window by window, into the report; never holds more than one window's logits per model."""
    q_all, b_all, kl_all, agree_all = [], [], [], []
    n = windows.shape[0]
    for i in range(n):
        progress("evaluating", i, n)
        q = q_logits(i)
        targets = windows[i][1:].to(q.device)  # the streamed path's logits are on its device (a GPU's, maybe)
        if b_logits is None:
            q_nll = quantized_nll(q, targets).cpu()
            report.per_window.append({"index": i, "quantized_ppl": exp_or_inf(q_nll.mean())})
        else:
            q_nll, b_nll, kl, agree = (t.cpu() for t in compare_window(q, b_logits(i), targets))
            report.per_window.append({"index": i, "quantized_ppl": exp_or_inf(q_nll.mean()),
                                      "base_ppl": exp_or_inf(b_nll.mean()), "kl_mean": float(kl.mean()),
                                      "top1": float(agree.float().mean())})
            b_all.append(b_nll)
            kl_all.append(kl)
            agree_all.append(agree)
        q_all.append(q_nll)
    progress("evaluating", n, n)
    q_nll = torch.cat(q_all)
    report.tokens = int(q_nll.numel())
    report.quantized_ppl = exp_or_inf(q_nll.mean())
    if b_logits is not None:
        _summarise(q_nll, torch.cat(b_all), torch.cat(kl_all), torch.cat(agree_all), report)


def _summarise(q_nll: Tensor, b_nll: Tensor, kl: Tensor, agree: Tensor, report: VerifyReport) -> None:
    """The comparison's metrics over every position of every window."""
    import numpy as np

    report.base_ppl = exp_or_inf(b_nll.mean())
    report.ppl_ratio = exp_or_inf(q_nll.mean() - b_nll.mean())  # = quantized_ppl / base_ppl, exactly 1 for equal NLLs
    report.kl_mean = float(kl.mean())
    report.kl_p99 = float(np.percentile(kl.numpy(), KL_PERCENTILE))
    report.top1_agreement = float(agree.float().mean())
    report.kl_histogram = kl_histogram(kl)


def exp_or_inf(x: Tensor | float) -> float:
    """exp(x) as a float, inf where it would overflow."""
    x = float(x)
    return math.exp(x) if x < MAX_EXP else math.inf


def kl_histogram(kl: Tensor, bins: int = 40) -> dict:
    """Counts of per-position KL over log-spaced edges spanning the positive values; exact zeros counted apart."""
    values = kl[kl > 0].double()
    if values.numel():
        low = max(math.floor(math.log10(float(values.min()))), -12)
        high = max(math.log10(float(values.max())) + 1e-9, low + 1)
    else:
        low, high = -6, -5
    edges = torch.logspace(low, high, bins + 1, dtype=torch.float64)
    counts = torch.histogram(values, bins=edges)[0] if values.numel() else torch.zeros(bins)
    return {"edges": edges.tolist(), "counts": [int(c) for c in counts], "zeros": int((kl == 0).sum())}
