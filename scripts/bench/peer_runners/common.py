"""Shared by the peer runners (imported from their own folder; the peers' environments lack quantkit)."""
import argparse


def parse_args(description: str):
    """(args, calibration input_ids [n, seq_len]) for: MODEL_DIR CALIB.safetensors OUT_DIR --bits --group-size."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("calib", help="safetensors file with input_ids [n, seq_len]")
    ap.add_argument("out")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    args = ap.parse_args()
    from safetensors.torch import load_file

    return args, load_file(args.calib)["input_ids"]
