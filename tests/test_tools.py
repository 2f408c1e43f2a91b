"""Everyday tools: `quantkit estimate`, `quantkit inspect`, `quantkit cache list|rm`, and compatibility notes."""
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import hub_cache_env

import quantkit
from quantkit.cli.app import cli
from quantkit.verification.compat import compatibility_notes

GIB = 2**30


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def error_lines(r) -> list[str]:
    return [line for line in r.output.splitlines() if line.startswith("Error:")]


# ---------------------------------------------------------------- estimate: hand calculations
# Parameters of a Llama-2 model (untied lm_head, no biases):
#   embeddings + lm_head = 2 * vocab * hidden
#   per layer: q + o = 2 * hidden^2; k + v = 2 * hidden * kv_heads * 128; gate + up + down = 3 * hidden * inter;
#              two RMSNorms = 2 * hidden;  plus one final norm of hidden
HAND_PARAMS = {
    # 2*32000*4096 + 32*(4*4096*4096 + 3*4096*11008 + 2*4096) + 4096
    "llama-2-7b": 262_144_000 + 32 * (67_108_864 + 135_266_304 + 8_192) + 4_096,      # 6_738_415_616
    # 2*32000*5120 + 40*(4*5120*5120 + 3*5120*13824 + 2*5120) + 5120
    "llama-2-13b": 327_680_000 + 40 * (104_857_600 + 212_336_640 + 10_240) + 5_120,   # 13_015_864_320
    # 2*32000*8192 + 80*(2*8192*8192 + 2*8192*1024 + 3*8192*28672 + 2*8192) + 8192
    "llama-2-70b": 524_288_000 + 80 * (134_217_728 + 16_777_216 + 704_643_072 + 16_384) + 8_192,  # 68_976_648_192
}
PUBLISHED = {"llama-2-7b": 6.74e9, "llama-2-13b": 13.02e9, "llama-2-70b": 68.98e9}

# Bytes at 4 bits, group 128, per quantized Linear [in K, out N]:
#   K*N/2 (qweight) + K/128 groups * N * (2 fp16 scale + 0.5 packed zero) + 4*K (g_idx)
# and everything outside the decoder Linears (embeddings, lm_head, norms) in fp16: 2 bytes per parameter.
HAND_4BIT_G128 = {
    "llama-2-7b": (
        32 * (4 * (8_388_608 + 32 * 4096 * 2.5 + 16_384)           # q/k/v/o 4096 -> 4096:   8_732_672 each
              + 2 * (22_544_384 + 32 * 11008 * 2.5 + 16_384)      # gate/up 4096 -> 11008: 23_441_408 each
              + (22_544_384 + 86 * 4096 * 2.5 + 44_032))          # down 11008 -> 4096:    23_469_056
        + 2 * (262_144_000 + 32 * 8192 + 4096)),                  # fp16: embeddings, lm_head, norms
    "llama-2-13b": (
        40 * (4 * (13_107_200 + 40 * 5120 * 2.5 + 20_480)          # 13_639_680 each
              + 2 * (35_389_440 + 40 * 13824 * 2.5 + 20_480)      # 36_792_320 each
              + (35_389_440 + 108 * 5120 * 2.5 + 55_296))         # 36_827_136
        + 2 * (327_680_000 + 40 * 10_240 + 5120)),
    "llama-2-70b": (
        80 * (2 * (33_554_432 + 64 * 8192 * 2.5 + 32_768)          # q/o 8192 -> 8192:      34_897_920 each
              + 2 * (4_194_304 + 64 * 1024 * 2.5 + 32_768)        # k/v 8192 -> 1024:       4_390_912 each
              + 2 * (117_440_512 + 64 * 28672 * 2.5 + 32_768)     # gate/up 8192 -> 28672: 122_060_800 each
              + (117_440_512 + 224 * 8192 * 2.5 + 114_688))       # down 28672 -> 8192:   122_142_720
        + 2 * (524_288_000 + 80 * 16_384 + 8192)),                # = 36_638_572_544 in all
}


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-2-13b", "llama-2-70b"])
def test_estimate_matches_hand_calculation(name):
    e = quantkit.estimate(name, bits=[16, 4], group_size=128)
    assert e.total_params == HAND_PARAMS[name]
    assert abs(e.total_params / PUBLISHED[name] - 1) < 0.005
    assert e.weight(16).total_bytes == 2 * HAND_PARAMS[name]
    assert e.weight(4).total_bytes == int(HAND_4BIT_G128[name])


