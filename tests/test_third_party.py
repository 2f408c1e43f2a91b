"""GPTQ checkpoints made by other tools: AutoGPTQ/TheBloke layouts (settings only in quantize_config.json, one
gptq_model-4bit-<g>g.safetensors without an index, no quantkit.json), GPTQModel outputs (gptq and gptq_v2, its
`format` key and meta fields) and optimum's; and `inspect` on Mixture-of-Experts checkpoints (per-expert names)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli_run, error_line, has_ecosystem, make_tiny_model

from quantkit.config import CalibSpec, QuantSpec
from quantkit.run.pipeline import quantize
from quantkit.write.packing import pack_qzeros, unpack_qzeros

FAST = ["--seq-len", "32", "--max-tokens", "256", "--no-generate"]
THEBLOKE_FILE = "gptq_model-4bit-32g.safetensors"
UNCHECKED = ["file_hashes", "base_model", "calibration"]


def verify_json(*args) -> tuple[int, dict]:
    r = cli_run("verify", *args, "--json")
    assert r.exit_code in (0, 1), r.output
    return r.exit_code, json.loads(r.stdout)


@pytest.fixture(scope="module")
def quantkit_out(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qk") / "gptq"
    quantize(str(tiny_llama_dir), QuantSpec(bits=4, group_size=32), CalibSpec(samples=8, seq_len=32), out=out)
    return out


@pytest.fixture(scope="module")
def reference(quantkit_out, tiny_llama_dir) -> dict:
    """verify of the quantkit output itself: what every re-laid-out copy of its tensors must reproduce."""
    code, d = verify_json(quantkit_out, "--base", tiny_llama_dir, *FAST)
    assert code == 0 and d["integrity"]["unchecked"] == [], d
    return d


def without_quantkit_files(src: Path, dst: Path) -> tuple[dict, dict]:
    """A copy of a quantkit output without its manifest, model card and index; returns (config, quantization_config)
    of its config.json."""
    shutil.copytree(src, dst)
    for name in ("quantkit.json", "README.md", "model.safetensors.index.json"):
        (dst / name).unlink()
    config = json.loads((dst / "config.json").read_text())
    return config, config["quantization_config"]


def thebloke(src: Path, dst: Path, weights: str = THEBLOKE_FILE, in_config: bool = False) -> Path:
    """AutoGPTQ's layout, as older TheBloke repositories have it: the settings in quantize_config.json only (no
    quant_method, no checkpoint_format, no meta), one weight file named after them, no index, no quantkit.json."""
    config, qcfg = without_quantkit_files(src, dst)
    (dst / "model-00001-of-00001.safetensors").rename(dst / weights)
    if not in_config:
        del config["quantization_config"]
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    autogptq = {k: qcfg[k] for k in ("bits", "group_size", "desc_act", "sym", "true_sequential", "static_groups")}
    autogptq |= {"damp_percent": 0.01, "model_name_or_path": None, "model_file_base_name": weights[:-12]}
    (dst / "quantize_config.json").write_text(json.dumps(autogptq, indent=2))
    return dst


def gptqmodel_v2_by_hand(src: Path, dst: Path) -> Path:
    """GPTQModel's gptq_v2 layout made from a symmetric quantkit (v1) output: zero points stored without v1's -1
    offset, its config keys (`format` only, `pack_dtype`, `method`, `meta.quantizer`, `meta.damp_percent`), one
    model.safetensors. For CI without gptqmodel; the test below checks it against a real GPTQModel output."""
    from safetensors.torch import load_file, save_file

    config, qcfg = without_quantkit_files(src, dst)
    shard = dst / "model-00001-of-00001.safetensors"
    tensors = load_file(shard)
    shard.unlink()
    for name in [n for n in tensors if n.endswith(".qzeros")]:
        n_out = tensors[name[: -len("qzeros")] + "scales"].shape[1]
        tensors[name] = pack_qzeros(unpack_qzeros(tensors[name], 4, n_out) + 1, 4)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config["quantization_config"] = {
        "bits": 4, "group_size": qcfg["group_size"], "desc_act": qcfg["desc_act"], "sym": True, "lm_head": False,
        "quant_method": "gptq", "method": "gptq", "format": "gptq_v2", "pack_dtype": "int32",
        "meta": {"quantizer": ["gptqmodel:7.6.0"], "uri": "https://github.com/modelcloud/gptqmodel",
                 "damp_percent": 0.05, "damp_auto_increment": 0.01, "static_groups": False, "true_sequential": True,
                 "mse": 0.0, "act_group_aware": True}}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    (dst / "quantize_config.json").unlink()
    return dst


# --- AutoGPTQ / TheBloke ----------------------------------------------------------------------------------------

def test_inspect_shows_a_thebloke_layout(quantkit_out, tmp_path):
    tb = thebloke(quantkit_out, tmp_path / "tb")
    r = cli_run("inspect", tb)
    assert r.exit_code == 0, r.output
    assert ("gptq 4-bit, group 32, sym, desc_act on, checkpoint_format gptq  (settings from quantize_config.json)"
            in r.output)
    assert "manifest      no manifest" in r.output and "1 safetensors file" in r.output
    row = next(line for line in r.output.splitlines() if "model.layers.*.mlp.down_proj" in line)
    assert row.split()[1:5] == ["2", "128", "x", "64"]
    assert "note: the GPTQ settings are only in quantize_config.json" in r.output
    assert f"note: the weights are in {THEBLOKE_FILE}, without an index" in r.output
    d = json.loads(cli_run("inspect", tb, "--json").output)
    assert d["settings_file"] == "quantize_config.json" and d["bits"] == 4 and len(d["quantized_modules"]) == 14
    assert d["errors"] == [] and d["quant_method"] == "gptq"


def test_verify_of_a_thebloke_layout_against_its_base_passes_and_says_what_it_could_not_check(
        quantkit_out, reference, tiny_llama_dir, tmp_path):
    tb = thebloke(quantkit_out, tmp_path / "tb")
    code, d = verify_json(tb, "--base", tiny_llama_dir, *FAST)
    assert code == 0 and d["passed"], d["failures"]
    assert d["quantized"]["ppl"] == reference["quantized"]["ppl"] and d["kl_mean"] == reference["kl_mean"]
    i = d["integrity"]
    assert i["ok"] and i["unchecked"] == UNCHECKED and i["warnings"] == [] and i["manifest"] is False
    assert i["settings_file"] == "quantize_config.json" and i["quantized_modules"] == 14
    assert d["layers"] == []  # the per-layer GPTQ losses live in quantkit.json only
    r = cli_run("verify", tb, "--base", tiny_llama_dir, *FAST)
    assert r.exit_code == 0 and r.output.rstrip().endswith("PASSED")
    notes = [line for line in r.output.splitlines() if line.startswith("note: no quantkit.json manifest")]
    assert notes == ["note: no quantkit.json manifest (not written by quantkit), so these go unchecked: each file's "
                     "sha256; the base model it was made from; its calibration settings and per-layer losses"]


def test_verify_without_base_says_in_one_line_that_it_needs_one(quantkit_out, tmp_path):
    tb = thebloke(quantkit_out, tmp_path / "tb")
    r = cli_run("verify", tb, *FAST)
    assert r.exit_code == 0, r.output
    lines = [line for line in r.output.splitlines() if "--base" in line]
    assert lines == ["note: no --base given, and without quantkit.json the checkpoint records no base: reporting "
                     "integrity and the quantized model's own perplexity only; pass --base MODEL to compare"]
    assert "PASSED (integrity only: no base to compare with)" in r.output


def test_thebloke_layout_with_model_safetensors_and_both_configs(quantkit_out, reference, tiny_llama_dir, tmp_path):
    tb = thebloke(quantkit_out, tmp_path / "tb", weights="model.safetensors", in_config=True)
    code, d = verify_json(tb, "--base", tiny_llama_dir, *FAST)
    assert code == 0 and d["quantized"]["ppl"] == reference["quantized"]["ppl"]
    assert d["integrity"]["settings_file"] == "config.json"
    assert not any("quantize_config.json" in n or "without an index" in n for n in d["integrity"]["notes"])


@pytest.mark.ecosystem
@pytest.mark.skipif(not has_ecosystem(), reason="needs optimum + gptqmodel")
def test_transformers_loader_reads_settings_only_in_quantize_config(quantkit_out, reference, tiny_llama_dir, tmp_path):
    tb = thebloke(quantkit_out, tmp_path / "tb", weights="model.safetensors")
    code, d = verify_json(tb, "--base", tiny_llama_dir, *FAST, "--loader", "transformers")
    assert code == 0 and d["quantized"]["load"]["quantized"] is True
    assert abs(d["quantized"]["ppl"] / reference["quantized"]["ppl"] - 1) < 0.005
    odd = thebloke(quantkit_out, tmp_path / "odd")  # gptq_model-4bit-32g.safetensors: from_pretrained cannot find it
    r = cli_run("verify", odd, "--base", tiny_llama_dir, *FAST, "--loader", "transformers")
    assert r.exit_code == 1 and "use --loader quantkit" in error_line(r) and THEBLOKE_FILE in error_line(r)


@pytest.mark.parametrize("content, message", [
    (b"", "quantize_config.json"),
    (b'{"bits": 4, "group_size": 32', "quantize_config.json"),
    (b"[4]", "quantize_config.json"),
    (b"{}", "quantize_config.json: bits = None"),
    (b'{"bits": "4", "group_size": 32}', "quantize_config.json: bits = '4'"),
    (b'{"bits": 4, "group_size": 32, "format": "gptq_v2", "checkpoint_format": "gptq"}', "disagree"),
])
@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_a_damaged_quantize_config_is_one_error_line(quantkit_out, tmp_path, content, message, command):
    tb = thebloke(quantkit_out, tmp_path / "tb")
    (tb / "quantize_config.json").write_bytes(content)
    r = cli_run(command, tb, *(FAST if command == "verify" else []))
    assert r.exit_code == 1 and message in error_line(r), r.output


@pytest.mark.parametrize("edit, message", [
    ({"pack_dtype": "int16"}, "pack_dtype = 'int16': quantkit reads codes packed into int32 only"),
    ({"dynamic": {"+:.*gate_proj": {"bits": 8}}}, "dynamic = '+:.*gate_proj': per-module settings"),
    ({"is_marlin_format": True}, "checkpoint_format = 'marlin': expected 'gptq' or 'gptq_v2'"),
    ({"group_size": 64}, "group size 64"),
])
def test_settings_quantkit_cannot_read_fail_verify_with_one_line(quantkit_out, tmp_path, edit, message):
    tb = thebloke(quantkit_out, tmp_path / "tb")
    qcfg = json.loads((tb / "quantize_config.json").read_text()) | edit
    (tb / "quantize_config.json").write_text(json.dumps(qcfg))
    r = cli_run("verify", tb, *FAST)
    assert r.exit_code == 1 and message in error_line(r), r.output


def test_only_unquantized_rules_in_dynamic_are_accepted(quantkit_out, tiny_llama_dir, tmp_path):
    tb = thebloke(quantkit_out, tmp_path / "tb")
    qcfg = json.loads((tb / "quantize_config.json").read_text())
    qcfg["dynamic"] = {"-:.*lm_head": {}, "+:.*down_proj": {"bits": 4}}  # a skip, and an override that changes nothing
    (tb / "quantize_config.json").write_text(json.dumps(qcfg))
    code, d = verify_json(tb, "--base", tiny_llama_dir, *FAST)
    assert code == 0 and d["integrity"]["ok"]


def test_quantize_refuses_a_thebloke_layout_as_its_base(quantkit_out, tmp_path):
    tb = thebloke(quantkit_out, tmp_path / "tb")
    r = cli_run("quantize", tb, "--out", tmp_path / "again", "--method", "rtn")
    assert r.exit_code == 1 and "is already quantized (gptq)" in error_line(r)


# --- GPTQModel and optimum --------------------------------------------------------------------------------------

def test_gptqmodel_v2_layout_by_hand_reads_zeros_without_the_offset(quantkit_out, reference, tiny_llama_dir, tmp_path):
    v2 = gptqmodel_v2_by_hand(quantkit_out, tmp_path / "v2")
    r = cli_run("inspect", v2)
    assert r.exit_code == 0 and "checkpoint_format gptq_v2  (by gptqmodel:7.6.0)" in r.output
    code, d = verify_json(v2, "--base", tiny_llama_dir, *FAST)
    assert code == 0 and d["integrity"]["quantization"]["checkpoint_format"] == "gptq_v2"
    assert d["quantized"]["ppl"] == reference["quantized"]["ppl"]  # read as v1, every zero would be off by one
    assert d["integrity"]["unchecked"] == UNCHECKED


# GPTQModel (gptq and gptq_v2) and transformers + optimum quantize the tiny Llama on CPU, in a child process that
# keeps gptqmodel's environment settings and banners out of this one.
PEERS = """
import sys, torch
from pathlib import Path
base, out = sys.argv[1], Path(sys.argv[2])
g = torch.Generator().manual_seed(0)
rows = [torch.randint(3, 500, (32,), generator=g).tolist() for _ in range(8)]
from gptqmodel import GPTQModel, QuantizeConfig
for fmt in ("gptq", "gptq_v2"):
    model = GPTQModel.load(base, QuantizeConfig(bits=4, group_size=32, sym=True, format=fmt), device="cpu")
    model.quantize([{"input_ids": r, "attention_mask": [1] * len(r)} for r in rows], batch_size=1)
    model.save(str(out / f"gptqmodel-{fmt}"))
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig
tok = AutoTokenizer.from_pretrained(base)
config = GPTQConfig(bits=4, group_size=32, dataset=[tok.decode(r) for r in rows], tokenizer=tok, desc_act=False)
model = AutoModelForCausalLM.from_pretrained(base, quantization_config=config, device_map="cpu", dtype=torch.float16)
model.save_pretrained(out / "optimum")
tok.save_pretrained(out / "optimum")
"""


@pytest.fixture(scope="module")
def peers(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("peers")
    env = {**os.environ, "BUILD_CUDA_EXT": "0", "GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", PEERS, str(tiny_llama_dir), str(out)], capture_output=True, text=True,
                       env=env, timeout=600, cwd=out.parent)  # GPTQModel writes a logs/ folder where it runs
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.ecosystem
@pytest.mark.skipif(not has_ecosystem(), reason="needs optimum + gptqmodel")
def test_gptqmodel_outputs_inspect_and_verify(peers, tiny_llama_dir, tmp_path):
    v1, v2 = peers / "gptqmodel-gptq", peers / "gptqmodel-gptq_v2"
    qcfg = json.loads((v2 / "config.json").read_text())["quantization_config"]
    assert qcfg["format"] == "gptq_v2" and qcfg["pack_dtype"] == "int32" and "damp_percent" in qcfg["meta"]
    for out, fmt in ((v1, "gptq"), (v2, "gptq_v2")):
        r = cli_run("inspect", out)
        assert r.exit_code == 0 and f"checkpoint_format {fmt}  (by gptqmodel:" in r.output, r.output
    ppl = {}
    for out in (v1, v2):
        code, d = verify_json(out, "--base", tiny_llama_dir, *FAST)
        assert code == 0 and d["passed"] and d["integrity"]["unchecked"] == UNCHECKED, d
        ppl[out.name] = d["quantized"]["ppl"]
    # the same codes stored both ways: equal only when v2's zeros are read without v1's offset
    assert ppl["gptqmodel-gptq"] == ppl["gptqmodel-gptq_v2"]
    spelled = shutil.copytree(v2, tmp_path / "format-only")  # GPTQModel reads `format` first: so does quantkit
    for name in ("config.json", "quantize_config.json"):
        cfg = json.loads((spelled / name).read_text())
        (cfg.get("quantization_config") or cfg).pop("checkpoint_format")
        (spelled / name).write_text(json.dumps(cfg))
    code, d = verify_json(spelled, "--base", tiny_llama_dir, *FAST)
    assert code == 0 and d["quantized"]["ppl"] == ppl["gptqmodel-gptq_v2"]
    code, hf = verify_json(v2, "--base", tiny_llama_dir, *FAST, "--loader", "transformers")
    assert code == 0 and abs(hf["quantized"]["ppl"] / ppl["gptqmodel-gptq_v2"] - 1) < 0.005


@pytest.mark.ecosystem
@pytest.mark.skipif(not has_ecosystem(), reason="needs optimum + gptqmodel")
def test_optimum_output_inspects_and_verifies(peers, tiny_llama_dir):
    out = peers / "optimum"
    r = cli_run("inspect", out)
    assert r.exit_code == 0 and "(by optimum:" in r.output, r.output
    code, d = verify_json(out, "--base", tiny_llama_dir, *FAST)
    assert code == 0 and d["passed"] and d["integrity"]["unchecked"] == UNCHECKED, d


# --- Mixture-of-Experts names in inspect ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_qwen3_moe(tiny_tokenizer, tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("moe"), tiny_tokenizer, model_type="qwen3_moe", num_experts=4,
                           num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16)


def test_inspect_groups_the_experts_of_an_unquantized_moe(tiny_qwen3_moe):
    r = cli_run("inspect", tiny_qwen3_moe)
    assert r.exit_code == 0, r.output
    assert "experts       4 per layer in 2 layers (model.layers.*.mlp.experts)" in r.output
    rows = [line.split() for line in r.output.splitlines() if ".experts." in line]
    assert [row[0] for row in rows] == [f"model.layers.*.mlp.experts.[0-3].{n}" for n in ("down_proj", "gate_proj",
                                                                                         "up_proj")]
    assert all(row[1:3] == ["x4", "8"] for row in rows)  # 4 experts in each of 2 layers
    assert any(line.split()[:2] == ["model.layers.*.mlp.gate", "2"] for line in r.output.splitlines())  # the router
    d = json.loads(cli_run("inspect", tiny_qwen3_moe, "--json").output)
    assert d["experts"] == {"model.layers.0.mlp.experts": 4, "model.layers.1.mlp.experts": 4}
    assert len([f for f in d["float_linears"] if ".experts." in f["name"]]) == 24  # the JSON keeps every module


def gptq_tensors(name: str, n_in: int, n_out: int, group: int = 32) -> dict[str, torch.Tensor]:
    """Zero-filled 4-bit GPTQ tensors of one Linear, shaped as a checkpoint holds them (headers are all inspect
    reads)."""
    groups = n_in // group
    return {f"{name}.qweight": torch.zeros(n_in // 8, n_out, dtype=torch.int32),
            f"{name}.qzeros": torch.zeros(groups, n_out // 8, dtype=torch.int32),
            f"{name}.scales": torch.ones(groups, n_out, dtype=torch.float16),
            f"{name}.g_idx": torch.arange(n_in, dtype=torch.int32) // group}


def test_inspect_groups_gptq_experts_and_counts_them_per_layer(tiny_qwen3_moe, tmp_path):
    """A GPTQ MoE with per-expert names (DeepSeek's shape: a dense first layer, then 8 and 6 experts), one
    Mixtral-named block beside it."""
    from safetensors.torch import save_file

    out = tmp_path / "moe-gptq"
    out.mkdir()
    config = json.loads((tiny_qwen3_moe / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True,
                                     "desc_act": False, "checkpoint_format": "gptq"}
    (out / "config.json").write_text(json.dumps(config))
    tensors = gptq_tensors("model.layers.0.mlp.gate_proj", 64, 128)
    for layer, experts in ((1, 8), (2, 6)):
        for e in range(experts):
            prefix = f"model.layers.{layer}.mlp.experts.{e}"
            tensors |= gptq_tensors(f"{prefix}.gate_proj", 64, 32) | gptq_tensors(f"{prefix}.down_proj", 32, 64)
        tensors[f"model.layers.{layer}.mlp.gate.weight"] = torch.zeros(experts, 64, dtype=torch.float16)
    for e in range(2):
        tensors |= gptq_tensors(f"model.layers.3.block_sparse_moe.experts.{e}.w1", 64, 32)
    save_file(tensors, out / "model.safetensors")
    r = cli_run("inspect", out)
    assert r.exit_code == 0, r.output
    assert ("experts       2 per layer in 1 layer (model.layers.*.block_sparse_moe.experts); 6-8 per layer in 2 "
            "layers (model.layers.*.mlp.experts)") in r.output
    rows = {line.split()[0]: line.split()[1:] for line in r.output.splitlines() if line.startswith("  model.")}
    assert rows["model.layers.*.mlp.experts.[0-7].gate_proj"][:5] == ["x6-8", "14", "64", "x", "32"]
    assert rows["model.layers.*.mlp.experts.[0-7].down_proj"][:5] == ["x6-8", "14", "32", "x", "64"]
    assert rows["model.layers.*.block_sparse_moe.experts.[0-1].w1"][:2] == ["x2", "2"]
    assert rows["model.layers.*.mlp.gate_proj"][:1] == ["1"]  # the dense layer's MLP: no expert count
    d = json.loads(cli_run("inspect", out, "--json").output)
    assert d["experts"] == {"model.layers.1.mlp.experts": 8, "model.layers.2.mlp.experts": 6,
                            "model.layers.3.block_sparse_moe.experts": 2}
    assert len(d["quantized_modules"]) == 1 + 2 * 14 + 2 and d["errors"] == []
