"""Pass or fail: one failure per metric outside its threshold, and the hint a failing plain-GPTQ checkpoint gets."""
from __future__ import annotations

import math

from quantkit.verification.report import Thresholds, VerifyReport

CLOSENESS_METRICS = ("ppl_ratio", "kl_mean", "top1_agreement")
GPTAQ_HINT = ("this checkpoint was calibrated with plain GPTQ: `quantkit quantize --gptaq` solves each layer against "
              "the unquantized model's outputs and usually lands closer to the base")


def apply_thresholds(report: VerifyReport, t: Thresholds) -> list[dict]:
    """One failure per metric outside its threshold; each names the metric, its value and the threshold."""
    failures: list[dict] = []

    def check(metric: str, value: float | None, limit: float | None, upper: bool, flag: str, label: str) -> None:
        if limit is None or value is None:
            return
        ok = math.isfinite(value) and (value <= limit if upper else value >= limit)
        if not ok:
            rel = "exceeds" if upper else "is below"
            failures.append({"metric": metric, "value": value, "threshold": limit,
                             "message": f"{label} {value:.4g} {rel} {flag} {limit:g}"})

    if report.base_ppl is None:
        if report.quantized_ppl is not None and not math.isfinite(report.quantized_ppl):
            failures.append({"metric": "quantized_ppl", "value": report.quantized_ppl, "threshold": None,
                             "message": "quantized perplexity is not finite"})
        if report.quantized_ppl is not None:
            report.notes.append("thresholds not applied: there is no base model to compare with")
        return failures
    check("ppl_ratio", report.ppl_ratio, t.max_ppl_ratio, True, "--max-ppl-ratio",
          f"perplexity ratio (quantized {report.quantized_ppl:.4g} / base {report.base_ppl:.4g})")
    check("kl_mean", report.kl_mean, t.max_kl, True, "--max-kl", "mean KL divergence")
    check("top1_agreement", report.top1_agreement, t.min_top1, False, "--min-top1", "top-1 agreement")
    return failures


def integrity_failure(report: VerifyReport) -> dict:
    """The failure a damaged checkpoint gets: how many problems, and the first."""
    errors = report.integrity.errors
    return {"metric": "integrity", "value": len(errors), "threshold": 0, "message": errors[0]}


def calibrated_without_gptaq(manifest: dict | None) -> bool:
    """Whether the manifest records a GPTQ run without GPTAQ."""
    quantization = (manifest or {}).get("quantization")
    return isinstance(quantization, dict) and quantization.get("method") == "gptq" and not quantization.get("gptaq")


def gptaq_hint(report: VerifyReport, manifest: dict | None) -> list[str]:
    """The GPTAQ hint, when a closeness metric failed on a checkpoint calibrated with plain GPTQ."""
    failed = any(f["metric"] in CLOSENESS_METRICS for f in report.failures)
    return [GPTAQ_HINT] if failed and calibrated_without_gptaq(manifest) else []
