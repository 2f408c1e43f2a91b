#!/usr/bin/env python
"""GPTQ against GPTAQ (`quantize --gptaq`) on one model, side by side in one run: the same calibration and
evaluation tokens, each quantize in its own process (wall time and peak RSS from scripts/bench/measure.py,
imports included), each output verified against the base (`quantkit verify --json`, default evaluation: 32 x 512
pydocs-eval tokens).

    python scripts/bench/gptaq.py demo/SmolLM2-135M-Instruct --work /tmp/bench-gptaq [--rounds 1]

Rounds alternate the two methods; the table gives the median time and the largest peak per method. A round takes
about 8 minutes for SmolLM2-135M on 2 CPU cores (GPTQ about 3, GPTAQ about 5), plus a minute per verify.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from measure import QUANTKIT, bench_env, quantkit_json, run

METHODS = {"gptq": [], "gptaq": ["--gptaq"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    args.work = args.work.resolve()  # the commands run inside it
    args.work.mkdir(parents=True, exist_ok=True)
    env = bench_env()
    runs: dict[str, list[tuple[float, float]]] = {m: [] for m in METHODS}
    for r in range(args.rounds):
        for method, flags in METHODS.items():
            out = args.work / method
            cmd = [*QUANTKIT, "quantize", str(args.model.resolve()), "--bits", str(args.bits), "--group-size",
                   str(args.group_size), "--out", str(out), "--overwrite", *flags]
            m = run(cmd, args.work / f"{method}-{r}.log", env).check()
            runs[method].append((m.wall_s, m.peak_rss_mb))
            print(f"round {r + 1} {method}: {runs[method][-1][0]:.1f} s, {runs[method][-1][1]:.0f} MB", flush=True)
    rows = []
    for method in METHODS:
        # exit 1 = a threshold failed: still a measurement
        v = quantkit_json(["verify", str(args.work / method), "--base", str(args.model.resolve()), "--no-generate"],
                          env, ok=(0, 1))
        rows.append((method, statistics.median(t for t, _ in runs[method]), max(m for _, m in runs[method]), v))
    print(f"\n{args.bits}-bit g{args.group_size} sym, {args.model.name}, {args.rounds} round(s)")
    print("| method | wall s | peak RSS MB | perplexity | ratio | KL mean | KL p99 | top-1 | verify (defaults) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for method, wall, rss, v in rows:
        print(f"| {method} | {wall:.0f} | {rss:.0f} | {v['quantized']['ppl']:.3f} | {v['ppl_ratio']:.4f} | "
              f"{v['kl_mean']:.4f} | {v['kl_p99']:.3f} | {v['top1_agreement']:.4f} | "
              f"{'PASSED' if v['passed'] else 'FAILED'} |")
    (plain_wall, plain_rss), (aq_wall, aq_rss) = [(w, m) for _, w, m, _ in rows]
    kl = rows[1][3]["kl_mean"] / rows[0][3]["kl_mean"]
    print(f"\ngptaq / gptq: wall time {aq_wall / plain_wall:.2f}x, peak RSS {aq_rss / plain_rss:.2f}x, "
          f"KL mean {kl:.2f}x; unquantized perplexity {rows[0][3]['base']['ppl']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
