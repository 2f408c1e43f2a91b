"""GPTQModel's GPTQ on given calibration tokens (run inside the gptqmodel benchmark environment).

Takes about 5 minutes for SmolLM2-135M on 128 x 512 tokens and 2 CPU cores. Used by scripts/bench/peers.py:

    python gptqmodel_gptq.py MODEL_DIR CALIB.safetensors OUT_DIR --bits 4 --group-size 64
"""
from common import parse_args

args, ids = parse_args(__doc__)

from gptqmodel import GPTQModel, QuantizeConfig  # noqa: E402

samples = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in ids]
config = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=True)  # its defaults for everything else
model = GPTQModel.load(args.model, config, device="cpu")
model.quantize(samples, batch_size=1)
model.save(args.out)
