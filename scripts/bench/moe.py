#!/usr/bin/env python
"""Mixture-of-Experts quantization at real shapes: seconds per layer and peak memory, on random-weight checkpoints.

    python scripts/bench/moe.py --shape qwen3-30b-a3b --layers 1 --samples 16 --seq-len 256 --chunks 0,16 \
        --work /tmp/moe
    python scripts/bench/moe.py --shape qwen3-30b-a3b,mixtral-8x7b --layers 3 --samples 128 --seq-len 2048 \\
        --device cuda --work /tmp/moe           # the device run: 128 x 2048 calibration tokens

For each shape it writes the checkpoint once (bfloat16, scripts/dev/make_synthetic_checkpoint.py in its own
process; kept in --work and reused), then for each --chunks value runs the whole `quantkit quantize --expert-chunk
N` command in its own process and prints the seconds of each layer and the command's own peak RSS (imports
included) from its JSON report, and on a GPU its peak GPU memory. This script stays small (it imports neither
torch nor quantkit): a child's getrusage peak starts at its parent's size. Random weights route tokens about
evenly, which is what a real model's load-balanced router does on average. A Qwen3-30B-A3B layer is 1.2 GB of
bfloat16 (128 experts of 2048 -> 768), a Mixtral-8x7B layer 2.8 GB (8 experts of 4096 -> 14336).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from measure import QUANTKIT, bench_env, run

ROOT = Path(__file__).resolve().parents[2]  # quantkit from this checkout where it is not installed (a bare GPU machine)
MAKE_CHECKPOINT = ROOT / "scripts" / "dev" / "make_synthetic_checkpoint.py"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-30b-a3b", help="comma-separated built-in MoE shapes")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--chunks", default="0", help="comma-separated --expert-chunk values (0: automatic)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, required=True, help="checkpoints, outputs and logs")
    args = ap.parse_args()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    env = bench_env(PYTHONPATH=str(ROOT))
    for shape in args.shape.split(","):
        base = args.work / f"{shape}-{args.layers}l"
        if not (base / "config.json").exists():
            subprocess.run([sys.executable, str(MAKE_CHECKPOINT), str(base), "--shape", shape, "--layers",
                            str(args.layers), "--device", "cuda" if args.device == "cuda" else "cpu"],
                           check=True, env=env)
        for chunk in args.chunks.split(","):
            out = args.work / f"{shape}-q{chunk}"
            cmd = [*QUANTKIT, "quantize", str(base), "--out", str(out), "--overwrite", "--bits", str(args.bits),
                   "--group-size", str(args.group_size), "--samples", str(args.samples), "--seq-len",
                   str(args.seq_len), "--device", args.device, "--expert-chunk", chunk, "--json"]
            m = run(cmd, args.work / f"{shape}-q{chunk}.log", env=env).check()
            report = m.report()
            layers = report.get("layers", [])
            print(json.dumps({
                "shape": shape, "expert_chunk": int(chunk), "layers": args.layers,
                "tokens": f"{args.samples} x {args.seq_len}", "device": args.device,
                "wall_s": round(m.wall_s, 1), "peak_rss_mb": round(report.get("peak_rss_mb", m.peak_rss_mb)),
                "peak_gpu_mb": report.get("peak_gpu_mb"),
                "seconds_per_layer": [r["seconds"] for r in layers],
                "stage_seconds": [r.get("stage_seconds") for r in layers],
                "rounded_experts": [sum(len(b["rounded"]) for b in r.get("experts", {}).values()) for r in layers]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
