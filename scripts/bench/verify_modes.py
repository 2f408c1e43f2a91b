#!/usr/bin/env python
"""verify's two evaluation paths side by side on one artifact: layer by layer (`--stream on`) and whole models
in memory (`--stream off`), each the whole command in its own process, generations off.

    python scripts/bench/verify_modes.py QUANTIZED --base BASE [--max-tokens 16384] [--seq-len 512] [--work DIR]

Prints wall time and peak RSS (scripts/bench/measure.py) and the metrics of each, and how far the metrics differ.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from measure import QUANTKIT, absolute, run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("quantized")
    ap.add_argument("--base", required=True)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--work", type=Path, default=Path("/tmp/quantkit-verify-modes"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = {}
    for mode in ("on", "off"):
        cmd = [*QUANTKIT, "verify", absolute(args.quantized), "--base", absolute(args.base), "--stream", mode,
               "--no-generate", "--max-tokens", str(args.max_tokens), "--seq-len", str(args.seq_len), "--json",
               "--max-ppl-ratio", "1000", "--max-kl", "1000", "--min-top1", "0"]
        m = run(cmd, (args.work / f"verify-stream-{mode}.log").resolve()).check()
        r = m.report()
        rows[mode] = {"wall_s": round(m.wall_s, 1), "peak_rss_mb": round(m.peak_rss_mb), "base_ppl": r["base"]["ppl"],
                      "quantized_ppl": r["quantized"]["ppl"], "kl_mean": r["kl_mean"],
                      "top1": r["top1_agreement"], "tokens": r["tokens"]}
        print(json.dumps({"stream": mode, **rows[mode]}), flush=True)
    on, off = rows["on"], rows["off"]
    print("\n| path | wall s | peak RSS MB | base ppl | quantized ppl | KL mean | top-1 |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for mode, label in (("on", "layer by layer (--stream on)"), ("off", "whole models (--stream off)")):
        r = rows[mode]
        print(f"| {label} | {r['wall_s']} | {r['peak_rss_mb']} | {r['base_ppl']:.6f} | {r['quantized_ppl']:.6f} | "
              f"{r['kl_mean']:.6f} | {r['top1']:.4f} |")
    print(f"\nrelative difference: quantized ppl {abs(on['quantized_ppl'] / off['quantized_ppl'] - 1):.2e}, base ppl "
          f"{abs(on['base_ppl'] / off['base_ppl'] - 1):.2e}; KL absolute {abs(on['kl_mean'] - off['kl_mean']):.2e}; "
          f"{on['tokens']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
