"""llm-compressor's GPTQ (W4A16 layout, chosen group size, symmetric) on given calibration tokens.

Takes about 5 minutes for SmolLM2-135M on 128 x 512 tokens and 2 CPU cores. Run inside the llmcompressor
benchmark environment by scripts/bench/peers.py and scripts/bench/gpu.py:
    python llmcompressor_gptq.py MODEL_DIR CALIB.safetensors OUT_DIR --bits 4 --group-size 64
"""
import json

from common import parse_args

args, ids = parse_args(__doc__)

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from datasets.table import InMemoryTable  # noqa: E402
from llmcompressor import oneshot  # noqa: E402
from llmcompressor.modifiers.quantization import GPTQModifier  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

# an explicit fingerprint: datasets otherwise pickles the table to hash it, which fails on some Python/pyarrow pairs
dataset = Dataset(InMemoryTable.from_pydict({"input_ids": ids.tolist(),
                                             "attention_mask": [[1] * ids.shape[1]] * ids.shape[0]}),
                  fingerprint=f"quantkit-calib-{ids.shape[0]}x{ids.shape[1]}-{int(ids.sum())}")
scheme = {"targets": ["Linear"], "weights": {"num_bits": args.bits, "type": "int", "symmetric": True,
                                              "strategy": "group", "group_size": args.group_size}}
recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=ids.shape[1], num_calibration_samples=ids.shape[0])
model.save_pretrained(args.out, save_compressed=True)
AutoTokenizer.from_pretrained(args.model).save_pretrained(args.out)
if torch.cuda.is_available():  # llm-compressor onloads one layer at a time to the GPU when one is present
    print(json.dumps({"peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}))