def test_llama2_70b_fits_one_80gb_gpu_only_when_quantized():
    e = quantkit.estimate("llama-2-70b")
    assert round(e.weight(16).total_bytes / GIB, 1) == 128.5   # 68.98e9 params * 2 bytes
    assert e.kv_cache_bytes == 2 * 80 * 8 * 128 * 4096 * 1 * 2  # K and V, 80 layers, 8 KV heads, fp16
    gpu80 = next(g for g in e.gpus if g["gpu_gb"] == 80)
    assert gpu80["run"][16] is False and gpu80["run"][4] is True
    # quantize on one GPU: the largest moment is down_proj's solve (8192 rows x 28672 inputs): the MLP's weights
    # in the model's float16 (the attention's are released after its stages), the Hessian in which the inverse
    # factor is made (its retry copy waits in pinned host memory), the float32 weight and its uint8 codes
    gpu = next(m for m in e.modes if m.mode == "1 gpu")
    mlp = (3 * 8192 * 28672 + 2 * 8192) * 2
    assert gpu.parts["layer"]["weights"] == mlp
    assert gpu.gpu_allocated == mlp + 28672**2 * 4 + 8192 * 28672 * 5
    # a CPU run: the same moment with the layer in float32 and the Hessian's retry copy beside it
    cpu = next(m for m in e.modes if m.mode == "cpu")
    assert cpu.parts["layer"]["total"] == 2 * mlp + 2 * 28672**2 * 4
    # on disk (CPU runs): the activations in the model's float16 and down_proj's inputs in float32
    assert cpu.parts["disk"]["scratch"] == 128 * 512 * (28672 * 4 + 8192 * 2)
    d = e.to_dict()
    assert json.loads(json.dumps(d))["gpus"][-1]["run"] == {"16": False, "8": True, "4": True, "3": True, "2": True}


