"""A finished step's report (a decoder layer, or the head): its fields, defined once for the run, the resume
state's check and the manifest, how a step's results become one, and a report read back checked against them."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from quantkit.config import QuantSpec
from quantkit.errors import QuantkitError
from quantkit.untrusted import field

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


def check_report(holder: dict, index: int, where: str) -> None:
    """A finished layer's report (the only value of `holder`, keyed by where it is in state.json) holds the
    fields a layer report has, of their types, numbers in its tables, and its own index."""
    key = next(iter(holder))
    report = field(holder, key, dict, where)
    at = f"{where}: {key}"
    for name in REPORT_REQUIRED:
        field(report, name, REPORT_FIELDS[name], at)
    for name, value in report.items():
        if name not in REPORT_FIELDS:
            raise QuantkitError(f"{at}: {name!r} is not a field of a layer's report")
        field(report, name, REPORT_FIELDS[name], at)
        if name == "experts":
            for block in value:
                check_expert_record(field(value, block, dict, f"{at}: experts"), f"{at}: experts: {block}")
        elif isinstance(value, dict):
            for entry in value:
                field(value, entry, (int, float), f"{at}: {name}")
    if report["index"] != index:
        raise QuantkitError(f"{at}: 'index' is {report['index']}, expected {index}")


def check_expert_record(record: dict, at: str) -> None:
    """One MoE block's record in a report (step_report.EXPERT_FIELDS): its fields, counts and expert indices."""
    if set(record) != set(EXPERT_FIELDS):
        raise QuantkitError(f"{at}: fields are {sorted(record)}, expected {sorted(EXPERT_FIELDS)}")
    for key, kind in EXPERT_FIELDS.items():
        field(record, key, kind, at)
    n = record["experts"]
    tokens, indices = record["tokens"], record["rounded"] + record["skipped"]
    if not all(type(v) is int and v >= 0 for v in (n, record["min_tokens"], *tokens)) or len(tokens) != n \
            or not all(type(e) is int and 0 <= e < n for e in indices):
        raise QuantkitError(f"{at}: expected {n} token counts and expert indices below {n}")
