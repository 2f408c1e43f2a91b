#!/usr/bin/env python
"""Perplexity of GPTQ variants and round-to-nearest on the same evaluation tokens, in one process.

Usage: python scripts/compare_variants.py MODEL_DIR [VARIANT ...]
Variants: rtn default actorder actorder-static no-trueseq (4-bit, group 64, sym; 16 x 256 calibration tokens;
8 x 512 evaluation tokens of pydocs-eval). Outputs go to a temporary directory.
"""
import sys
import tempfile
import time

from transformers import AutoTokenizer

from quantkit.config import CalibSpec, QuantSpec
from quantkit.run.pipeline import quantize
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
    model_dir, names = sys.argv[1], sys.argv[2:] or ["rtn", "no-actorder", "actorder"]
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
