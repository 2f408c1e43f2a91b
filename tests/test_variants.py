"""Issue 4's matrix: every GPTQ variant the format allows round-trips exactly through the files; the ones it forbids
are refused; each variant gptqmodel supports loads through transformers + optimum + gptqmodel and matches quantkit's
own loader; bitsandbytes outputs reload with from_pretrained and pass verify."""
import importlib.util
import itertools
import json

import pytest
import torch
from click.testing import CliRunner
from conftest import has_ecosystem, make_tiny_model

from quantkit.cli.app import cli
from quantkit.config import QuantSpec
from quantkit.solve.gptq import gptq_quantize
from quantkit.write.gptq_format import (
    checkpoint_format,
    dequantize_module,
    module_tensors,
)

ORDERS = {"plain": dict(act_order=False), "act-order": dict(act_order=True),
          "static": dict(act_order=True, static_groups=True)}


def _problem(n_out=64, n_in=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, n_in, generator=g) @ (torch.eye(n_in) + 0.3 * torch.randn(n_in, n_in, generator=g))
    W = torch.randn(n_out, n_in, generator=g) * 0.05
    return W, 2 * X.T @ X / X.shape[0]


# K=96: group 32 divides it, group 64 leaves a partial last group of 32, -1 is one group per row
@pytest.mark.parametrize("bits,group,sym,order", list(itertools.product((2, 3, 4, 8), (32, 64, -1), (True, False), ORDERS)))
def test_every_allowed_variant_round_trips_exactly_through_the_tensors(bits, group, sym, order):
    W, H = _problem()
    spec = QuantSpec(bits=bits, group_size=group, sym=sym, **ORDERS[order])
    res = gptq_quantize(W, H, spec)
    fmt = checkpoint_format(spec)
    tensors = module_tensors("m", res, bits, fmt)
    got = dequantize_module(tensors["m.qweight"], tensors["m.qzeros"], tensors["m.scales"], tensors["m.g_idx"], bits, fmt)
    assert torch.equal(got, res.weight)
    n_groups = 1 if group == -1 else -(-96 // group)
    assert tensors["m.scales"].shape == (n_groups, 64) and tensors["m.qweight"].shape == (96 * bits // 32, 64)
    g_idx = tensors["m.g_idx"]
    in_order = torch.arange(96) // (96 if group == -1 else group)
    assert torch.equal(g_idx, in_order) or spec.desc_act  # static groups and plain order keep g_idx in order
    assert int(g_idx.min()) >= 0 and int(g_idx.max()) < n_groups


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


FAST = ["--samples", "8", "--seq-len", "32"]


def test_widths_the_packing_cannot_hold_are_refused_before_any_work(tiny_tokenizer, tmp_path):
    """3-bit packs 32 values into 3 words: a hidden size of 80 cannot be written, and says so up front."""
    d = make_tiny_model(tmp_path / "odd", tiny_tokenizer, hidden_size=80, intermediate_size=160, num_attention_heads=4,
                        num_key_value_heads=2)
    r = run("quantize", d, "--out", tmp_path / "q", "--bits", "3", "--group-size", "16", *FAST)
    assert r.exit_code == 1, r.output
    assert "3-bit GPTQ needs every quantized Linear's input and output sizes divisible by 32" in r.output
    assert "model.layers.0.self_attn.q_proj" in r.output and not (tmp_path / "q").exists()
    assert run("quantize", d, "--out", tmp_path / "q4", "--bits", "4", "--group-size", "16", *FAST).exit_code == 0


# what gptqmodel's CPU kernels run; each row is one quantize + two loads (about 10 s)
ECOSYSTEM_VARIANTS = [
    (4, 32, True, "act-order"), (4, 32, False, "act-order"), (4, -1, False, "plain"), (8, -1, True, "act-order"),
    (8, 32, False, "static"), (3, 32, True, "static"), (3, -1, False, "act-order"), (2, 32, False, "plain"),
    (2, 32, True, "act-order"), (4, -1, True, "plain"), (4, 32, False, "plain"), (4, 32, True, "plain"),
    (4, -1, False, "act-order"),
]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.ecosystem
@pytest.mark.skipif(not has_ecosystem(), reason="needs optimum + gptqmodel")
@pytest.mark.parametrize("bits,group,sym,order", ECOSYSTEM_VARIANTS)
def test_variant_loads_in_transformers_and_matches_quantkit(bits, group, sym, order, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, GPTQConfig

    from quantkit.verification.dequantized import load_dequantized

    out = tmp_path / "q"
    flags = {"plain": ["--no-act-order"], "act-order": ["--act-order"], "static": ["--act-order", "--static-groups"]}
    r = run("quantize", tiny_llama_dir, "--out", out, "--bits", bits, "--group-size", group,
            "--sym" if sym else "--asym", *flags[order], *FAST)
    assert r.exit_code == 0, r.output
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["checkpoint_format"] == ("gptq" if sym else "gptq_v2") and qcfg["desc_act"] == (order == "act-order")
    ids = torch.randint(0, 500, (1, 24), generator=torch.Generator().manual_seed(1))
    kwargs = {}
    if (bits, sym, group) == (4, False, -1):
        # gptqmodel 7.6's auto-picked TorchFusedLinear gets these wrong (logits off by 0.5); its torch kernel is exact,
        # and verify/inspect say so (integrity notes)
        kwargs["quantization_config"] = GPTQConfig(bits=4, group_size=-1, sym=False, desc_act=qcfg["desc_act"],
                                                   backend="torch")
    loaded = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu", **kwargs)
    down = loaded.model.layers[0].mlp.down_proj
    assert type(down).__module__.startswith("gptqmodel.nn_modules.qlinear"), type(down)  # a packed kernel, not Linear
    got, ref = _logits(loaded, ids), _logits(load_dequantized(str(out)), ids)
    # gptqmodel computes in float16, quantkit's reference in float32 (random tiny model: logits within about +-1)
    assert (got - ref).abs().max().item() < 0.02, (got - ref).abs().max().item()


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
@pytest.mark.parametrize("method", ["bnb-nf4", "bnb-int8"])
def test_bitsandbytes_output_reloads_and_passes_verify(method, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / method
    r = run("quantize", tiny_llama_dir, "--out", out, "--method", method, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["method"] == method and res["bits"] == (4 if method == "bnb-nf4" else 8)
    assert res["checkpoint_format"] == "bitsandbytes"
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "bitsandbytes" and qcfg["load_in_4bit"] == (method == "bnb-nf4")
    assert {"model.safetensors", "quantkit.json", "README.md", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    shown = run("inspect", out)
    assert shown.exit_code == 0 and ("bitsandbytes nf4 (4-bit)" if method == "bnb-nf4" else
                                     "bitsandbytes LLM.int8 (8-bit)") in shown.output, shown.output
    assert "quantized Linears" in shown.output and "model.layers.*.mlp.down_proj" in shown.output
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu")
    assert type(reloaded.model.layers[0].mlp.down_proj).__name__ == ("Linear4bit" if method == "bnb-nf4" else "Linear8bitLt")
    assert type(reloaded.lm_head).__name__ == "Linear"  # the head stays in float
    v = run("verify", out, "--base", tiny_llama_dir, "--max-tokens", "1024", "--seq-len", "64", "--no-generate", "--json")
    assert v.exit_code == 0, v.output
    report = json.loads(v.stdout)
    assert report["passed"] and report["integrity"]["quantization"]["quant_method"] == "bitsandbytes"
    assert report["ppl_ratio"] < 1.1 and report["top1_agreement"] > 0.8


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_bitsandbytes_ignores_no_gptq_option_silently(tiny_llama_dir, tmp_path):
    r = run("quantize", tiny_llama_dir, "--out", tmp_path / "q", "--method", "bnb-int8", "--bits", "4")
    assert r.exit_code == 2 and "bnb-int8 stores 8-bit weights" in r.output


@pytest.mark.parametrize("tied", [False, True])
def test_lm_head_is_quantized_calibrated_and_loads(tied, tiny_tokenizer, tmp_path):
    """--lm-head: the head is packed (a tied one is untied), quantkit's loader and verify read it, and the
    transformers + optimum loader is refused with the reason."""
    from transformers import AutoModelForCausalLM

    from quantkit.source.checkpoint import SafetensorsCheckpoint
    from quantkit.verification.dequantized import load_dequantized

    base_dir = make_tiny_model(tmp_path / "base", tiny_tokenizer, tie_word_embeddings=tied)
    out = tmp_path / "q"
    r = run("quantize", base_dir, "--out", out, "--lm-head", "--group-size", "32", *FAST, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["layers"][-1]["module"] == "lm_head" and res["layers"][-1]["losses"]["lm_head"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["lm_head"] is True and config["tie_word_embeddings"] is False
    names = set(SafetensorsCheckpoint(out).names())
    assert {"lm_head.qweight", "lm_head.scales", "model.embed_tokens.weight"} <= names and "lm_head.weight" not in names

    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    quantized = load_dequantized(str(out))
    assert not torch.equal(quantized.lm_head.weight, quantized.model.embed_tokens.weight)
    err = (quantized.lm_head.weight - base.lm_head.weight).abs()
    assert err.max() < 0.2 * base.lm_head.weight.abs().max()

    v = run("verify", out, "--base", base_dir, "--max-tokens", "512", "--seq-len", "64", "--no-generate", "--json")
    assert v.exit_code == 0, v.output
    assert any("lm_head is quantized" in n for n in json.loads(v.stdout)["integrity"]["notes"])
    if has_ecosystem():
        t = run("verify", out, "--loader", "transformers", "--max-tokens", "512", "--seq-len", "64", "--no-generate")
        assert t.exit_code == 1 and "quantized lm_head, which transformers + optimum do not load" in t.output


@pytest.mark.ecosystem
@pytest.mark.skipif(not has_ecosystem(), reason="needs gptqmodel")
def test_lm_head_loads_in_gptqmodel(tiny_llama_dir, tmp_path):
    from gptqmodel import GPTQModel

    from quantkit.verification.dequantized import load_dequantized

    out = tmp_path / "q"
    assert run("quantize", tiny_llama_dir, "--out", out, "--lm-head", "--group-size", "32", *FAST).exit_code == 0
    model = GPTQModel.load(str(out), device="cpu")
    assert type(model.model.lm_head).__module__.startswith("gptqmodel.nn_modules.qlinear")
    ids = torch.randint(0, 500, (1, 24), generator=torch.Generator().manual_seed(1))
    got, ref = _logits(model.model, ids), _logits(load_dequantized(str(out)), ids)
    assert (got - ref).abs().max().item() < 0.02
