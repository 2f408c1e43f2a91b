"""Peak memory must not grow with the model's depth: one decoder layer is in memory at a time."""
import json
import os
import subprocess
import sys

import pytest
import torch

from quantkit.synthetic import shape_config, write_synthetic_checkpoint

# a Llama shape whose layers are big enough (50 MB each in float32) that holding several would show
SHAPE = dict(hidden_size=1024, intermediate_size=2752, num_attention_heads=8, num_key_value_heads=8, vocab_size=4096)


def _quantize_peak_rss_mb(model_dir, out, samples: int = 8, seq_len: int = 64) -> float:
    cmd = [sys.executable, "-m", "quantkit", "quantize", str(model_dir), "--out", str(out), "--json",
           "--samples", str(samples), "--seq-len", str(seq_len), "--group-size", "128", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)["peak_rss_mb"]


@pytest.mark.slow
def test_peak_rss_is_flat_in_depth(tmp_path):
    peaks = {}
    for layers in (2, 8):
        model = tmp_path / f"synthetic-{layers}"
        write_synthetic_checkpoint(model, shape_config("llama-2-7b", layers, **SHAPE), torch.bfloat16)
        peaks[layers] = _quantize_peak_rss_mb(model, tmp_path / f"q-{layers}")
    layer_mb = (4 * 1024 * 1024 + 3 * 1024 * 2752) * 4 / 2**20
    assert peaks[8] <= 1.15 * peaks[2], f"peak RSS grew with depth: {peaks} (one float32 layer is {layer_mb:.0f} MB)"


@pytest.mark.slow
def test_peak_rss_does_not_grow_with_the_calibration_set(tmp_path):
    """On a CPU the calibration activations wait in a scratch file between passes (the page cache holds them,
    not the process): 16 times the samples, one mini-batch in memory either way. Held in memory, the 120 extra
    samples alone would add 120 MB. (With glibc's heap serving a layer's temporaries, it grew with every
    mini-batch: heap.py.)"""
    model = tmp_path / "synthetic-2"
    write_synthetic_checkpoint(model, shape_config("llama-2-7b", 2, **SHAPE), torch.bfloat16)
    few = _quantize_peak_rss_mb(model, tmp_path / "q-few", samples=8, seq_len=512)
    many = _quantize_peak_rss_mb(model, tmp_path / "q-many", samples=128, seq_len=512)
    activations_mb = 128 * 512 * SHAPE["hidden_size"] * 2 / 2**20  # in the model's bfloat16: 128 MB
    assert many - few < activations_mb / 2, f"peak RSS {few:.0f} MB with 8 samples, {many:.0f} MB with 128"


def test_synthetic_checkpoint_has_the_shape_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    config = shape_config("llama-2-7b", 1, **SHAPE)
    size = write_synthetic_checkpoint(tmp_path / "m", config, torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    n_params = sum(p.numel() for p in model.parameters())
    assert size == n_params * 2 and model.config.num_hidden_layers == 1 and model.config.hidden_size == 1024
    assert model.model.layers[0].mlp.down_proj.weight.shape == (1024, 2752)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    with pytest.raises(Exception, match="not empty"):
        write_synthetic_checkpoint(tmp_path / "m", config)
