#!/usr/bin/env python
"""quantkit against llm-compressor on one NVIDIA GPU, on a 7B-shaped synthetic checkpoint, side by side.

    python scripts/bench/gpu.py --work /tmp/bench-gpu --layers 8 --tools quantkit,llmcompressor
    python scripts/bench/gpu.py --work /tmp/bench-gpu --layers 32 --tools quantkit,quantkit-noprefetch
    python scripts/bench/gpu.py --work /tmp/bench-gpu --shape llama-2-70b --layers 3 --tools quantkit --gpu-mem-cap 24

Tools: quantkit; quantkit-noprefetch (the same with QUANTKIT_PREFETCH=0: each layer read when it starts, not
while the previous one computes); llmcompressor. --gpu-mem-cap GB caps torch's allocations on the GPU at GB
(10^9 bytes; torch.cuda.set_per_process_memory_fraction), as a card of that size would. Beside the measured
peaks it prints what `quantkit estimate` says for the same checkpoint and calibration (GPU allocation, nvidia-smi,
host) and the ratio of each.

Writes the checkpoint (random weights: GPTQ's cost does not depend on their values) with the numbers drawn on
the GPU, tokenizes the calibration windows once, then runs each tool in its own process on those tokens:
wall clock and peak RSS of the whole command (imports included, scripts/bench/measure.py), the tool's own peak of
torch allocations on the GPU, and the GPU's used memory sampled every 100 ms by nvidia-smi (CUDA context included).
Perplexity is not compared: the weights are random. Prints a markdown table and writes it with the raw figures
to WORK/bench_gpu.{md,json}. llm-compressor must be importable by --llmcompressor-python. On an H200, 32 layers
take about 2 minutes for quantkit and 3 to 4 for llm-compressor, plus writing the 13.5 GB checkpoint once
(it is kept in WORK and reused).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from measure import bench_env, run

ROOT = Path(__file__).resolve().parents[2]
RUNNERS = Path(__file__).resolve().parent / "peer_runners"
sys.path.insert(0, str(ROOT))  # quantkit from this checkout where it is not installed (a bare GPU machine)


# quantkit's own quantize() as the command line calls it, with its per-layer log on stderr and the result as the
# last line (`quantkit quantize --json` would silence the log)
QUANTKIT_RUN = """
import json, logging, sys
from quantkit import CalibSpec, QuantSpec, quantize
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
model, out, device, samples, seq_len, bits, group, cap_gb = sys.argv[1:]
if float(cap_gb) > 0 and device == "cuda":  # the --device cpu dry run has no GPU to cap
    import torch
    torch.cuda.set_per_process_memory_fraction(float(cap_gb) * 1e9 / torch.cuda.get_device_properties(0).total_memory)
r = quantize(model, QuantSpec(bits=int(bits), group_size=int(group)),
             CalibSpec(samples=int(samples), seq_len=int(seq_len)), out=out, overwrite=True, device=device)
print(json.dumps(r.to_dict()))
"""


class GpuMemorySampler:
    """Peak of nvidia-smi's memory.used (MiB) on GPU 0 while the block runs."""

    def __init__(self, interval_ms: int = 100):
        self.cmd = ["nvidia-smi", "--id=0", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                    f"-lms={interval_ms}"]
        self.peak = 0

    def __enter__(self):
        try:
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, text=True)
        except FileNotFoundError:  # no NVIDIA driver (the --device cpu dry run)
            self.proc, self.peak = None, None
            return self
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            if line.strip().isdigit():
                self.peak = max(self.peak, int(line))

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            self.thread.join(timeout=5)


