"""Mixture-of-Experts models end to end on tiny random models: every expert quantized under the base checkpoint's
own names, routers kept float, both of quantkit's loaders, verify, resume, the per-expert calibration record."""
import json
import os

import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_model

from quantkit.cli.app import cli
from quantkit.source.checkpoint import SafetensorsCheckpoint
from quantkit.source.skeleton import MOE_MODEL_TYPES

# what each config needs beyond make_tiny_model's common sizes (hidden 64, 4 heads, 2 layers); 4 experts, top-2
MLA = dict(kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
MOE_ARCHITECTURES = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64),  # block_sparse_moe.*.w1/w2/w3
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64),  # a shared expert and its 1-output gate
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16),
    "deepseek_v2": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
                        n_shared_experts=1, **MLA),  # MLA attention, a dense first layer, shared experts
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
                        n_shared_experts=1, n_group=1, topk_group=1, **MLA),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, intermediate_size=32),
}
QUANTIZE = ["--samples", "8", "--seq-len", "32", "--group-size", "32", "--expert-min-tokens", "4"]


def test_every_moe_architecture_has_a_test():
    assert set(MOE_ARCHITECTURES) == set(MOE_MODEL_TYPES)


def _expert_linears(names: list[str]) -> set[str]:
    """The checkpoint's per-expert Linear names (without .weight)."""
    return {n.removesuffix(".weight") for n in names if ".experts." in n and n.endswith(".weight")
            and n.split(".experts.")[1].split(".")[0].isdigit()}


@pytest.fixture(scope="module", params=list(MOE_ARCHITECTURES))
def moe_model(request, tmp_path_factory, tiny_tokenizer):
    model_type = request.param
    path = tmp_path_factory.mktemp(model_type)
    base = make_tiny_model(path / "base", tiny_tokenizer, model_type=model_type, **MOE_ARCHITECTURES[model_type])
    out = path / "q"
    r = CliRunner().invoke(cli, ["quantize", str(base), "--out", str(out), *QUANTIZE])
    assert r.exit_code == 0, r.output
    return model_type, base, out


def test_every_expert_is_quantized_under_the_checkpoints_names(moe_model):
    model_type, base, out = moe_model
    base_names = SafetensorsCheckpoint(base).names()
    names = SafetensorsCheckpoint(out).names()
    experts = _expert_linears(base_names)
    assert len(experts) >= 4 * 3, base_names  # 4 experts x gate/up/down in at least one layer
    quantized = {n.removesuffix(".qweight") for n in names if n.endswith(".qweight")}
    assert experts <= quantized  # every expert Linear packed, under the base checkpoint's own name
    for e in experts:
        assert {f"{e}.qzeros", f"{e}.scales", f"{e}.g_idx"} <= set(names) and f"{e}.weight" not in names
    routers = [n for n in base_names if n.endswith((".gate.weight", "shared_expert_gate.weight"))]
    assert routers and all(r in names for r in routers)  # routers and gates stay float16 weights
    ckpt = SafetensorsCheckpoint(out)
    assert all(ckpt.get(r).dtype == torch.float16 for r in routers)
    ckpt.close()
    shared = [n for n in base_names if ".shared_expert" in n and n.endswith("_proj.weight")]
    assert all(n.removesuffix(".weight") in quantized for n in shared)  # shared experts quantized like any MLP
    dense_mlp = [n for n in base_names if ".mlp." in n and "expert" not in n and n.endswith("_proj.weight")]
    assert all(n.removesuffix(".weight") in quantized for n in dense_mlp)  # DeepSeek's dense first layer


def test_manifest_records_each_experts_calibration_tokens(moe_model):
    _, _, out = moe_model
    layers = json.loads((out / "quantkit.json").read_text())["layers"]
    records = [r["experts"] for r in layers if "experts" in r]
    assert records
    for record in records:
        (facts,) = record.values()
        assert facts["experts"] == 4 and len(facts["tokens"]) == 4
        # 8 samples x 32 tokens, each routed to 2 of 4 experts
        assert sum(facts["tokens"]) == 8 * 32 * 2
        assert facts["rounded"] == [e for e, t in enumerate(facts["tokens"]) if t < 4]


