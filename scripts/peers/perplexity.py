"""Perplexity of a checkpoint on given token windows, loaded the way its users load it (transformers).

Runs in any of the benchmark environments, so each tool's output is read by the loader that goes with it:
    python perplexity.py MODEL_DIR EVAL.safetensors     -> prints {"ppl": ..., "tokens": ...}
"""
import json
import math
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="cpu").eval()
windows = load_file(sys.argv[2])["input_ids"]
nll, count = 0.0, 0
with torch.no_grad():
    for window in windows:
        logits = model(window[None]).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
        count += window.numel() - 1
print(json.dumps({"ppl": math.exp(nll / count), "tokens": count}))
