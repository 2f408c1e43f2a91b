#!/usr/bin/env python
"""verify layer by layer against depth and size, on random-weight checkpoints of a real architecture's shape.

    python scripts/bench/verify_stream.py --shape llama-3-8b --layers 2,8 --tokens 2048 --seq-len 512 \\
        --device cpu --work /tmp/vstream

For each layer count it writes the base checkpoint (scripts/dev/make_synthetic_checkpoint.py, kept in --work and
reused) and a round-to-nearest 4-bit g128 GPTQ copy of it (`quantkit quantize --method rtn`, seconds), then runs
`verify(..., stream="on")` in a process of its own and prints its wall time, seconds per decoder layer (both
models, all windows, from verify's progress), peak RSS (VmHWM) and, on a GPU, the peak allocation
(torch.cuda.max_memory_allocated) and the largest per-layer allocation peak. With --gpu-mem-fraction the
process's CUDA memory is capped (torch.cuda.set_per_process_memory_fraction), to show that a run fits a smaller
card. The evaluation text is the built-in pydocs-eval, whatever the synthetic tokenizer makes of it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from measure import QUANTKIT, bench_env

MAKE_CHECKPOINT = Path(__file__).resolve().parents[1] / "dev" / "make_synthetic_checkpoint.py"

CHILD = r"""
import json, sys, time
import torch
from quantkit.verification.api import verify
from quantkit.verification.report import Thresholds
q, base, device, seq_len, tokens, fraction = sys.argv[1:7]
if device == "cuda" and float(fraction) < 1:
    torch.cuda.set_per_process_memory_fraction(float(fraction))
starts, layer_peaks = {}, []
def progress(stage, done, total):
    if stage != "evaluating layer by layer":
        return
    now = time.perf_counter()
    if done > 0 and device == "cuda":
        layer_peaks.append(torch.cuda.max_memory_allocated() / 2**20)
        torch.cuda.reset_peak_memory_stats()
    starts[done] = now
t0 = time.perf_counter()
r = verify(q, base, stream="on", device=device, seq_len=int(seq_len), max_tokens=int(tokens), generate=False,
           thresholds=Thresholds(None, None, None), progress=progress)
wall = time.perf_counter() - t0
n = len(r.layer_errors)
per_layer = (starts[n] - starts[0]) / n if n in starts and 0 in starts else None
hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
print(json.dumps({"wall_s": round(wall, 1), "s_per_layer": per_layer and round(per_layer, 2),
                  "peak_rss_mb": round(hwm), "gpu_layer_peak_mb": round(max(layer_peaks)) if layer_peaks else None,
                  "tokens": r.tokens, "kl_mean": r.kl_mean, "ppl_ratio": r.ppl_ratio}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3-8b")
    ap.add_argument("--layers", default="2,8", help="comma-separated layer counts")
    ap.add_argument("--tokens", type=int, default=2048, help="evaluation tokens (whole windows)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--gpu-mem-fraction", type=float, default=1.0)
    ap.add_argument("--work", type=Path, required=True, help="checkpoints and outputs (GBs at 8B and up)")
    args = ap.parse_args()

    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    env = bench_env()
    rows = []
    for n in [int(x) for x in args.layers.split(",")]:
        base = args.work / f"{args.shape}-{n}l"
        if not (base / "config.json").is_file():
            subprocess.run([sys.executable, str(MAKE_CHECKPOINT), str(base), "--shape", args.shape, "--layers", str(n),
                            "--device", args.device], check=True, env=env)
        q = args.work / f"{args.shape}-{n}l-rtn"
        if not (q / "config.json").is_file():
            subprocess.run([*QUANTKIT, "quantize", str(base), "--out", str(q), "--method", "rtn", "--bits", "4",
                            "--group-size", "128", "--device", args.device], check=True, env=env,
                           stdout=subprocess.DEVNULL)
        proc = subprocess.run([sys.executable, "-c", CHILD, str(q), str(base), args.device, str(args.seq_len),
                               str(args.tokens), str(args.gpu_mem_fraction)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append({"layers": n, **json.loads(proc.stdout.splitlines()[-1])})
        print(json.dumps(rows[-1]), flush=True)

    print(f"\n{args.shape} shape, {args.tokens} tokens in windows of {args.seq_len}, --device {args.device}"
          + (f", CUDA memory capped at {args.gpu_mem_fraction:.0%}" if args.gpu_mem_fraction < 1 else "") + "\n")
    print("| layers | wall s | s per layer | peak RSS MB | GPU peak per layer MB | tokens |\n"
          "|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layers']} | {r['wall_s']} | {r['s_per_layer']} | {r['peak_rss_mb']} | "
              f"{r['gpu_layer_peak_mb'] or '-'} | {r['tokens']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
