#!/usr/bin/env python
"""Peak memory against depth, on random-weight checkpoints of a real architecture's shape.

    python scripts/bench/depth.py --shape llama-2-7b --layers 2,8 --samples 8 --seq-len 512 --work /tmp/depth

For each layer count it writes the checkpoint (scripts/dev/make_synthetic_checkpoint.py; kept in --work and
reused), runs the whole `quantkit quantize` command in its own process, and prints wall time, seconds per layer
(from the command's JSON report) and peak RSS (scripts/bench/measure.py, imports included), then how far the peaks
differ. GPTQ's cost does not depend on the weights' values, so random weights measure what a real checkpoint would.
At the 7B shape a layer takes about 35 s on a CPU with AVX512-BF16 (about 4 minutes on 2 AVX2 cores): 2 and 8
layers take about 7 minutes there, plus writing the checkpoints (3.5 GB at 8 layers).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from measure import QUANTKIT, bench_env, run

MAKE_CHECKPOINT = Path(__file__).resolve().parents[1] / "dev" / "make_synthetic_checkpoint.py"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-2-7b")
    ap.add_argument("--layers", default="2,8", help="comma-separated layer counts")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, required=True, help="checkpoints, outputs and logs (tens of GB at 7B)")
    args = ap.parse_args()

    args.work = args.work.resolve()  # the commands run inside it
    args.work.mkdir(parents=True, exist_ok=True)
    env = bench_env()
    rows = []
    for n in [int(x) for x in args.layers.split(",")]:
        ckpt = args.work / f"{args.shape}-{n}l"
        if not (ckpt / "config.json").is_file():
            subprocess.run([sys.executable, str(MAKE_CHECKPOINT), str(ckpt), "--shape", args.shape, "--layers", str(n)],
                           check=True, env=env)
        cmd = [*QUANTKIT, "quantize", str(ckpt), "--out", str(args.work / f"out-{n}l"),
               "--overwrite", "--json", "--samples", str(args.samples), "--seq-len", str(args.seq_len),
               "--bits", str(args.bits), "--group-size", str(args.group_size), "--device", args.device]
        m = run(cmd, args.work / f"quantize-{n}l.log", env).check()
        per_layer = [layer["seconds"] for layer in m.report()["layers"]]
        rows.append({"layers": n, "wall_s": m.wall_s, "s_per_layer": statistics.mean(per_layer),
                     "peak_rss_mb": m.peak_rss_mb})
        print(json.dumps(rows[-1]), flush=True)

    first = rows[0]["peak_rss_mb"]
    print(f"\n{args.shape} shape, {args.samples} x {args.seq_len} calibration tokens, {args.bits}-bit "
          f"g{args.group_size}, --device {args.device}\n")
    print("| layers | wall s | s per layer | peak RSS MB | peak / first |\n|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layers']} | {r['wall_s']:.0f} | {r['s_per_layer']:.1f} | {r['peak_rss_mb']:.0f} | "
              f"{r['peak_rss_mb'] / first:.3f} |")
    spread = max(r["peak_rss_mb"] for r in rows) / min(r["peak_rss_mb"] for r in rows) - 1
    print(f"\npeaks differ by {100 * spread:.1f}% (the Performance issue's bound: 15%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
