"""A finished step's report (a decoder layer, or the head): its fields, defined once for the run, the resume
state's check and the manifest, and how a step's results become one."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from quantkit.config import QuantSpec

# every field a report may hold, and of which JSON type; the required ones; those that say how long a step took
# and how much GPU memory it used (the manifest leaves them out: a rerun writes the same manifest)
REPORT_FIELDS: dict[str, type | tuple[type, ...]] = {
    "index": int, "module": str, "seconds": (int, float), "stage_seconds": dict, "stage_peak_gpu_mb": dict,
    "losses": dict, "damp_raised": dict, "experts": dict}
REPORT_REQUIRED = ("index", "seconds", "losses")
# a report's "experts" entry, per Mixture-of-Experts block: each field and its JSON type
EXPERT_FIELDS: dict[str, type] = {"experts": int, "tokens": list, "rounded": list, "min_tokens": int,
                                  "skipped": list}
TIMING_FIELDS = ("seconds", "stage_seconds", "stage_peak_gpu_mb")


class Solution(Protocol):
    """What a report reads of one quantized Linear's result."""

    loss: float
    damp: float


class Stages(Protocol):
    """What a report reads of a layer's stage clock (telemetry.StageClock)."""

    seconds: dict[str, float]
    gpu_mb: dict[str, float]


def step_report(index: int, seconds: float, results: Mapping[str, Solution], spec: QuantSpec, *,
                module: str | None = None, stages: Stages | None = None, experts: dict | None = None) -> dict:
    """The report of step `index`: its seconds (and per stage, with their GPU peaks on a GPU), each Linear's loss,
    and the damping of those whose Hessian needed more than spec.damp. module: the head's name (a layer has none);
    experts: per Mixture-of-Experts block, its experts' calibration tokens and those rounded to nearest."""
    report: dict = {"index": index}
    if module is not None:
        report["module"] = module
    report["seconds"] = seconds
    if stages is not None:
        report["stage_seconds"] = stages.seconds
        if stages.gpu_mb:
            report["stage_peak_gpu_mb"] = stages.gpu_mb
    report["losses"] = {name: res.loss for name, res in results.items()}
    damps = raised_damping(results, spec)
    if damps:
        report["damp_raised"] = damps
    if experts:
        report["experts"] = experts
    return report


def raised_damping(results: Mapping[str, Solution], spec: QuantSpec) -> dict[str, float]:
    """The Linears whose solve raised the damping above spec.damp, and to what."""
    return {name: res.damp for name, res in results.items() if res.damp != spec.damp}


def without_timings(report: dict) -> dict:
    """The report as the manifest records it."""
    return {k: v for k, v in report.items() if k not in TIMING_FIELDS}
