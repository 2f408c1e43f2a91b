"""`quantkit estimate` on Mixture-of-Experts configs: the parameters transformers builds, every expert's and those a
token runs, per-expert sizes, and the quantize peak of one chunk of experts' Hessians."""
import json

import pytest
import torch
from accelerate import init_empty_weights
from click.testing import CliRunner
from transformers import AutoConfig, AutoModelForCausalLM

import quantkit
from quantkit.cli.app import cli
from quantkit.errors import QuantkitError
from quantkit.tools.estimate import BUILTIN_CONFIGS
from quantkit.tools.estimate_memory import Calibration, layer_passes

GIB = 2**30
TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=False)
# one tiny config of each Mixture-of-Experts type, with the features that change its count: dense layers among the
# sparse ones, shared experts, biases, q/k norms, latent attention with and without a query projection rank
TINY_MOE = {
    "mixtral": dict(TINY, model_type="mixtral", intermediate_size=96, num_local_experts=8, num_experts_per_tok=2,
                    head_dim=24),
    "qwen2_moe": dict(TINY, model_type="qwen2_moe", intermediate_size=160, num_experts=6, num_experts_per_tok=2,
                      moe_intermediate_size=48, shared_expert_intermediate_size=80, decoder_sparse_step=2,
                      mlp_only_layers=[3]),
    "qwen3_moe": dict(TINY, model_type="qwen3_moe", intermediate_size=160, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=48, head_dim=32, mlp_only_layers=[0], attention_bias=True),
    "deepseek_v2": dict(TINY, model_type="deepseek_v2", intermediate_size=160, n_routed_experts=8,
                        n_shared_experts=2, num_experts_per_tok=2, moe_intermediate_size=40, first_k_dense_replace=1,
                        q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                        mlp_bias=True),
    "deepseek_v3": dict(TINY, model_type="deepseek_v3", intermediate_size=160, n_routed_experts=8,
                        n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=40, first_k_dense_replace=2,
                        n_group=2, topk_group=1, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
                        qk_rope_head_dim=8, v_head_dim=16, attention_bias=True),
    "olmoe": dict(TINY, model_type="olmoe", intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                  eos_token_id=2),
}


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def meta_params(config: dict) -> int:
    """sum(p.numel()) of the causal LM transformers builds from `config`, on the meta device."""
    hf_config = AutoConfig.for_model(**config)
    with init_empty_weights(), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model_type", sorted(TINY_MOE))
def test_the_parameters_are_those_transformers_builds(model_type):
    config = TINY_MOE[model_type]
    e = quantkit.estimate(config, bits=[16, 4])
    assert e.total_params == meta_params(config)
    # the config as transformers writes it (config.json of a saved model; Qwen3-MoE's experts as num_local_experts)
    saved = AutoConfig.for_model(**config).to_dict()
    assert quantkit.estimate(saved, bits=[4]).total_params == e.total_params
    assert e.weight(16).total_bytes == 2 * e.total_params  # every tensor fp16, the routers too
    p = e.params
    assert p["total"] == sum(v for k, v in p.items() if k not in ("total", "active"))
    experts, active = e.shape.moe.experts, e.shape.moe.active
    sparse = e.shape.moe.moe_layers
    assert p["experts"] == sparse * experts * e.experts.params
    assert p["active"] == p["total"] - sparse * (experts - active) * e.experts.params


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v3"])
def test_the_built_in_moe_configs_are_counted_as_transformers_builds_them(name):
    config = {k: v for k, v in BUILTIN_CONFIGS[name].items() if not k.startswith("_")}
    assert quantkit.estimate(name, bits=[4]).total_params == meta_params(config)


def test_the_built_in_moe_configs_match_their_published_sizes():
    """Published: Qwen3-30B-A3B 30.5B total, 3.3B activated; Mixtral-8x7B 46.7B, 12.9B active; DeepSeek-V3 671B,
    37B activated (the main model; its 14B multi-token-prediction module, which makes the checkpoint's 685B, is not
    built by transformers nor counted)."""
    for name, total, active in [("qwen3-30b-a3b", 30.5e9, 3.3e9), ("mixtral-8x7b", 46.7e9, 12.9e9),
                                ("deepseek-v3", 671e9, 37e9)]:
        p = quantkit.estimate(name, bits=[4]).params
        assert abs(p["total"] / total - 1) < 0.005, name
        assert abs(p["active"] / active - 1) < 0.02, name


