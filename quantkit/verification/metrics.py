"""Perplexity and next-token comparisons on fixed token windows. Pure torch over a loaded model."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


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
