"""Every supported architecture end to end on a tiny random model built from its config: quantize, then reload."""
import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_model

from quantkit.cli.app import cli
from quantkit.source.checkpoint import SafetensorsCheckpoint
from quantkit.source.skeleton import (
    SUPPORTED_MODEL_TYPES,
    decoder_layers,
    linear_modules,
    weight_matrix,
)
from quantkit.verification.dequantized import load_dequantized
from quantkit.verification.qlinear import load_model

# what each config needs beyond make_tiny_model's common sizes (hidden 64, intermediate 128, 4 heads, 2 layers)
ARCHITECTURES = {
    "llama": {},
    "mistral": {},
    "qwen2": {},  # q/k/v carry a bias
    "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16},
    "gemma3_text": {"head_dim": 16},
    "phi3": {"pad_token_id": 0},  # fused qkv_proj and gate_up_proj
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64},
    "gpt2": {"n_inner": 128},  # Conv1D: weights stored [in, out]
    "gpt_neox": {},  # fused query_key_value, parallel residual
    "codegen": {"rotary_dim": 8, "n_inner": 128},  # fused qkv_proj (mp_num=4 row blocks), parallel residual
    "gptj": {"rotary_dim": 8, "n_inner": 128},  # parallel residual: attention and MLP both read ln_1's output
}


def test_every_supported_architecture_has_a_test():
    assert set(ARCHITECTURES) == set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_architecture_quantizes_and_reloads(model_type, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = make_tiny_model(tmp_path / model_type, tiny_tokenizer, model_type=model_type,
                                **ARCHITECTURES[model_type])
    out = tmp_path / "q"
    r = CliRunner().invoke(cli, ["quantize", str(model_dir), "--out", str(out), "--samples", "8", "--seq-len", "32",
                                 "--group-size", "32"])
    assert r.exit_code == 0, r.output

    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prefix, layers = decoder_layers(base, base.config.num_hidden_layers)
    expected = {f"{prefix}.{i}.{name}" for i, layer in enumerate(layers) for name in linear_modules(layer)}
    assert len(expected) >= 4 * len(layers)
    names = SafetensorsCheckpoint(out).names()
    assert {n[: -len(".qweight")] for n in names if n.endswith(".qweight")} == expected  # every Linear, nothing else

    reference = load_dequantized(str(out))
    for name in expected:
        w, wq = weight_matrix(base.get_submodule(name)), weight_matrix(reference.get_submodule(name))
        assert w.shape == wq.shape and 0 < ((w - wq).norm() / w.norm()).item() < 0.25, name

    ids = torch.randint(3, len(tiny_tokenizer), (2, 16))
    with torch.no_grad():
        ref_logits, base_logits = reference(ids).logits, base(ids).logits
        own, _ = load_model(out)  # the pure-torch GPTQLinear loader verify uses
        own_logits = own(ids).logits
    torch.testing.assert_close(own_logits, ref_logits, atol=1e-3, rtol=1e-3)
    cos = torch.nn.functional.cosine_similarity(ref_logits.flatten(), base_logits.flatten(), dim=0).item()
    assert cos > 0.9, f"quantized logits drifted from the base (cosine {cos:.3f})"