def test_the_gptaq_estimate_holds_two_streams_and_the_cross_term():
    """quantize --gptaq: the unquantized copy of the layer and its activations, the cross term beside the Hessian,
    and while a solve factorizes the Hessian, its retry copy and the cross term (3 x 28672^2 floats, 70B down_proj)."""
    def layer(e, mode):
        return next(m for m in e.modes if m.mode == mode).parts["layer"]

    plain, gptaq = quantkit.estimate("llama-2-70b"), quantkit.estimate("llama-2-70b", gptaq=True)
    q = layer(gptaq, "cpu")
    assert q["weights"] == 2 * layer(plain, "cpu")["weights"]
    assert q["hessians"] == 2 * 28672**2 * 4 and q["solve"] == 3 * 28672**2 * 4
    assert q["total"] == q["weights"] + q["solve"]
    cpu = [next(m for m in e.modes if m.mode == "cpu").parts["disk"]["scratch"] for e in (plain, gptaq)]
    assert cpu[1] == 2 * cpu[0] == 2 * 128 * 512 * (28672 * 4 + 8192 * 2)
    gpu = [next(m for m in e.modes if m.mode == "1 gpu").parts["host"]["activations"] for e in (plain, gptaq)]
    assert gpu[1] == 2 * gpu[0] == 2 * 128 * 512 * 8192 * 2
    r = run("estimate", "llama-2-7b", "--bits", "4", "--gptaq", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["calibration"]["gptaq"] is True, r.output


def test_estimate_cli_human_and_json():
    r = run("estimate", "llama-2-70b")
    assert r.exit_code == 0, r.output
    assert "68.98 B" in r.output and "128.48" in r.output and "GiB" in r.output
    row80 = next(line for line in r.output.splitlines() if line.startswith("80 GB"))
    assert row80.split()[2:4] == ["no", "yes"]   # fp16 no, 8-bit yes
    r = run("estimate", "meta-llama/Llama-2-7b-hf", "--bits", "4", "--context", "2048", "--batch", "2", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["model"] == "llama-2-7b" and [w["bits"] for w in d["weights"]] == [4]
    assert d["kv_cache_bytes"] == 2 * 32 * 32 * 128 * 2048 * 2 * 2


def test_estimate_other_builtins_are_real_configs():
    # published sizes: Mistral 7.24B, Llama 3 8.03B / 70.6B, Qwen2.5-7B 7.62B (q/k/v biases), SmolLM2 134.5M (tied)
    for name, published in [("mistral-7b", 7.24e9), ("llama-3-8b", 8.03e9), ("llama-3-70b", 70.55e9),
                            ("qwen2.5-7b", 7.62e9), ("smollm2-135m", 134.5e6)]:
        assert abs(quantkit.estimate(name, bits=[4]).total_params / published - 1) < 0.005, name


def _tensor_shapes(model_dir: Path) -> dict[str, list[int]]:
    from quantkit.verification.integrity import read_header

    out = {}
    for f in model_dir.glob("*.safetensors"):
        out.update({k: v["shape"] for k, v in read_header(f).items()})
    return out


def test_estimate_on_a_model_dir_and_its_config(tiny_llama_dir):
    import math

    actual = sum(math.prod(s) for s in _tensor_shapes(tiny_llama_dir).values())
    r = run("estimate", tiny_llama_dir, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["params"]["total"] == actual and d["source"] == "directory"
    r2 = run("estimate", tiny_llama_dir / "config.json", "--json")
    assert r2.exit_code == 0 and json.loads(r2.output)["params"] == d["params"]


def test_estimate_bad_inputs(tmp_path):
    r = run("estimate", "llama-9-1t")
    assert r.exit_code == 1 and len(error_lines(r)) == 1
    assert "unknown model 'llama-9-1t'" in r.output and "llama-2-70b" in r.output and "Traceback" not in r.output
    r = run("estimate", "llama-2-7b", "--bits", "5")
    assert r.exit_code == 2 and "--bits" in r.output
    r = run("estimate", "llama-2-7b", "--group-size", "0")
    assert r.exit_code == 2 and "--group-size" in r.output
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 768}))
    r = run("estimate", tmp_path)
    assert r.exit_code == 1 and "Llama-family" in error_lines(r)[0]
    with pytest.raises(quantkit.errors.QuantkitError, match="unknown model"):
        quantkit.estimate("no-such-model")


# ---------------------------------------------------------------- inspect and cache on a real quantkit output
@pytest.fixture(scope="module")
def quantized(tiny_llama_dir, tmp_path_factory):
    """One round-to-nearest 4-bit g32 run of the tiny Llama into a private hub cache."""
    with hub_cache_env(tmp_path_factory.mktemp("hub")) as cache:
        r = run("quantize", tiny_llama_dir, "--repo-id", "test/tiny-rtn", "--method", "rtn", "--group-size", "32",
                "--json")
    assert r.exit_code == 0, r.output
    return cache, Path(json.loads(r.output)["path"])


