"""CodeGen (one fused qkv_proj) and GPT-J (separate q/k/v; attention and MLP both read ln_1's output) beyond the
architecture test: verify against the base with both loaders, the base against itself, config.json's own size names
(n_layer, n_embd), and the deploy path the reference material uses: AutoModelForCausalLM with optimum + gptqmodel,
then pipeline("text-generation", model=..., tokenizer=...)."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import cli_run, error_line, has_ecosystem, make_tiny_model

FAST = ["--seq-len", "64", "--max-tokens", "512"]
SMALL = {"n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8, "n_inner": 128, "n_positions": 256}
# the Linears each decoder layer holds, as the output names them
LINEARS = {"codegen": ("attn.qkv_proj", "attn.out_proj", "mlp.fc_in", "mlp.fc_out"),
           "gptj": ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.fc_in", "mlp.fc_out")}
PROMPT = "def fibonacci("


def verify_json(*args) -> tuple[int, dict]:
    r = cli_run("verify", *args, "--json")
    assert r.exit_code in (0, 1), r.output
    return r.exit_code, json.loads(r.stdout)


@pytest.fixture(scope="module", params=["codegen", "gptj"])
def base(request, tmp_path_factory, tiny_tokenizer) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp(request.param) / "base", tiny_tokenizer,
                           model_type=request.param, **SMALL)


@pytest.fixture(scope="module")
def quantized(base) -> Path:
    out = base.parent / "q"
    r = cli_run("quantize", base, "--out", out, "--samples", "8", "--seq-len", "32", "--group-size", "32")
    assert r.exit_code == 0, r.output
    return out


def model_type(model_dir: Path) -> str:
    return json.loads((model_dir / "config.json").read_text())["model_type"]


def test_the_config_is_tiny_and_spelled_as_the_model_type_spells_it(base):
    config = json.loads((base / "config.json").read_text())
    assert {k: config[k] for k in SMALL} == SMALL and "num_hidden_layers" not in config and "hidden_size" not in config


def test_every_linear_is_packed_under_its_own_name(quantized):
    from quantkit.source.checkpoint import SafetensorsCheckpoint

    ckpt = SafetensorsCheckpoint(quantized)
    packed = {n.removesuffix(".qweight") for n in ckpt.names() if n.endswith(".qweight")}
    linears = LINEARS[model_type(quantized)]
    assert packed == {f"transformer.h.{i}.{name}" for i in range(2) for name in linears}
    assert not any(n.endswith(".weight") and n.removesuffix(".weight") in packed for n in ckpt.names())
    if "attn.qkv_proj" in linears:  # q, k and v in one matrix: 3 x n_embd outputs, 4-bit codes 8 to an int32
        assert ckpt.shape("transformer.h.0.attn.qkv_proj.qweight") == (64 // 8, 3 * 64)


def test_quantized_passes_verify_against_its_base(quantized, base):
    code, d = verify_json(quantized, *FAST, "--max-new-tokens", "4")
    assert code == 0 and d["passed"] and d["failures"] == [], d["failures"]
    assert d["base"]["origin"] == "manifest" and d["base"]["path"] == str(base.resolve())
    assert d["integrity"]["ok"] and d["integrity"]["quantized_modules"] == 2 * len(LINEARS[model_type(base)])
    assert 0.9 < d["ppl_ratio"] < 1.1 and 0 < d["kl_mean"] <= d["kl_p99"] and 0.5 < d["top1_agreement"] < 1
    assert d["tokens"] == 8 * 63 and math.isfinite(d["base"]["ppl"])
    assert [g["kind"] for g in d["generations"]] == ["text"] * 3  # the tiny tokenizer has no chat template
    assert all(isinstance(g["quantized"], str) and g["quantized"] for g in d["generations"])


def test_base_against_itself_is_exact(base):
    code, d = verify_json(base, "--base", base, *FAST, "--no-generate")
    assert code == 0 and d["passed"]
    assert d["ppl_ratio"] == 1.0 and d["kl_mean"] == 0.0 and d["kl_p99"] == 0.0 and d["top1_agreement"] == 1.0
    assert d["base"]["ppl"] == d["quantized"]["ppl"]


@pytest.mark.parametrize("key,value,message", [
    ("n_layer", 3, "says n_layer is 3, but the weights in"),
    ("n_embd", 32, "implies a token embedding of [512, 32]"),
])
def test_a_config_that_does_not_describe_the_weights_is_refused(base, tmp_path, key, value, message):
    lying = tmp_path / "lying"
    shutil.copytree(base, lying)
    config = json.loads((lying / "config.json").read_text())
    (lying / "config.json").write_text(json.dumps(config | {key: value}))
    r = cli_run("quantize", lying, "--out", tmp_path / "q", "--samples", "8", "--seq-len", "32")
    assert r.exit_code == 1 and message in error_line(r), r.output
    assert not (tmp_path / "q").exists()


# buffers that checkpoints saved by older transformers versions hold and transformers now drops on load
LEGACY_BUFFERS = {"codegen": {"attn.causal_mask": lambda: torch.ones(1, 1, 256, 256, dtype=torch.bool).tril()},
                  "gptj": {"attn.bias": lambda: torch.ones(1, 1, 256, 256, dtype=torch.bool).tril(),
                           "attn.masked_bias": lambda: torch.tensor(-1e9)}}



def test_legacy_buffers_are_left_out_and_the_result_verifies(base, tmp_path):
    """GPT-J's attn.masked_bias (-1e9) does not fit in float16, which the output stores unquantized tensors in."""
    from safetensors.torch import load_file, save_file

    from quantkit.source.checkpoint import SafetensorsCheckpoint

    legacy = tmp_path / "legacy"
    shutil.copytree(base, legacy)
    tensors = load_file(legacy / "model.safetensors")
    buffers = LEGACY_BUFFERS[model_type(base)]
    stale = {f"transformer.h.{i}.{name}" for i in range(2) for name in buffers}
    tensors |= {f"transformer.h.{i}.{name}": make() for i in range(2) for name, make in buffers.items()}
    save_file(tensors, legacy / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "q"
    r = cli_run("quantize", legacy, "--out", out, "--samples", "8", "--seq-len", "32", "--group-size", "32")
    assert r.exit_code == 0, r.output
    names = set(SafetensorsCheckpoint(out).names())
    assert not names & stale and {"transformer.wte.weight", "transformer.h.1.ln_1.weight"} <= names
    code, d = verify_json(out, *FAST, "--no-generate")
    assert code == 0 and d["passed"] and d["base"]["path"] == str(legacy.resolve())


@pytest.mark.ecosystem
@pytest.mark.skipif(not has_ecosystem(), reason="needs optimum + gptqmodel")
def test_transformers_loader_agrees_with_quantkits(quantized):
    _, own = verify_json(quantized, *FAST, "--no-generate")
    code, hf = verify_json(quantized, *FAST, "--no-generate", "--loader", "transformers")
    assert code == 0 and hf["passed"]
    assert hf["quantized"]["load"] == {"loader": "transformers", "path": str(quantized), "quantized": True,
                                       "dtype": "float16"}
    assert abs(hf["quantized"]["ppl"] / own["quantized"]["ppl"] - 1) < 0.005


@pytest.mark.ecosystem
@pytest.mark.skipif(not has_ecosystem(), reason="needs optimum + gptqmodel")
def test_from_pretrained_and_the_text_generation_pipeline(quantized):
    """As the reference material runs Salesforce/codegen-350M-mono: the model and tokenizer loaded by
    transformers (optimum + gptqmodel on CPU), then pipeline("text-generation", model=model, tokenizer=tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from quantkit.verification.dequantized import load_dequantized

    tokenizer = AutoTokenizer.from_pretrained(quantized)
    model = AutoModelForCausalLM.from_pretrained(quantized, device_map="cpu")
    layer = model.transformer.h[0]
    for name in LINEARS[model_type(quantized)]:  # packed kernels, not float Linears
        assert type(layer.get_submodule(name)).__module__.startswith("gptqmodel.nn_modules.qlinear"), name
    ids = tokenizer(PROMPT * 4, return_tensors="pt").input_ids
    with torch.no_grad():
        got, ref = model(ids).logits.float(), load_dequantized(str(quantized))(ids).logits.float()
    # gptqmodel computes in float16, quantkit's reference in float32 (random tiny model: logits within about +-1)
    assert (got - ref).abs().max().item() < 0.02, (got - ref).abs().max().item()

    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = pipe(PROMPT, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    greedy = model.generate(**tokenizer(PROMPT, return_tensors="pt"), max_new_tokens=8, do_sample=False)
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)
    assert text == tokenizer.decode(greedy[0], skip_special_tokens=True)
