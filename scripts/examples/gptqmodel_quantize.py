"""Quantize a model with GPTQModel (another tool), to show `quantkit verify` checking an artifact quantkit did not
make. Calibration: quantkit's built-in pydocs-calib windows, so the two tools see the same text.

    python scripts/examples/gptqmodel_quantize.py BASE OUT [--method awq|gptq] [--samples 32] [--seq-len 256]

AWQ runs GPTQModel's pure-torch AWQ path on the CPU (BACKEND.AWQ_TORCH); both write safetensors with a
quantization_config that transformers, vLLM and quantkit read.
"""
import argparse
import contextlib
import os
import sys
import time

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base")
    ap.add_argument("out")
    ap.add_argument("--method", choices=("awq", "gptq"), default="awq")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from quantkit.config import CalibSpec
    from quantkit.source.calibration import calibration_batch

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    ids = calibration_batch(tokenizer, CalibSpec(samples=args.samples, seq_len=args.seq_len))
    rows = [{"input_ids": r.tolist(), "attention_mask": [1] * r.numel()} for r in ids]
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # GPTQModel logs on stdout
        from gptqmodel import GPTQModel, QuantizeConfig
        from gptqmodel.utils.backend import BACKEND

        extra = {"quant_method": "awq", "format": "gemm"} if args.method == "awq" else {}
        config = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=args.method == "gptq", **extra)
        model = GPTQModel.load(args.base, config, device="cpu")
        model.quantize(rows, batch_size=1, **({"backend": BACKEND.AWQ_TORCH} if args.method == "awq" else {}))
        model.save(args.out)
    print(f"GPTQModel {args.method}: wrote {args.out} ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