def test_both_loaders_reload_it_and_agree(moe_model):
    from quantkit.verification.dequantized import load_dequantized
    from quantkit.verification.qlinear import load_model

    _, _, out = moe_model
    reference = load_dequantized(str(out))
    ids = torch.randint(3, 200, (2, 16))
    with torch.no_grad():
        own, _ = load_model(out)
        torch.testing.assert_close(own(ids).logits, reference(ids).logits, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("which", ["base", "quantized"])
def test_verify_of_a_model_against_itself_is_exact(moe_model, which):
    _, base, out = moe_model
    model = base if which == "base" else out
    r = CliRunner().invoke(cli, ["verify", str(model), "--base", str(model), "--seq-len", "32", "--max-tokens", "256",
                                 "--no-generate", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["ppl_ratio"] == 1.0 and d["kl_mean"] == 0.0 and d["top1_agreement"] == 1.0


def test_verify_of_the_quantized_model_passes(moe_model):
    _, base, out = moe_model
    r = CliRunner().invoke(cli, ["verify", str(out), "--base", str(base), "--seq-len", "32", "--max-tokens", "256",
                                 "--no-generate", "--json", "--max-ppl-ratio", "10", "--max-kl", "10",
                                 "--min-top1", "0"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert 0 < d["kl_mean"] and d["ppl_ratio"] > 0


def _quantize(base, out, *extra) -> dict:
    r = CliRunner().invoke(cli, ["quantize", str(base), "--out", str(out), "--overwrite", *QUANTIZE, *extra, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _tensors(folder) -> dict[str, torch.Tensor]:
    ckpt = SafetensorsCheckpoint(folder)
    try:
        return {n: ckpt.get(n) for n in ckpt.names()}
    finally:
        ckpt.close()


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory, tiny_tokenizer):
    return make_tiny_model(tmp_path_factory.mktemp("qwen3-moe") / "base", tiny_tokenizer, model_type="qwen3_moe",
                           **MOE_ARCHITECTURES["qwen3_moe"])


@pytest.mark.parametrize("model_type,extra,skip", [
    ("qwen3_moe", {"mlp_only_layers": [0]}, None),  # a dense first layer of the same class as the MoE ones
    ("deepseek_v3", {}, None),  # a dense first layer, then two MoE layers that propagate through their sums
    ("qwen3_moe", {}, "mlp.experts.3.*"),  # a chunk whose one expert stays float joins the chunk before it
])
def test_expert_chunks_change_memory_not_results(model_type, extra, skip, tiny_tokenizer, tmp_path):
    """An expert's Hessians depend only on its own tokens, and each chunk adds its outputs into the block's sums in
    expert order, so one expert per pass and all of them in one pass write the same tensors, in every layer."""
    base = make_tiny_model(tmp_path / "base", tiny_tokenizer, model_type=model_type, layers=3,
                           **MOE_ARCHITECTURES[model_type], **extra)
    skipping = ["--skip", skip] if skip else []
    _quantize(base, tmp_path / "one", "--expert-chunk", "1", *skipping)
    _quantize(base, tmp_path / "all", "--expert-chunk", "0", *skipping)
    one, every = _tensors(tmp_path / "one"), _tensors(tmp_path / "all")
    assert one.keys() == every.keys()
    assert [n for n in one if not torch.equal(one[n], every[n])] == []
    layers = json.loads((tmp_path / "one" / "quantkit.json").read_text())["layers"]
    records = [r["experts"]["mlp.experts"] for r in layers if "experts" in r]
    assert len(records) == (3 if skip else 2)  # the dense first layers have none
    assert all(r["skipped"] == ([3] if skip else []) for r in records)


def test_experts_solved_as_a_batch_write_what_solving_each_alone_writes(qwen3_moe, tmp_path, monkeypatch):
    """Experts of one shape are solved together (one column sweep for the batch); the tensors and every reported
    loss equal those of solving each expert alone, bit for bit."""
    from quantkit.run import solves

    sizes = []
    batched = solves.gptq_quantize_batched
    monkeypatch.setattr(solves, "gptq_quantize_batched", lambda w, h, s: sizes.append(len(w)) or batched(w, h, s))
    _quantize(qwen3_moe, tmp_path / "batched", "--expert-chunk", "0")
    assert sizes and max(sizes) == 4  # the four experts' gate/up, then their downs
    monkeypatch.setattr(solves, "BATCH_BYTES", 0)
    sizes.clear()
    _quantize(qwen3_moe, tmp_path / "alone", "--expert-chunk", "0")
    assert sizes == []
    together, alone = _tensors(tmp_path / "batched"), _tensors(tmp_path / "alone")
    assert together.keys() == alone.keys()
    assert [n for n in together if not torch.equal(together[n], alone[n])] == []
    losses = [[r["losses"] for r in json.loads((tmp_path / d / "quantkit.json").read_text())["layers"]]
              for d in ("batched", "alone")]
    assert losses[0] == losses[1]


@pytest.mark.parametrize("active", [None, frozenset({0, 2, 5})])
def test_the_experts_forward_equals_running_each_expert_on_its_tokens(active):
    """UnfusedExperts groups the routed tokens by expert with one sort and one read of the counts (not one wait for
    the host per expert, as torch.where on each expert's mask was); the output is that form's, bit for bit, with
    routing's "no expert" index, experts no token reaches, and a chunk's active experts."""
    from types import SimpleNamespace

    from quantkit.source.experts import FusedLayout, UnfusedExperts

    torch.manual_seed(0)
    experts, hidden, inner, tokens, k = 6, 32, 16, 40, 2
    fused = SimpleNamespace(gate_up_proj=torch.empty(experts, 2 * inner, hidden), act_fn=torch.nn.functional.silu)
    block = UnfusedExperts(fused, FusedLayout("gate_up_proj", "gate_proj", "up_proj", "down_proj", "down_proj"))
    for p in block.parameters():
        p.data.normal_()
    block.active = active
    x = torch.randn(tokens, hidden)
    index = torch.randint(0, experts - 1, (tokens, k))  # expert 5 gets no token
    index[3, 1] = experts  # routing's "no expert"
    weights = torch.rand(tokens, k)

    expected = torch.zeros_like(x)  # the per-expert form
    mask = torch.nn.functional.one_hot(index, num_classes=experts + 1).permute(2, 1, 0)
    for e in range(experts):
        position, token = torch.where(mask[e])
        if len(token) and (active is None or e in active):
            gate, up, down = block.expert(e).linears()
            h = down(block.act_fn(gate(x[token])) * up(x[token])) * weights[token, position, None]
            expected.index_add_(0, token, h)
    with torch.no_grad():
        assert torch.equal(block(x, index, weights), expected.detach())


def test_deepseek_routing_bias_is_read_from_the_checkpoint(tiny_tokenizer, tmp_path):
    """DeepSeek-V3's router adds a per-expert bias (a buffer, e_score_correction_bias) before its top-k: with a
    large bias on experts 0 and 1, every token goes to them, and calibration must see that routing."""
    from safetensors.torch import load_file, save_file

    base = make_tiny_model(tmp_path / "base", tiny_tokenizer, model_type="deepseek_v3",
                           **MOE_ARCHITECTURES["deepseek_v3"])
    tensors = load_file(base / "model.safetensors")
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert bias in tensors
    tensors[bias] = torch.tensor([10.0, 10.0, 0.0, 0.0])
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    _quantize(base, tmp_path / "q")
    (layer,) = [r for r in json.loads((tmp_path / "q" / "quantkit.json").read_text())["layers"] if "experts" in r]
    tokens = layer["experts"]["mlp.experts"]["tokens"]
    assert tokens[0] == tokens[1] == 8 * 32 and tokens[2] == tokens[3] == 0


def test_experts_with_too_few_tokens_are_rounded_to_nearest_and_recorded(qwen3_moe, tmp_path, caplog):
    _quantize(qwen3_moe, tmp_path / "rounded", "--expert-min-tokens", "100000")
    _quantize(qwen3_moe, tmp_path / "rtn", "--method", "rtn")
    rounded, rtn = _tensors(tmp_path / "rounded"), _tensors(tmp_path / "rtn")
    experts = [n for n in rounded if ".experts." in n]
    assert experts and all(torch.equal(rounded[n], rtn[n]) for n in experts)  # exactly round-to-nearest's codes
    assert any(not torch.equal(rounded[n], rtn[n]) for n in rounded if "self_attn" in n)  # the rest is GPTQ
    layers = json.loads((tmp_path / "rounded" / "quantkit.json").read_text())["layers"]
    assert all(r["experts"]["mlp.experts"]["rounded"] == [0, 1, 2, 3] for r in layers)


def test_the_log_line_summarises_the_experts(qwen3_moe, tmp_path):
    r = CliRunner().invoke(cli, ["quantize", str(qwen3_moe), "--out", str(tmp_path / "q"), *QUANTIZE,
                                 "--expert-min-tokens", "150"])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("layer 1/2"))
    assert "mlp.experts: 4 experts, loss=" in line and "rounded to nearest (fewer than 150 tokens)" in line
    assert "experts.0.gate_proj" not in line  # one summary, not a loss per expert Linear


def test_skipped_experts_stay_float_and_the_config_says_what_is_quantized(qwen3_moe, tmp_path):
    _quantize(qwen3_moe, tmp_path / "q", "--skip", "mlp.experts.*")
    names = SafetensorsCheckpoint(tmp_path / "q").names()
    assert not [n for n in names if ".experts." in n and n.endswith(".qweight")]
    assert [n for n in names if ".experts." in n and n.endswith(".weight")]
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    (in_block,) = config["quantization_config"]["modules_in_block_to_quantize"]
    assert in_block and not [n for n in in_block if "experts" in n] and "self_attn.q_proj" in in_block


def test_gptaq_calibrates_an_moe_model(qwen3_moe, tmp_path):
    from quantkit.verification.qlinear import load_model

    _quantize(qwen3_moe, tmp_path / "q", "--gptaq")
    model, _ = load_model(tmp_path / "q")
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(3, 200, (1, 8))).logits).all()


def _dense_twin_as_moe(dense, folder) -> None:
    """The dense Llama checkpoint as a Mixtral with one expert picked for every token: the same attention, norms and
    embeddings, its MLP as expert 0 (w1 = gate_proj, w3 = up_proj, w2 = down_proj), and a router of one row."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    tensors = _tensors(dense)
    renamed = {}
    for name, t in tensors.items():
        for proj, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            name = name.replace(f".mlp.{proj}.", f".block_sparse_moe.experts.0.{w}.")
        renamed[name] = t.contiguous()
    config = json.loads((dense / "config.json").read_text())
    for i in range(config["num_hidden_layers"]):
        renamed[f"model.layers.{i}.block_sparse_moe.gate.weight"] = torch.randn(1, config["hidden_size"])
    folder.mkdir()
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})
    keep = {k: config[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                   "rms_norm_eps", "bos_token_id", "eos_token_id", "tie_word_embeddings")}
    AutoConfig.for_model("mixtral", num_local_experts=1, num_experts_per_tok=1, rope_theta=10000.0,
                         **keep).save_pretrained(folder)
    for f in dense.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (folder / f.name).write_bytes(f.read_bytes())


def test_one_expert_routed_every_token_gets_the_dense_mlps_codes(tiny_llama_dir, tmp_path):
    """An MoE whose router always picks its one expert computes the dense MLP; calibrated on the same tokens, the
    expert's gate/up/down get exactly the codes, scales and zeros of the dense model's gate/up/down_proj."""
    moe = tmp_path / "moe"
    _dense_twin_as_moe(tiny_llama_dir, moe)
    _quantize(tiny_llama_dir, tmp_path / "dense-q")
    _quantize(moe, tmp_path / "moe-q")
    dense, routed = _tensors(tmp_path / "dense-q"), _tensors(tmp_path / "moe-q")
    pairs = 0
    for name, t in dense.items():
        twin = name
        for proj, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            twin = twin.replace(f".mlp.{proj}.", f".block_sparse_moe.experts.0.{w}.")
        assert torch.equal(routed[twin], t), name
        pairs += twin != name
    assert pairs == 2 * 3 * 4  # two layers x gate/up/down x qweight/qzeros/scales/g_idx


@pytest.mark.slow
def test_killed_inside_an_moe_layer_resumes_to_identical_files(qwen3_moe, tmp_path):
    import subprocess
    import sys

    def run(cache, kill_at=None):
        env = {k: v for k, v in os.environ.items() if k != "QUANTKIT_KILL_AT"}
        env.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", **({"QUANTKIT_KILL_AT": kill_at} if kill_at else {}))
        return subprocess.run([sys.executable, "-m", "quantkit", "quantize", str(qwen3_moe), *QUANTIZE,
                               "--expert-chunk", "1", "--repo-id", "test/moe-resume"],
                              capture_output=True, text=True, env=env, timeout=600)

    def published(cache):
        folder = cache / "models--test--moe-resume"
        snapshot = folder / "snapshots" / (folder / "refs" / "main").read_text()
        return {p.name: p.read_bytes() for p in sorted(snapshot.iterdir())}

    assert run(tmp_path / "clean").returncode == 0
    # layer 1's stages: q/k/v, o, then gate/up and down of each expert (one per pass); stage 5: inside the experts
    killed = run(tmp_path / "hub", kill_at="layer:1:stage:5")
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run(tmp_path / "hub")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after layer 1/2" in resumed.stderr
    assert published(tmp_path / "hub") == published(tmp_path / "clean")


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_number_of_experts(tiny_tokenizer, tmp_path):
    """Quantizing one MoE layer of 8 and of 64 experts of the same shape: the peak holds one chunk of experts'
    weights and Hessians either way (within 15%). The same 64 experts in one chunk hold all their Hessians, which
    is what the chunks save: the measurement can tell the two apart.

    oneDNN's primitive cache is turned off in the measured process: it keeps a compiled kernel per matmul shape
    (each expert's token count is a shape), up to 1024 of them, some 50 MB at these sizes whatever the model's
    size; that is the library's, not quantkit's memory."""
    import subprocess
    import sys

    shape = dict(layers=1, hidden_size=2048, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                 num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=32)

    def peak_mb(experts: int, chunk: int) -> float:
        base = tmp_path / f"e{experts}"
        if not base.exists():
            make_tiny_model(base, tiny_tokenizer, model_type="qwen3_moe", num_experts=experts, **shape)
        r = subprocess.run([sys.executable, "-m", "quantkit", "quantize", str(base), "--out", str(tmp_path / "q"),
                            "--overwrite", *QUANTIZE, "--expert-chunk", str(chunk), "--json"],
                           capture_output=True, text=True, timeout=600,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"})
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout)["peak_rss_mb"]

    eight, sixty_four, unchunked = peak_mb(8, 4), peak_mb(64, 4), peak_mb(64, 64)
    assert sixty_four <= 1.15 * eight, (eight, sixty_four)
    assert unchunked > 1.5 * eight, (eight, unchunked)  # 64 float32 [2048, 2048] Hessians at once: 1 GiB more


def test_loader_notes_and_the_transformers_loader_say_the_experts_do_not_load_there(moe_model):
    from quantkit.verification.compat import MIXTRAL_NAMES_NOTE, MOE_EXPERTS_NOTE

    model_type, base, out = moe_model
    r = CliRunner().invoke(cli, ["inspect", str(out), "--json"])
    assert r.exit_code == 0, r.output
    notes = json.loads(r.stdout)["notes"]
    assert MOE_EXPERTS_NOTE in notes
    assert (MIXTRAL_NAMES_NOTE in notes) == (model_type == "mixtral")
    r = CliRunner().invoke(cli, ["verify", str(out), "--base", str(base), "--loader", "transformers", "--json"])
    assert r.exit_code == 1
    assert "quantized Mixture-of-Experts experts, which transformers' from_pretrained does not load" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("damage", [{"tokens": ["x", 1, 2, 3]}, {"rounded": [9]}, {"experts": 5}, {"extra": 1}])
def test_a_damaged_expert_record_in_the_resume_state_is_one_line(qwen3_moe, tmp_path, damage):
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "quantkit", "quantize", str(qwen3_moe), *QUANTIZE, "--repo-id", "test/moe-damage"]
    killed = subprocess.run(cmd, capture_output=True, text=True, env={**env, "QUANTKIT_KILL_AT": "layer:0:saved"})
    assert killed.returncode == -9
    (state,) = (tmp_path / "quantkit-work").glob("*/state/state.json")
    data = json.loads(state.read_text())
    data["layers"][0]["experts"]["mlp.experts"].update(damage)
    state.write_text(json.dumps(data))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "experts" in lines[0] and "remove that directory to start over" in lines[0]


def test_a_skip_pattern_matching_nothing_lists_the_expert_linears_once(qwen3_moe, tmp_path):
    r = CliRunner().invoke(cli, ["quantize", str(qwen3_moe), "--out", str(tmp_path / "q"), *QUANTIZE,
                                 "--skip", "experts.*.w9"])
    assert r.exit_code == 1
    assert ("--skip 'experts.*.w9' matches none of the decoder layer's Linears (self_attn.q_proj, self_attn.k_proj, "
            "self_attn.v_proj, self_attn.o_proj, mlp.experts.*.gate_proj, mlp.experts.*.up_proj, "
            "mlp.experts.*.down_proj)") in r.output
