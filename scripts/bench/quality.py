#!/usr/bin/env python
"""Quality and cost of quantkit on the demo model: perplexity of base, RTN and GPTQ on the same eval tokens.

Each quantization runs as its own `quantkit quantize --json` process (scripts/bench/measure.py), so wall time and
peak RSS are that run's own (peak RSS as the command's JSON reports it). Takes about 5 minutes for SmolLM2-135M
with the defaults on 2 CPU cores.

    python scripts/bench/quality.py MODEL_DIR [--bits 4 --group-size 64 --samples 128 --seq-len 512]
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from measure import QUANTKIT, absolute, run


def run_quantize(model_dir: str, out: str, args, method: str) -> dict:
    cmd = [*QUANTKIT, "quantize", absolute(model_dir), "--out", out, "--overwrite", "--json",
           "--method", method, "--bits", str(args.bits), "--group-size", str(args.group_size),
           "--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    if args.no_true_sequential:
        cmd.append("--no-true-sequential")
    m = run(cmd, Path(out + ".log")).check()
    return {**m.report(), "wall_s": m.wall_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--no-true-sequential", action="store_true")
    p.add_argument("--methods", default="rtn,gptq", help="comma-separated quantize methods to run")
    p.add_argument("--existing", action="append", default=[], metavar="LABEL=DIR",
                   help="also evaluate an already-quantized checkpoint (directory or cached repo id)")
    args = p.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantkit.config import DEFAULT_EVAL
    from quantkit.source.calibration import evaluation_windows
    from quantkit.verification.dequantized import load_dequantized
    from quantkit.verification.metrics import perplexity

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    windows = evaluation_windows(tokenizer, DEFAULT_EVAL, 512, args.eval_tokens)
    rows = []
    base = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    rows.append(("unquantized", perplexity(base, windows), None))
    del base
    with tempfile.TemporaryDirectory() as tmp:
        for method in filter(None, args.methods.split(",")):
            out = os.path.join(tmp, method)
            res = run_quantize(args.model_dir, out, args, method)
            rows.append((method, perplexity(load_dequantized(out), windows), res))
    for item in args.existing:
        label, _, path = item.partition("=")
        rows.append((label, perplexity(load_dequantized(path), windows), None))
    print(f"eval: {windows.numel()} tokens of {DEFAULT_EVAL} ({windows.shape[0]} x 512); "
          f"{args.bits}-bit g{args.group_size} sym; calibration {args.samples} x {args.seq_len}")
    print("| method | perplexity | quantize wall s | peak RSS MB |")
    print("|---|---|---|---|")
    for name, ppl, res in rows:
        cost = f"{res['wall_s']:.0f} | {res['peak_rss_mb']:.0f}" if res else " | "
        print(f"| {name} | {ppl:.2f} | {cost} |")


if __name__ == "__main__":
    main()
