"""Mixture-of-Experts GPTQ outputs in the GPTQ ecosystem.

- `GPTQModel.load(out, device="cpu")` (gptqmodel with Defuser) runs every expert Linear of quantkit's per-expert
  layout as a packed gptqmodel kernel; each expert computes what quantkit's own reading of the files gives, and the
  logits match quantkit's dequantized reference. GPTQModel.load swaps transformers' fused MoE classes for per-expert
  ones in the running process, so it runs in a child process; the parent holds the reference. Mixtral is not among
  them: GPTQModel looks for its experts as `mlp.experts.E.{gate,up,down}_proj`, while the files hold Mixtral's own
  (and vLLM's) names `block_sparse_moe.experts.E.{w1,w2,w3}`.
- transformers' from_pretrained (optimum + gptqmodel) loads no quantized expert: it keeps experts fused in float
  parameters, which stay randomly initialised. It does load an output whose experts were skipped (kept float16).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import has_ecosystem, make_tiny_model
from test_moe import MOE_ARCHITECTURES, QUANTIZE

from quantkit.source.checkpoint import SafetensorsCheckpoint

pytestmark = [pytest.mark.ecosystem, pytest.mark.skipif(not has_ecosystem(), reason="needs optimum + gptqmodel")]

# gptqmodel's default 4-bit CPU kernel (TorchAtenLinear) packs a weight only when out_features is a multiple of 16,
# so the tiny DeepSeeks get MLA sizes shaped like the real ones (kv_a_proj_with_mqa: 32 + 16 outputs, the real models'
# 512 + 64) and, as their configs have, as many key/value heads as query heads
MLA_FOR_THE_CPU_KERNEL = dict(kv_lora_rank=32, qk_rope_head_dim=16, num_key_value_heads=4)
LOADED_BY_GPTQMODEL = {t: {**MOE_ARCHITECTURES[t], **(MLA_FOR_THE_CPU_KERNEL if t.startswith("deepseek") else {})}
                       for t in ("qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe")}

# In the child: load with GPTQModel, then run the inputs the parent chose through the whole model and through each
# expert Linear named in the checkpoint, and save the outputs with each module's class.
CHILD = """
import sys, torch
from gptqmodel import GPTQModel
out, inputs, result = sys.argv[1:4]
given = torch.load(inputs)
model = GPTQModel.load(out, device="cpu").model
modules = dict(model.named_modules())
with torch.no_grad():
    logits = model(given["ids"]).logits.float()
    experts = {}
    for name, x in given["experts"].items():
        m = modules.get(name)
        cls = "missing" if m is None else type(m).__module__ + "." + type(m).__name__
        y = None if m is None else m(x.to(model.dtype)).float()
        experts[name] = (cls, y)
torch.save({"logits": logits, "experts": experts}, result)
"""


def _expert_weights(out: Path) -> dict[str, torch.Tensor]:
    """Every expert Linear of the checkpoint, dequantized by quantkit from its stored tensors (float32 [out, in])."""
    from quantkit.write.gptq_format import dequantize_module

    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    ckpt = SafetensorsCheckpoint(out)
    try:
        names = [n.removesuffix(".qweight") for n in ckpt.names() if ".experts." in n and n.endswith(".qweight")]
        return {n: dequantize_module(ckpt.get(f"{n}.qweight"), ckpt.get(f"{n}.qzeros"), ckpt.get(f"{n}.scales"),
                                     ckpt.get(f"{n}.g_idx"), qcfg["bits"], qcfg["checkpoint_format"]) for n in names}
    finally:
        ckpt.close()


def _run_child(out: Path, inputs: dict, folder: Path) -> dict:
    torch.save(inputs, folder / "inputs.pt")
    env = {**os.environ, "BUILD_CUDA_EXT": "0", "GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", CHILD, str(out), str(folder / "inputs.pt"), str(folder / "result.pt")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(folder / "result.pt")


@pytest.mark.parametrize("model_type", list(LOADED_BY_GPTQMODEL))
def test_gptqmodel_loads_every_expert_and_matches_quantkit(model_type, tiny_tokenizer, tmp_path):
    from click.testing import CliRunner

    from quantkit.cli.app import cli
    from quantkit.verification.dequantized import load_dequantized

    base = make_tiny_model(tmp_path / "base", tiny_tokenizer, model_type=model_type, **LOADED_BY_GPTQMODEL[model_type])
    out = tmp_path / "q"
    r = CliRunner().invoke(cli, ["quantize", str(base), "--out", str(out), *QUANTIZE])
    assert r.exit_code == 0, r.output
    weights = _expert_weights(out)
    assert len(weights) >= 4 * 3  # 4 experts x gate/up/down in at least one layer
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 500, (1, 24), generator=g)
    xs = {n: torch.randn(5, w.shape[1], generator=g) for n, w in weights.items()}
    got = _run_child(out, {"ids": ids, "experts": xs}, tmp_path)

    for name, w in weights.items():
        cls, y = got["experts"][name]
        assert cls.startswith("gptqmodel.nn_modules.qlinear."), (name, cls)  # a packed kernel, not a float Linear
        want = xs[name] @ w.T
        # gptqmodel runs in bfloat16 on CPU: its rounding stays far inside 2% of the output's size, while a wrong or
        # random expert is off by about the whole size
        assert (y - want).abs().max().item() < 0.02 * want.abs().max().item(), name
    with torch.no_grad():
        _assert_logits_match(got["logits"], load_dequantized(str(out))(ids).logits.float())


def _assert_logits_match(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Random tiny model, logits within about +-1: 16-bit rounding keeps a position's logits far inside 0.015 of the
    float32 reference, except at a token whose router top-k is a near tie that the rounding flips; experts left
    random move most positions past it."""
    per_position = (got - ref).abs().amax(-1).flatten()
    assert (per_position < 0.015).float().mean().item() >= 0.9, per_position.tolist()


# transformers' conversion mapping has two families for these MoEs: Mixtral's (block_sparse_moe.*.w1/w2/w3) and
# Qwen2-MoE's (mlp.experts.*.gate_proj/up_proj/down_proj, also used by Qwen3-MoE, DeepSeek-V2/V3 and OLMoE);
# Qwen2-MoE also has the float shared_expert_gate Linear that optimum must be told to leave alone
@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_with_float_experts_from_pretrained_loads_and_matches_quantkit(model_type, tiny_tokenizer, tmp_path):
    """transformers + optimum + gptqmodel load an MoE whose experts were skipped (kept float16): the fused expert
    parameters hold the checkpoint's experts exactly, everything else runs on gptqmodel's kernels."""
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from quantkit.cli.app import cli
    from quantkit.verification.dequantized import load_dequantized

    base = make_tiny_model(tmp_path / "base", tiny_tokenizer, model_type=model_type, **MOE_ARCHITECTURES[model_type])
    out = tmp_path / "q"
    r = CliRunner().invoke(cli, ["quantize", str(base), "--out", str(out), *QUANTIZE, "--skip", "mlp.experts.*"])
    assert r.exit_code == 0, r.output
    loaded = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu")
    ref = load_dequantized(str(out))
    for got_layer, ref_layer in zip(loaded.model.layers, ref.model.layers, strict=True):
        assert type(got_layer.self_attn.q_proj).__module__.startswith("gptqmodel.nn_modules.qlinear.")
        got_experts, ref_experts = got_layer.mlp.experts, ref_layer.mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            assert torch.equal(getattr(got_experts, name).float(), getattr(ref_experts, name)), name
    ids = torch.randint(3, 500, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _assert_logits_match(loaded(ids).logits.float(), ref(ids).logits.float())
