"""GPTQModel's GPTQ on given calibration tokens (run inside the gptqmodel benchmark environment).

    python gptqmodel_gptq.py MODEL_DIR CALIB.safetensors OUT_DIR --bits 4 --group-size 64
"""
import argparse

from safetensors.torch import load_file

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("calib", help="safetensors file with input_ids [n, seq_len]")
ap.add_argument("out")
ap.add_argument("--bits", type=int, default=4)
ap.add_argument("--group-size", type=int, default=64)
args = ap.parse_args()

from gptqmodel import GPTQModel, QuantizeConfig  # noqa: E402

ids = load_file(args.calib)["input_ids"]
samples = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in ids]
config = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=True)  # its defaults for everything else
model = GPTQModel.load(args.model, config, device="cpu")
model.quantize(samples, batch_size=1)
model.save(args.out)
