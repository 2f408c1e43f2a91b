"""Perplexity of a checkpoint on given token windows, loaded the way its users load it (transformers).

Runs in any of the benchmark environments, so each tool's output is read by the loader that goes with it; prints
{"ppl": ..., "tokens": ...}. Takes one forward of the model over the windows (for SmolLM2-135M and 16,384 tokens
on 2 CPU cores, under a minute).

    python perplexity.py MODEL_DIR EVAL.safetensors
"""
import argparse
import json
import math

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("model", help="checkpoint directory")
ap.add_argument("eval", help="safetensors file with input_ids [n, seq_len]")
args = ap.parse_args()

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

model = AutoModelForCausalLM.from_pretrained(args.model, device_map="cpu").eval()
windows = load_file(args.eval)["input_ids"]
nll, count = 0.0, 0
with torch.no_grad():
    for window in windows:
        logits = model(window[None]).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
        count += window.numel() - 1
print(json.dumps({"ppl": math.exp(nll / count), "tokens": count}))