def test_inspect_json_schema(quantized, tiny_llama_dir):
    _, snap = quantized
    r = run("inspect", snap, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert {"path", "quantization_config", "quant_method", "bits", "group_size", "sym", "desc_act",
            "checkpoint_format", "quantizer", "quantized_modules", "float_linears", "size_on_disk",
            "compression", "linear_compression", "manifest", "notes", "errors"} <= d.keys()
    assert (d["quant_method"], d["bits"], d["group_size"], d["sym"], d["checkpoint_format"]) == ("gptq", 4, 32, True,
                                                                                                 "gptq")
    assert d["quantizer"][0].startswith("quantkit:") and d["errors"] == []
    assert len(d["quantized_modules"]) == 14  # 2 layers x q/k/v/o/gate/up/down
    q = next(m for m in d["quantized_modules"] if m["name"] == "model.layers.0.self_attn.q_proj")
    # 64 -> 64 at 4-bit g32: qweight 64*64/2 + 2 groups * 64 * (2 + 0.5) + g_idx 64*4
    assert (q["in_features"], q["out_features"], q["bytes"], q["fp16_bytes"]) == (64, 64, 2048 + 320 + 256, 64 * 64 * 2)
    down = next(m for m in d["quantized_modules"] if m["name"] == "model.layers.1.mlp.down_proj")
    assert (down["in_features"], down["out_features"]) == (128, 64)
    assert [f["name"] for f in d["float_linears"]] == ["lm_head"] and d["float_linears"][0]["dtype"] == "F16"
    assert d["manifest"]["status"] == "ok" and d["manifest"]["files_checked"] >= 8 and d["manifest"]["problems"] == []
    assert d["linear_compression"] > 3 and 1 < d["compression"] < d["linear_compression"]
    assert d["size_on_disk"] > d["weight_file_bytes"] > 0
    # estimate predicts exactly what quantize wrote (fp16 embeddings, lm_head and norms; GPTQ Linears)
    e = quantkit.estimate(tiny_llama_dir, bits=[4], group_size=32).weight(4)
    assert e.linear_bytes == d["quantized_bytes"] and e.total_bytes == d["tensor_bytes"]
    report = quantkit.inspect(str(snap))
    assert report.bits == 4 and report.to_dict()["manifest"]["status"] == "ok"


def test_inspect_human_table(quantized, monkeypatch):
    cache, _ = quantized
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    r = run("inspect", "test/tiny-rtn")   # by repo id
    assert r.exit_code == 0, r.output
    out = r.output
    assert "gptq 4-bit, group 32, sym, desc_act off, checkpoint_format gptq" in out
    assert "manifest      ok:" in out and "KiB" in out and "x smaller than fp16" in out
    row = next(line for line in out.splitlines() if "model.layers.*.mlp.down_proj" in line)
    assert row.split()[1:5] == ["2", "128", "x", "64"]
    assert any(line.strip().startswith("lm_head") for line in out.splitlines())
    # 64-wide layers are below vLLM Marlin's 128-column tiles: said, as a note
    assert "note:" in out and "Marlin" in out
    r = run("estimate", "test/tiny-rtn", "--json")   # a cached repo id works for estimate too
    assert r.exit_code == 0 and json.loads(r.output)["source"] == "hub cache"


def test_inspect_reports_a_manifest_mismatch(quantized, tmp_path):
    _, snap = quantized
    copy = tmp_path / "copy"
    shutil.copytree(snap, copy)   # symlinks to blobs become real files
    shard = sorted(copy.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01              # a bit flipped in the tensor data: headers still read
    shard.write_bytes(bytes(data))
    r = run("inspect", copy, "--json")
    assert r.exit_code == 1
    d = json.loads(r.stdout)
    assert d["manifest"]["status"] == "mismatch"
    assert d["manifest"]["problems"] == [
        f"{shard.name}: sha256 differs from quantkit.json (file corrupted or modified)"]
    r = run("inspect", copy)
    assert r.exit_code == 1 and "MISMATCH: 1 problem" in r.output
    assert error_lines(r) == [f"Error: checkpoint damaged: {d['manifest']['problems'][0]}"]
    (copy / "quantkit.json").unlink()
    r = run("inspect", copy, "--json")
    assert r.exit_code == 0 and json.loads(r.output)["manifest"]["status"] == "no manifest"


def test_inspect_unquantized_and_missing(tiny_llama_dir, tmp_path):
    r = run("inspect", tiny_llama_dir, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["quant_method"] is None and d["quantized_modules"] == [] and len(d["float_linears"]) == 15
    r = run("inspect", tmp_path / "nope")
    assert r.exit_code == 1 and "not found" in error_lines(r)[0]


def test_cache_list_and_rm(quantized, hub_cache, tiny_llama_dir):
    cache, _ = quantized
    shutil.copytree(cache / "models--test--tiny-rtn", hub_cache / "models--test--tiny-rtn", symlinks=True)
    base = hub_cache / "models--plain--base" / "snapshots" / ("ab" * 20)   # an unquantized repo is not listed
    base.mkdir(parents=True)
    shutil.copy(tiny_llama_dir / "config.json", base / "config.json")
    (hub_cache / "models--plain--base" / "refs").mkdir()
    (hub_cache / "models--plain--base" / "refs" / "main").write_text("ab" * 20)

    r = run("cache", "list")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split()[:5] == ["repo", "id", "method", "bits", "group"] and len(lines) == 2
    assert lines[1].split()[:5] == ["test/tiny-rtn", "gptq", "4", "32", "sym"] and "KiB" in lines[1]
    d = json.loads(run("cache", "list", "--json").output)
    assert [m["repo_id"] for m in d["models"]] == ["test/tiny-rtn"] and d["models"][0]["size_bytes"] > 0
    assert [m.repo_id for m in quantkit.cache_list()] == ["test/tiny-rtn"]

    r = run("cache", "rm", "test/tiny-rtn", input="n\n")       # declined: nothing removed
    assert r.exit_code == 1 and (hub_cache / "models--test--tiny-rtn").is_dir()
    r = run("cache", "rm", "test/tiny-rtn", input="y\n")
    assert r.exit_code == 0 and "removed test/tiny-rtn" in r.output
    assert not (hub_cache / "models--test--tiny-rtn").exists()
    assert "no quantized models" in run("cache", "list").output

    r = run("cache", "rm", "test/tiny-rtn", "--yes")
    assert r.exit_code == 1 and error_lines(r) == [
        f"Error: test/tiny-rtn is not in the hub cache ({hub_cache}); `quantkit cache list` shows what is"]
    r = run("cache", "rm", "../escape", "--yes")
    assert r.exit_code == 1 and "invalid repo id" in error_lines(r)[0]
    assert run("cache", "rm", "plain/base", "--yes").exit_code == 0
    assert sorted(p.name for p in hub_cache.iterdir() if not p.name.startswith(".")) == []


# ---------------------------------------------------------------- compatibility notes
GOOD = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False,
        "checkpoint_format": "gptq"}
LLAMA_SHAPES = {"model.layers.0.self_attn.q_proj": (4096, 4096), "model.layers.0.mlp.down_proj": (4096, 11008)}


def test_compat_clean_settings_have_no_notes():
    assert compatibility_notes(GOOD, LLAMA_SHAPES) == []
    notes = compatibility_notes({**GOOD, "bits": 8}, LLAMA_SHAPES)   # Marlin takes 8-bit sym; ExLlama does not
    assert len(notes) == 1 and notes[0].startswith("ExLlama") and "8-bit" in notes[0]


def test_compat_asym_v2():
    notes = compatibility_notes({**GOOD, "sym": False, "checkpoint_format": "gptq_v2"}, LLAMA_SHAPES)
    assert any("asymmetric" in n and "Marlin" in n for n in notes)
    assert any("gptq_v2" in n and "garbage" in n for n in notes)


def test_compat_3bit():
    notes = compatibility_notes({**GOOD, "bits": 3}, LLAMA_SHAPES)
    assert any("3-bit" in n and "Marlin" in n for n in notes)
    assert any("v1 'gptq' format" in n for n in notes)
    assert any(n.startswith("ExLlama") and "4-bit only" in n for n in notes)


def test_compat_ragged_groups():
    shapes = {"model.layers.0.self_attn.q_proj": (576, 576), "model.layers.0.mlp.down_proj": (576, 1536)}
    notes = compatibility_notes(GOOD, shapes)
    ragged = [n for n in notes if "partial last group" in n]
    assert len(ragged) == 1 and "1 module (e.g. model.layers.0.self_attn.q_proj)" in ragged[0]
    assert 'backend="torch"' in ragged[0] and "Marlin" in ragged[0]
    notes = compatibility_notes({**GOOD, "group_size": 64}, shapes)   # 576 % 64 == 0, but 576 % 128 != 0
    assert len(notes) == 1 and "not divisible by 128" in notes[0] and "--quantization gptq" in notes[0]


def test_compat_desc_act_per_row_and_other_methods():
    notes = compatibility_notes({**GOOD, "desc_act": True, "group_size": -1}, LLAMA_SHAPES)
    assert notes == ["TGI: desc_act with group_size -1 breaks its exllama path"]
    assert compatibility_notes({**GOOD, "desc_act": True}, LLAMA_SHAPES) == []
    assert "GPTQ checkpoints only" in compatibility_notes({"quant_method": "awq", "bits": 4})[0]
