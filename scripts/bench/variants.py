#!/usr/bin/env python
"""Perplexity of GPTQ variants and round-to-nearest on the same evaluation tokens, in one process.

    python scripts/bench/variants.py MODEL_DIR [VARIANT ...]

4-bit, group 64, sym; 16 x 256 calibration tokens; 8 x 512 evaluation tokens of pydocs-eval. Outputs go to a
temporary directory. Prints each variant's perplexity and its seconds (quantize and evaluation). Takes 0.5 to
2.5 minutes a variant for SmolLM2-135M on 2 CPU cores (RTN the fastest, GPTQ with clip search the slowest).
"""
import argparse
import tempfile
import time

from transformers import AutoTokenizer

from quantkit import CalibSpec, QuantSpec, quantize
from quantkit.source.calibration import evaluation_windows
from quantkit.verification.dequantized import load_dequantized
from quantkit.verification.metrics import perplexity

VARIANTS = {
    "default": QuantSpec(group_size=64),
    "actorder": QuantSpec(group_size=64, act_order=True),
    "no-actorder": QuantSpec(group_size=64, act_order=False),
    "actorder-static": QuantSpec(group_size=64, act_order=True, static_groups=True),
    "no-trueseq": QuantSpec(group_size=64, true_sequential=False),
    "rtn": QuantSpec(group_size=64, method="rtn"),
    "rtn-clip": QuantSpec(group_size=64, method="rtn", clip_search=True),
    "actorder-clip": QuantSpec(group_size=64, act_order=True, clip_search=True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("variants", nargs="*", metavar="VARIANT",
                    help=f"any of {', '.join(VARIANTS)} (default: rtn no-actorder actorder)")
    args = ap.parse_args()
    if unknown := [v for v in args.variants if v not in VARIANTS]:
        ap.error(f"unknown variant {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    model_dir, names = args.model_dir, args.variants or ["rtn", "no-actorder", "actorder"]
    windows = evaluation_windows(AutoTokenizer.from_pretrained(model_dir), "pydocs-eval", 512, 8 * 512)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            t0 = time.perf_counter()
            out = f"{tmp}/{name}"
            quantize(model_dir, VARIANTS[name], CalibSpec(samples=16, seq_len=256), out=out)
            print(f"{name}: perplexity {perplexity(load_dequantized(out), windows):.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