def run_tool(cmd: list[str], log: Path, env: dict, timeout: float) -> dict:
    """Wall seconds, peak RSS and peak GPU memory of one tool's whole command; its last JSON line on stdout."""
    with GpuMemorySampler() as gpu:
        m = run(cmd, log, env, timeout)
    lines, reported = m.lines(), m.report()
    stage_peaks = {}  # quantkit's per-stage peaks (its layer reports), the largest over the layers
    stage_seconds: dict[str, float] = {}  # and the seconds of each stage, summed over the layers after the first
    layers = reported.get("layers", [])
    for layer in layers:
        for stage, mb in layer.get("stage_peak_gpu_mb", {}).items():
            stage_peaks[stage] = max(stage_peaks.get(stage, 0), mb)
    for layer in layers[1:]:
        for stage, seconds in layer.get("stage_seconds", {}).items():
            stage_seconds[stage] = round(stage_seconds.get(stage, 0) + seconds, 2)
    later = sorted(layer["seconds"] for layer in layers[1:])
    return {"rc": m.rc, "wall_s": round(m.wall_s, 1), "peak_rss_mb": round(m.peak_rss_mb),
            "peak_gpu_smi_mb": gpu.peak, "peak_gpu_torch_mb": reported.get("peak_gpu_mb"),
            "peak_gpu_torch_mb_by_stage": stage_peaks, "layer_s_median": later[len(later) // 2] if later else None,
            "stage_s_after_first": stage_seconds, "log_tail": lines[-15:] if m.rc else []}


def estimated(model: Path, args: argparse.Namespace, env: dict) -> dict:
    """`quantkit estimate` of the checkpoint for this calibration, one GPU: bytes of each figure."""
    cmd = [sys.executable, "-m", "quantkit", "estimate", str(model), "--bits", str(args.bits), "--group-size",
           str(args.group_size), "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--device", "cuda",
           "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    mode = json.loads(out)["quantize"]["modes"][0]
    return {"gpu_allocated": mode["gpu_allocated"], "gpu_total": mode["gpu_total"], "host": mode["host"]}


def layer_bound_mb(config: dict, tokens_per_batch: int) -> dict:
    """One layer's weights (bf16), its Hessians (float32, one per distinct input) and one batch of activations."""
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = h * config.get("num_key_value_heads", config["num_attention_heads"]) // config["num_attention_heads"]
    weights = 2 * (h * (h + 2 * kv) + h * h + 3 * h * i)
    hessians = 4 * (3 * h * h + i * i)  # q/k/v, o_proj, gate/up read hidden-wide inputs; down_proj intermediate
    batch = 2 * tokens_per_batch * (h + i)  # the hidden states and the widest intermediate, bf16
    return {k: round(v / 2**20) for k, v in
            {"weights": weights, "hessians": hessians, "batch": batch, "total": weights + hessians + batch}.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--shape", default="llama-2-7b")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--tools", default="quantkit,llmcompressor")
    ap.add_argument("--llmcompressor-python", default=sys.executable)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per tool before it is killed")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of this script")
    ap.add_argument("--gpu-mem-cap", type=float, default=0, help="GB (10^9 bytes) torch may allocate on the GPU")
    args = ap.parse_args()

    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from quantkit.calibrate.batch import calibration_batch_size
    from quantkit.config import CalibSpec
    from quantkit.source.calibration import calibration_batch
    from quantkit.tools.synthetic import shape_config, write_synthetic_checkpoint

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = work / f"{args.shape}-{args.layers}l"
    config = shape_config(args.shape, args.layers)
    if not (model / "config.json").is_file():
        t = time.perf_counter()
        size = write_synthetic_checkpoint(model, config, torch.bfloat16, device=args.device)
        print(f"wrote {model}: {size / 2**30:.1f} GiB in {time.perf_counter() - t:.0f} s", flush=True)
    ids = calibration_batch(AutoTokenizer.from_pretrained(str(model)),
                            CalibSpec(samples=args.samples, seq_len=args.seq_len))
    save_file({"input_ids": ids.contiguous()}, str(work / "calib.safetensors"))
    env = bench_env(PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    q = ["--bits", str(args.bits), "--group-size", str(args.group_size)]
    commands = {  # quantkit tokenizes the same windows itself (same function, same seed)
        "quantkit": lambda out: [sys.executable, "-c", QUANTKIT_RUN, str(model), str(out), args.device,
                                 str(args.samples), str(args.seq_len), str(args.bits), str(args.group_size),
                                 str(args.gpu_mem_cap)],
        "llmcompressor": lambda out: [args.llmcompressor_python, str(RUNNERS / "llmcompressor_gptq.py"),
                                      str(model), str(work / "calib.safetensors"), str(out), *q],
    }
    commands["quantkit-noprefetch"] = commands["quantkit"]
    envs = {"quantkit-noprefetch": {**env, "QUANTKIT_PREFETCH": "0"}}
    rows = {}
    for tool in args.tools.split(","):
        rows[tool] = run_tool(commands[tool](work / f"{tool}-{args.layers}l"), work / f"{tool}-{args.layers}l.log",
                              envs.get(tool, env), args.timeout)
        print(tool, json.dumps(rows[tool]), flush=True)
    estimate = estimated(model, args, env)
    print("estimate", json.dumps(estimate), flush=True)
    bound = layer_bound_mb(config, calibration_batch_size(ids.shape[1], torch.device("cuda")) * args.seq_len)
    table = render(rows, bound, estimate, args,
                   torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU (dry run)")
    print(table)
    (work / "bench_gpu.md").write_text(table + "\n")
    (work / "bench_gpu.json").write_text(json.dumps({"rows": rows, "bound_mb": bound, "estimate": estimate,
                                                     "args": vars(args)}, default=str, indent=1))
    return 0 if all(r["rc"] == 0 for r in rows.values()) else 1


def render(rows: dict, bound: dict, estimate: dict, args, gpu: str) -> str:
    cap = f", torch's allocations capped at {args.gpu_mem_cap:g} GB" if args.gpu_mem_cap else ""
    lines = [f"{gpu}, {args.shape} shape with {args.layers} layers (bf16, random weights), {args.bits}-bit group "
             f"{args.group_size} symmetric, {args.samples} x {args.seq_len} calibration tokens{cap}, "
             f"measured {time.strftime('%Y-%m-%d')} by `scripts/bench/gpu.py --layers {args.layers}`.", "",
             "| tool | exit | wall s | layer s (median after the first) | peak GPU MB (torch) "
             "| peak GPU MB (nvidia-smi) | peak RSS MB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for tool, r in rows.items():
        lines.append(f"| {tool} | {r['rc']} | {r['wall_s']:.0f} | {r.get('layer_s_median') or '?'} | "
                     f"{r['peak_gpu_torch_mb'] or '?'} | {r['peak_gpu_smi_mb']} | {r['peak_rss_mb']} |")

    def ended_well(*tools: str) -> bool:  # each tool ran and exited 0: only then are its figures compared
        return all(tool in rows and rows[tool]["rc"] == 0 for tool in tools)

    qk = rows.get("quantkit")
    if ended_well("quantkit"):
        measured = {"gpu_allocated": (qk["peak_gpu_torch_mb"] or 0) * 2**20,
                    "gpu_total": (qk["peak_gpu_smi_mb"] or 0) * 2**20, "host": qk["peak_rss_mb"] * 2**20}
        lines += ["", "| quantkit | measured MiB | `quantkit estimate` MiB | estimated / measured |",
                  "|---|---:|---:|---:|"]
        for key, label in (("gpu_allocated", "GPU allocation"), ("gpu_total", "nvidia-smi"), ("host", "host RSS")):
            ratio = f"{estimate[key] / measured[key]:.2f}" if measured[key] else "?"
            lines.append(f"| {label} | {measured[key] / 2**20:.0f} | {estimate[key] / 2**20:.0f} | {ratio} |")
        lines.append("quantkit's seconds by stage, layers after the first: "
                     + ", ".join(f"{stage} {s}" for stage, s in qk["stage_s_after_first"].items()) + ".")
    lines += ["", f"One layer's weights {bound['weights']} MB + Hessians {bound['hessians']} MB + one batch of "
              f"activations {bound['batch']} MB = {bound['total']} MB."]
    by_stage = rows.get("quantkit", {}).get("peak_gpu_torch_mb_by_stage")
    if by_stage:
        lines.append("quantkit's peak GPU MB (torch) by stage of a layer, the largest over the layers: "
                     + ", ".join(f"{stage} {mb:.0f}" for stage, mb in by_stage.items()) + ".")
    if ended_well("quantkit", "quantkit-noprefetch"):
        lines.append(f"quantkit reading each next layer ahead / reading it when it starts: wall time "
                     f"{rows['quantkit']['wall_s'] / rows['quantkit-noprefetch']['wall_s']:.2f}x.")
    if ended_well("quantkit", "llmcompressor"):
        qk, lc = rows["quantkit"], rows["llmcompressor"]
        lines.append(f"quantkit / llm-compressor: wall time {qk['wall_s'] / lc['wall_s']:.2f}x, peak GPU (torch) "
                     + (f"{qk['peak_gpu_torch_mb'] / lc['peak_gpu_torch_mb']:.2f}x"
                        if qk["peak_gpu_torch_mb"] and lc["peak_gpu_torch_mb"] else "?") + ".")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
