"""quantkit: GPTQ quantization of Hugging Face causal LMs, one decoder layer in memory at a time.

    import quantkit
    result = quantkit.quantize("path/to/model", quantkit.QuantSpec(bits=4, group_size=64))
    print(result.repo_id, result.path)

    quantkit.verify(result.path).passed                            # integrity + metrics against the base
    quantkit.estimate("llama-2-70b").weight(4).total_bytes / 2**30   # GiB of 4-bit g128 weights
    quantkit.inspect(result.path).manifest["status"]                 # "ok"
    [m.repo_id for m in quantkit.cache_list()]
"""
from __future__ import annotations

__version__ = "0.1.0"

from collections.abc import Iterable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

from quantkit.config import (  # noqa: E402  (light: no torch model code)
    DEFAULT_ESTIMATE_BITS,
    ESTIMATE_BATCH,
    ESTIMATE_CONTEXT,
    CalibSpec,
    QuantSpec,
)

if TYPE_CHECKING:
    from quantkit.run.pipeline import QuantizeResult
    from quantkit.tools.cache import CachedModel
    from quantkit.tools.estimate import Estimate
    from quantkit.tools.inspect import InspectReport
    from quantkit.verification.api import VerifyReport


def quantize(model: str, spec: QuantSpec | None = None, calib: CalibSpec | None = None,
             **kwargs: Any) -> QuantizeResult:
    """Quantize MODEL and publish it; see quantkit.run.pipeline.quantize for the parameters."""
    from quantkit.run.pipeline import quantize as _quantize

    return _quantize(model, spec or QuantSpec(), calib or CalibSpec(), **kwargs)


def verify(quantized: str, base: str | None = None, **kwargs: Any) -> VerifyReport:
    """Integrity, perplexity, KL, top-1 agreement and generations of QUANTIZED against BASE; a VerifyReport.

    See quantkit.verification.api.verify for the options (eval_source, seq_len, max_tokens, loader, thresholds, ...).

    >>> r = quantkit.verify("quantkit/SmolLM2-135M-Instruct-gptq-4bit-g64")        # doctest: +SKIP
    >>> r.passed, r.failures                                                        # doctest: +SKIP
    (True, [])
    """
    from quantkit.verification.api import verify as _verify

    return _verify(quantized, base, **kwargs)


def estimate(model_or_config: str | Path | dict, bits: Iterable[int] = DEFAULT_ESTIMATE_BITS,
             group_size: int = QuantSpec.group_size, context: int = ESTIMATE_CONTEXT, batch: int = ESTIMATE_BATCH,
             **kwargs: Any) -> Estimate:
    """Memory to run and to quantize a model, from its config alone; see quantkit.tools.estimate.estimate.

    >>> e = quantkit.estimate("llama-2-70b", bits=[16, 4])
    >>> round(e.total_params / 1e9, 2), round(e.weight(16).total_bytes / 2**30, 1)
    (68.98, 128.5)
    >>> [g["run"][4] for g in e.gpus if g["gpu_gb"] == 80], e.to_dict()["kv_cache_gib"]
    ([True], 1.25)
    """
    from quantkit.tools.estimate import estimate as _estimate

    return _estimate(model_or_config, bits=bits, group_size=group_size, context=context, batch=batch,
                                     **kwargs)


def inspect(model: str | Path) -> InspectReport:
    """Describe a checkpoint directory or cached repo id (headers only); returns an InspectReport dataclass.

    >>> r = quantkit.inspect("quantkit/SmolLM2-135M-Instruct-gptq-4bit-g64")      # doctest: +SKIP
    >>> r.bits, r.group_size, r.manifest["status"], len(r.quantized_modules)         # doctest: +SKIP
    (4, 64, 'ok', 210)
    >>> r.notes   # known loader limits, from quantkit.verification.compat.compatibility_notes        # doctest: +SKIP
    """
    from quantkit.tools.inspect import inspect as _inspect

    return _inspect(model)


def cache_list() -> list[CachedModel]:
    """Quantized models in the local hub cache, as CachedModel dataclasses (repo_id, method, bits, ...).

    >>> [(m.repo_id, m.bits, m.group_size) for m in quantkit.cache_list()]    # doctest: +SKIP
    [('quantkit/SmolLM2-135M-Instruct-gptq-4bit-g64', 4, 64)]
    """
    from quantkit.tools.cache import cache_list as _cache_list

    return _cache_list()


__all__ = ["CalibSpec", "QuantSpec", "cache_list", "estimate", "inspect", "quantize", "verify", "__version__"]
