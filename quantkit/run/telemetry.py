"""Where a run's time and memory go: seconds and GPU peaks per stage of a layer, the process's peak memory, the
progress bar and the per-layer log line."""
from __future__ import annotations

import logging
import resource
import sys
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger("quantkit")


def peak_rss_mb() -> float:
    """Peak resident set size of this process's own memory: Linux's VmHWM, not getrusage's ru_maxrss, which
    carries over the parent's size at fork through exec (quantize started from a large Python process would report
    that process's size). Elsewhere ru_maxrss (KiB on Linux and BSDs)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class GpuPeaks:
    """torch's peak GPU allocation per stage of a layer, its counter reset as each stage ends, and over the whole
    run: where a run's GPU memory goes. Inert on a CPU."""

    def __init__(self, dev: torch.device) -> None:
        self.dev, self.overall = dev, 0
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)

    def take(self) -> float | None:
        """MB at the peak since the last call (or the start), then a fresh count; None on a CPU."""
        if self.dev.type != "cuda":
            return None
        peak = torch.cuda.max_memory_allocated(self.dev)
        torch.cuda.reset_peak_memory_stats(self.dev)
        self.overall = max(self.overall, peak)
        return round(peak / 2**20, 1)

    def overall_mb(self) -> float | None:
        if self.dev.type != "cuda":
            return None
        return round(max(self.overall, torch.cuda.max_memory_allocated(self.dev)) / 2**20, 1)


class StageClock:
    """Seconds per step of a layer (load, forward + Hessians, solve, propagate): where a run's time goes; on a GPU
    also each step's peak allocation (gpu_mb; the load's includes whatever ran since the last layer)."""

    def __init__(self, dev: torch.device, load: float, gpu_peaks: GpuPeaks) -> None:
        self.dev, self.t = dev, load
        self.seconds: dict[str, float] = {}
        self.gpu_peaks = gpu_peaks
        self.gpu_mb: dict[str, float] = {}
        self.lap("load")

    def lap(self, stage: str) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)  # else the GPU's queued work is billed to a later stage
        now = time.perf_counter()
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + now - self.t, 3)
        self.t = now
        peak = self.gpu_peaks.take()
        if peak is not None:
            self.gpu_mb[stage] = max(self.gpu_mb.get(stage, 0.0), peak)


def progress_bar(total: int, enabled: bool) -> tqdm:
    """A per-step tqdm bar on stderr, shown only when enabled and stderr is a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, desc="GPTQ", unit="layer", disable=not (enabled and sys.stderr.isatty()))


def log_layer(i: int, n_layers: int, report: dict, stages: StageClock) -> None:
    """One line per finished layer: each Linear's loss (a Mixture-of-Experts block's summed over its experts, with
    the experts rounded to nearest for want of calibration tokens), the layer's seconds per stage and, on a GPU,
    its peak."""
    blocks = report.get("experts", {})
    dense = {n: v for n, v in report["losses"].items() if not any(n.startswith(f"{b}.") for b in blocks)}
    parts = [f"{n.split('.')[-1]}={v:.4g}" for n, v in dense.items()]
    for block, facts in blocks.items():
        loss = sum(v for n, v in report["losses"].items() if n.startswith(f"{block}."))
        rounded, skipped = facts["rounded"], facts["skipped"]
        counted = [t for e, t in enumerate(facts["tokens"]) if e not in skipped]
        parts.append(f"{block}: {facts['experts']} experts, loss={loss:.4g}, tokens {min(counted)}-{max(counted)}"
                     + (f", {len(rounded)} rounded to nearest (fewer than {facts['min_tokens']} tokens): "
                        f"{' '.join(map(str, rounded))}" if rounded else "")
                     + (f", {len(skipped)} kept in float (--skip)" if skipped else ""))
    log.info("layer %d/%d  %s  (%.1fs: %s)%s", i + 1, n_layers, "  ".join(parts), report["seconds"],
             " ".join(f"{k} {v:.1f}" for k, v in stages.seconds.items()),
             f"  peak GPU {max(stages.gpu_mb.values()):.0f} MB" if stages.gpu_mb else "")