def test_per_expert_sizes_and_the_layer_with_experts_quantize_peak():
    """Qwen3-30B-A3B: experts of 2048 -> 768 -> 2048; 128 Hessians of 2048^2 float32 fit the 2 GiB budget, so one
    pass takes every expert of a layer; the experts' pass holds that chunk's experts and the router, and a GPU run's
    host the experts' summed outputs (a hidden-wide row per calibration token, pinned)."""
    e = quantkit.estimate("qwen3-30b-a3b", bits=[16, 4], group_size=128)
    expert = 3 * 2048 * 768
    assert e.experts.params == expert and e.experts.bytes[16] == 2 * expert
    # 4-bit g128: gate/up 2048 -> 768 and down 768 -> 2048, as the dense hand calculation in test_tools
    gate = 2048 * 768 // 2 + 16 * 768 * 2.5 + 2048 * 4
    down = 768 * 2048 // 2 + 6 * 2048 * 2.5 + 768 * 4
    assert e.experts.bytes[4] == 2 * gate + down
    assert (e.experts.chunk, e.experts.chunk_hessian_bytes) == (128, 128 * 2048**2 * 4)
    cpu = next(m for m in e.modes if m.mode == "cpu")
    assert cpu.parts["layer"] == layer_passes(e.shape, True, Calibration(128, 512), 4, 1024, on_gpu=False)
    # the moment of the experts' pass: attention released; the chunk's experts, router and norms in float32, the
    # chunk's Hessians, a mini-batch of 1024 tokens and the routed MLP temporaries (8 active experts x 768)
    layer = 128 * expert + 128 * 2048 + 2 * 2048 + 2 * 128  # + router, norms, q/k norms
    assert cpu.parts["layer"]["weights"] == layer * 4
    assert cpu.parts["layer"]["hessians"] == 128 * 2048**2 * 4
    assert cpu.parts["layer"]["forward"] == 1024 * 2048 * 4 + 3 * 1024 * 8 * 768 * 4
    # an expert's solve while the chunk's other 127 Hessians wait; the pass summing all 128 is the larger moment
    p = cpu.parts["layer"]
    assert p["solve"] == 127 * 2048**2 * 4 + 2 * 2048**2 * 4 < p["hessians"] + p["forward"]
    assert p["total"] == layer * 4 + p["hessians"] + p["forward"]
    gpu = next(m for m in e.modes if m.mode == "1 gpu")
    assert gpu.parts["host"]["expert_sums"] == 128 * 512 * 2048 * 2  # summed outputs, pinned, 16-bit


def test_the_expert_chunk_bounds_the_hessians_whatever_the_number_of_experts():
    """DeepSeek-V3: 256 experts with 7168-wide inputs would need 52 GB of Hessians; a pass holds 10 (2 GiB)."""
    e = quantkit.estimate("deepseek-v3", bits=[4])
    h = 7168**2 * 4
    assert e.experts.chunk == 10 and e.experts.chunk_hessian_bytes == 10 * h
    more = dict(TINY_MOE["qwen3_moe"], num_experts=64, hidden_size=2048, moe_intermediate_size=1024)
    fewer = dict(more, num_experts=8)
    peaks = [next(m for m in quantkit.estimate(c, bits=[4], expert_chunk=4).modes if m.mode == "cpu").parts["layer"]
             for c in (more, fewer)]
    assert peaks[0]["hessians"] == peaks[1]["hessians"] == 4 * 2048**2 * 4
    assert peaks[0]["solve"] == peaks[1]["solve"]
    # the weights too: a chunk of experts is loaded at a time; only the routers' rows grow
    assert peaks[0]["weights"] - peaks[1]["weights"] == 56 * 2048 * 4
    assert peaks[0]["total"] - peaks[1]["total"] == 56 * 2048 * 4
    r = run("estimate", "deepseek-v3", "--bits", "4", "--expert-chunk", "4", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["experts"]["chunk"] == 4 and d["experts"]["chunk_hessian_bytes"] == 4 * h
    assert d["config"]["moe"]["experts"] == 256 and d["config"]["mla"]["kv_lora_rank"] == 512
    assert d["params"]["active"] < d["params"]["total"]
    assert run("estimate", "deepseek-v3", "--expert-chunk", "-1").exit_code == 2


def test_latent_attention_caches_the_latent():
    """transformers' DeepSeek attention caches kv_lora_rank + qk_rope_head_dim values per token and layer."""
    e = quantkit.estimate("deepseek-v3", bits=[4], context=4096, batch=1)
    assert e.kv_cache_bytes == 61 * (512 + 64) * 4096 * 2


def test_the_text_report_shows_the_experts():
    r = run("estimate", "mixtral-8x7b", "--bits", "16,4")
    assert r.exit_code == 0, r.output
    out = r.output
    assert "8 experts per layer, 2 active per token" in out and "46.70 B" in out and "12.88 B" in out
    assert "2 experts per calibration pass" in out
    dense = run("estimate", "llama-2-7b", "--json")
    d = json.loads(dense.output)
    assert "experts" not in d and "moe" not in d["config"] and "active" not in d["params"]
    assert "experts" not in run("estimate", "llama-2-7b").output


def test_bad_moe_configs_are_one_line_errors(tmp_path):
    cases = {
        "active": dict(TINY_MOE["mixtral"], num_experts_per_tok=9),
        "no-top-k": {k: v for k, v in TINY_MOE["qwen3_moe"].items() if k != "num_experts_per_tok"},
        "unknown": dict(TINY, model_type="granitemoe", intermediate_size=96, num_local_experts=8),
        "only": dict(TINY_MOE["qwen2_moe"], mlp_only_layers=["x"]),
        "shared": dict(TINY_MOE["deepseek_v3"], n_shared_experts=-1),
        "rank": dict(TINY_MOE["deepseek_v3"], kv_lora_rank=0),
    }
    messages = {"active": "'num_experts_per_tok' (9) exceeds the 8 experts", "no-top-k": "'num_experts_per_tok'",
                "unknown": "'num_local_experts' says model_type 'granitemoe' has experts",
                "only": "'mlp_only_layers' must list layer indexes", "shared": "'n_shared_experts' is -1",
                "rank": "'kv_lora_rank' is 0"}
    for label, config in cases.items():
        case = tmp_path / label
        case.mkdir()
        (case / "config.json").write_text(json.dumps(config))
        r = run("estimate", case)
        errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
        assert r.exit_code == 1 and len(errors) == 1 and "Traceback" not in r.output, (label, r.output)
        assert f"{case}/config.json" in errors[0] and messages[label] in errors[0], (label, errors[0])
    with pytest.raises(QuantkitError, match="expert chunk"):
        quantkit.estimate("mixtral-8x7b", expert_chunk=-1)
