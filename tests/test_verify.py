"""`quantkit verify`: integrity, metrics, generations, thresholds, exit codes, reports, and both loaders."""
import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import has_ecosystem, make_tiny_model

from quantkit.config import CalibSpec, QuantSpec
from quantkit.run.pipeline import quantize
from quantkit.untrusted import sha256_file
from quantkit.write.gptq_format import dequantize_module, module_tensors

FAST = ["--seq-len", "64", "--max-tokens", "512"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
NO_SYSTEM_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                      "supported') }}{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>{% endif %}")
REQUIRED_KEYS = {"passed", "failures", "ppl_ratio", "kl_mean", "kl_p99", "top1_agreement", "tokens", "base",
                 "quantized"}


def run(*args):
    from quantkit.cli.app import cli

    return CliRunner().invoke(cli, ["verify", *(str(a) for a in args)])


def run_json(*args) -> tuple[int, dict]:
    r = run(*args, "--json")
    assert r.exit_code in (0, 1), r.output
    return r.exit_code, json.loads(r.stdout)


def error_lines(r) -> list[str]:
    return [line for line in r.output.splitlines() if line.startswith("Error:")]


def rewrite_manifest(model_dir: Path) -> None:
    """Recompute sha256 and size of every listed file, as if the damaged checkpoint had been written that way."""
    path = model_dir / "quantkit.json"
    manifest = json.loads(path.read_text())
    for name, entry in manifest["files"].items():
        entry.update(sha256=sha256_file(model_dir / name), size=(model_dir / name).stat().st_size)
    path.write_text(json.dumps(manifest))


def scale_layer(model_dir: Path, layer: int, factor: float) -> None:
    """Multiply every scales tensor of one decoder layer by factor and rewrite the manifest to match."""
    from safetensors.torch import load_file, save_file

    for shard in model_dir.glob("*.safetensors"):
        tensors = load_file(shard)
        hit = [k for k in tensors if k.startswith(f"model.layers.{layer}.") and k.endswith(".scales")]
        for k in hit:
            tensors[k] = tensors[k] * factor
        if hit:
            save_file(tensors, shard, metadata={"format": "pt"})
    rewrite_manifest(model_dir)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=False)
    return dst


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny random Llama whose tokenizer has a chat template with a system role."""
    path = make_tiny_model(tmp_path_factory.mktemp("tiny-chat"), tiny_tokenizer)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def tiny_gptq(tiny_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q") / "gptq"
    quantize(str(tiny_base), QuantSpec(bits=4, group_size=32), CalibSpec(samples=8, seq_len=32), out=out)
    return out


# --- the pure-torch loader ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_linear_is_exact_to_the_format(bits):
    from quantkit.solve.gptq import GPTQResult
    from quantkit.solve.grid import rtn_quantize
    from quantkit.verification.gptq_linear import GPTQLinear

    g = torch.Generator().manual_seed(bits)
    W = torch.randn(64, 96, generator=g)
    codes, scales, zeros = rtn_quantize(W, bits, 32, sym=False)
    res = GPTQResult(codes=codes, scales=scales, zeros=zeros, g_idx=(torch.arange(96) // 32).int(), weight=None,
                     loss=0.0, damp=0.01)
    t = module_tensors("m", res, bits, "gptq_v2", bias=torch.randn(64, generator=g))
    layer = GPTQLinear.from_tensors(t["m.qweight"], t["m.qzeros"], t["m.scales"], t["m.g_idx"], bits, "gptq_v2",
                                    bias=t["m.bias"])
    x = torch.randn(3, 5, 96, generator=g)
    W_ref = dequantize_module(t["m.qweight"], t["m.qzeros"], t["m.scales"], t["m.g_idx"], bits, "gptq_v2")
    assert torch.equal(layer(x), torch.nn.functional.linear(x, W_ref, t["m.bias"].float()))
    assert ((W_ref - W).abs().max() / W.abs().max()).item() < 2.0 / 2**bits  # it really is W, quantized


def test_loader_swaps_linears_and_matches_checkpoint(tiny_gptq):
    from quantkit.source.checkpoint import SafetensorsCheckpoint
    from quantkit.verification.gptq_linear import GPTQLinear
    from quantkit.verification.qlinear import load_model

    model, info = load_model(tiny_gptq)
    q = model.model.layers[1].mlp.down_proj
    assert isinstance(q, GPTQLinear) and info.quantized and info.cached and not info.offloaded
    ckpt = SafetensorsCheckpoint(tiny_gptq)
    name = "model.layers.1.mlp.down_proj"
    expected = dequantize_module(*(ckpt.get(f"{name}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx")), 4, "gptq")
    assert torch.equal(q.dequantized_weight(), expected)
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert sum(isinstance(m, GPTQLinear) for m in model.modules()) == 14


def test_max_memory_offloads_layers_to_disk_with_identical_results(tiny_gptq, tmp_path):
    from quantkit.verification.metrics import logits as _logits
    from quantkit.verification.qlinear import load_model

    ids = torch.randint(0, 500, (48,), generator=torch.Generator().manual_seed(0))
    ref_model, ref_info = load_model(tiny_gptq)
    packed = ref_info.packed_bytes
    model, info = load_model(tiny_gptq, max_memory=packed - 1, offload_dir=tmp_path)
    assert info.offloaded and not info.cached and info.resident_bytes < packed
    assert torch.equal(_logits(model, ids), _logits(ref_model, ids))
    lean, lean_info = load_model(tiny_gptq, max_memory=packed + 1)  # packed fits: no cache, nothing offloaded
    assert not lean_info.cached and not lean_info.offloaded
    assert torch.equal(_logits(lean, ids), _logits(ref_model, ids))


# --- metrics, thresholds, exit codes --------------------------------------------------------------------------

def test_model_against_itself_is_exact(tiny_base):
    code, d = run_json(tiny_base, "--base", tiny_base, *FAST, "--no-generate")
    assert code == 0 and d["passed"] and d["failures"] == []
    assert d["ppl_ratio"] == 1.0 and d["kl_mean"] == 0.0 and d["kl_p99"] == 0.0 and d["top1_agreement"] == 1.0
    assert d["base"]["ppl"] == d["quantized"]["ppl"] and d["tokens"] == 8 * 63
    assert d["integrity"]["quantization"] is None and any("unquantized" in n for n in d["integrity"]["notes"])


def test_quantized_passes_with_recorded_base_and_json_schema(tiny_gptq, tiny_base, tmp_path):
    r = run(tiny_gptq, *FAST, "--json", "--report", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert REQUIRED_KEYS <= d.keys() and d["passed"] is True
    assert d["base"]["origin"] == "manifest" and d["base"]["path"] == str(tiny_base.resolve())
    for key in ("ppl_ratio", "kl_mean", "kl_p99", "top1_agreement"):
        assert isinstance(d[key], float) and math.isfinite(d[key])
    assert d["base"]["ppl"] > 1 and d["quantized"]["ppl"] > 1 and d["tokens"] == 8 * 63
    assert abs(d["ppl_ratio"] - d["quantized"]["ppl"] / d["base"]["ppl"]) < 1e-9
    assert 0 < d["kl_mean"] <= d["kl_p99"] and 0.5 < d["top1_agreement"] < 1
    assert d["integrity"]["ok"] and d["integrity"]["files_checked"] > 0
    assert [w["index"] for w in d["per_window"]] == list(range(8))
    assert len(d["layers"]) == 2 and d["layers"][0]["worst_module"]
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["kl_mean"] == d["kl_mean"]


def test_chat_prompts_use_the_template_with_a_system_message(tiny_gptq):
    code, d = run_json(tiny_gptq, *FAST, "--max-new-tokens", "4")
    gens = d["generations"]
    assert code == 0 and [g["kind"] for g in gens] == ["text"] * 3 + ["chat"] * 2
    assert gens[0]["prompt"] == "def fibonacci(" and gens[1]["prompt"] == "Hello, I'm a language model,"
    for g in gens:
        assert isinstance(g["base"], str) and isinstance(g["quantized"], str) and isinstance(g["match"], bool)
        assert g["base_stop"] in ("eos", "length") and g["quantized_stop"] in ("eos", "length")


def test_chat_rendering_and_templates_without_system_role(tiny_tokenizer):
    from quantkit.verification.generations import SYSTEM_PROMPT
    from quantkit.verification.generations import chat_ids as _chat_ids

    tok = copy.deepcopy(tiny_tokenizer)
    notes = []
    tok.chat_template = CHAT_TEMPLATE
    text = tok.decode(_chat_ids(tok, "Hi there", notes))
    assert text == f"<|system|>{SYSTEM_PROMPT}</s><|user|>Hi there</s><|assistant|>" and notes == []
    tok.chat_template = NO_SYSTEM_TEMPLATE
    text = tok.decode(_chat_ids(tok, "Hi there", notes))
    assert text.startswith(f"<|user|>{SYSTEM_PROMPT}") and "Hi there" in text and "system role" in notes[0]


def test_stop_tokens_end_generation(tiny_gptq):
    from transformers import AutoTokenizer

    from quantkit.verification.generations import greedy as _greedy
    from quantkit.verification.qlinear import load_model

    model, _ = load_model(tiny_gptq)
    tok = AutoTokenizer.from_pretrained(tiny_gptq)
    prompt = tok("def fibonacci(")["input_ids"]
    free, _ = _greedy(model, prompt, [], 0, 6)
    # make a later generated token a stop token: the first one that did not occur before it
    k = next((i for i in range(1, len(free)) if free[i] not in free[:i]), 0)
    stopped, stop = _greedy(model, prompt, [free[k]], 0, 6)
    assert stopped == free[:k + 1] and stop == "eos"


def test_too_strict_thresholds_fail_a_good_model(tiny_gptq):
    code, d = run_json(tiny_gptq, *FAST, "--no-generate", "--max-kl", "1e-9", "--min-top1", "0.999")
    assert code == 1 and not d["passed"]
    assert {f["metric"] for f in d["failures"]} == {"kl_mean", "top1_agreement"}
    kl = next(f for f in d["failures"] if f["metric"] == "kl_mean")
    assert kl["threshold"] == 1e-9 and kl["value"] == d["kl_mean"] and "--max-kl" in kl["message"]
    assert any("quantize --gptaq" in n for n in d["notes"])  # a plain-GPTQ checkpoint is pointed to GPTAQ
    r = run(tiny_gptq, *FAST, "--no-generate", "--max-ppl-ratio", "0.5")
    assert r.exit_code == 1 and "FAILED: perplexity ratio" in r.output and "--max-ppl-ratio 0.5" in r.output


def test_a_gptaq_checkpoint_that_fails_gets_no_gptaq_hint(tiny_base, tmp_path):
    out = tmp_path / "gptaq"
    quantize(str(tiny_base), QuantSpec(bits=4, group_size=32, gptaq=True), CalibSpec(samples=8, seq_len=32), out=out)
    code, d = run_json(out, *FAST, "--no-generate", "--max-kl", "1e-9")
    assert code == 1 and not any("--gptaq" in n for n in d["notes"])


def test_damaged_scales_fail_and_the_report_names_the_metric(tiny_gptq, tmp_path):
    damaged = copy_model(tiny_gptq, tmp_path / "damaged")
    scale_layer(damaged, layer=0, factor=8.0)
    r = run(damaged, *FAST, "--no-generate", "--report", tmp_path / "rep")
    assert r.exit_code == 1, r.output
    assert "integrity   ok" in r.output  # consistent files, bad weights: only the metrics can tell
    assert "FAILED: top-1 agreement" in r.output
    md = (tmp_path / "rep" / "report.md").read_text()
    assert md.startswith("# quantkit verify: FAILED") and "**top1_agreement**" in md and "| FAIL |" in md


def test_flipped_bytes_in_a_shard_name_the_file(tiny_gptq, tmp_path):
    damaged = copy_model(tiny_gptq, tmp_path / "flipped")
    shard = sorted(damaged.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = run(damaged, *FAST)
    assert r.exit_code == 1
    assert len(error_lines(r)) == 1 and shard.name in error_lines(r)[0] and "sha256" in error_lines(r)[0]
    assert "Traceback" not in r.output
    code, d = run_json(damaged, *FAST)
    assert code == 1 and d["failures"][0]["metric"] == "integrity" and shard.name in d["failures"][0]["message"]


def test_truncated_shard_without_manifest_names_the_file(tiny_gptq, tmp_path):
    damaged = copy_model(tiny_gptq, tmp_path / "truncated")
    (damaged / "quantkit.json").unlink()
    shard = sorted(damaged.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    r = run(damaged, *FAST)
    assert r.exit_code == 1 and len(error_lines(r)) == 1
    assert shard.name in error_lines(r)[0] and "truncated" in error_lines(r)[0]


def test_config_inconsistent_with_tensors_names_the_tensor(tiny_gptq, tmp_path):
    damaged = copy_model(tiny_gptq, tmp_path / "badcfg")
    for name in ("config.json", "quantize_config.json"):
        cfg = json.loads((damaged / name).read_text())
        (cfg.get("quantization_config") or cfg)["group_size"] = 64
        (damaged / name).write_text(json.dumps(cfg))
    rewrite_manifest(damaged)
    r = run(damaged, *FAST)
    assert r.exit_code == 1 and len(error_lines(r)) == 1
    assert "down_proj.scales: shape [4, 64], expected [2, 64]" in error_lines(r)[0] and "group size 64" in error_lines(r)[0]


def test_without_an_available_base_reports_integrity_and_own_perplexity(tiny_base, tmp_path):
    base = copy_model(tiny_base, tmp_path / "gone")
    q = tmp_path / "rtn"
    quantize(str(base), QuantSpec(bits=8, group_size=32, method="rtn"), out=q)
    shutil.rmtree(base)
    r = run(q, *FAST, "--no-generate")
    assert r.exit_code == 0, r.output
    assert "is not available here" in r.output and "PASSED (integrity only" in r.output
    code, d = run_json(q, *FAST, "--no-generate")
    assert d["base"]["ppl"] is None and d["ppl_ratio"] is None and d["quantized"]["ppl"] > 1
    assert d["layers"] == []  # round-to-nearest records no GPTQ losses


def test_repo_id_in_the_hub_cache(tiny_base, hub_cache):
    quantize(str(tiny_base), QuantSpec(bits=4, group_size=32, method="rtn"), repo_id="t/tiny-rtn")
    code, d = run_json("t/tiny-rtn", "--base", tiny_base, *FAST, "--no-generate", "--min-top1", "0")
    assert code == 0 and d["quantized"]["model"] == "t/tiny-rtn" and str(hub_cache) in d["quantized"]["path"]


@pytest.mark.parametrize("args, hint", [
    (["--loader", "vllm"], "--loader"),
    (["--seq-len", "512", "--max-tokens", "100"], "--max-tokens"),
    (["--min-top1", "1.5"], "--min-top1"),
    (["--max-memory", "lots"], "--max-memory"),
    (["--max-ppl-ratio", "0"], "--max-ppl-ratio"),
])
def test_usage_errors_exit_2(tiny_gptq, args, hint):
    r = run(tiny_gptq, *args)
    assert r.exit_code == 2 and hint in r.output and "Traceback" not in r.output


def test_missing_model_is_one_error_line(tmp_path):
    r = run(tmp_path / "nope")
    assert r.exit_code == 1 and len(error_lines(r)) == 1 and "not found" in error_lines(r)[0]


def test_report_files_are_complete(tiny_gptq, tmp_path):
    r = run(tiny_gptq, *FAST, "--max-new-tokens", "8", "--report", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    rep = tmp_path / "rep"
    md = (rep / "report.md").read_text()
    for section in ("# quantkit verify: PASSED", "## Metrics", "| perplexity ratio |", "## Integrity",
                    "## Generations", "chat (system + user, chat template)", "Base (stop:", "Quantized (stop:",
                    "## Per-layer GPTQ loss", "![per-window perplexity and KL histogram](verify.png)"):
        assert section in md, section
    png = (rep / "verify.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert json.loads((rep / "report.json").read_text())["passed"] is True


# --- the real demo model ----------------------------------------------------------------------------------------

SMOL = ["--seq-len", "256", "--max-tokens", "2048"]


@pytest.fixture(scope="module")
def smollm2_g64(smollm2_dir, tmp_path_factory) -> Path:
    """The issue's check: SmolLM2 4-bit g64 sym passes verify's defaults. Calibrated with GPTAQ on 64 x 256 tokens
    (ratio 1.072 on the 8 x 256 evaluation tokens below): plain GPTQ misses the default 1.10 here (1.122 from 16 x 256
    tokens), and so does GPTAQ from 16 x 256 (1.13: 4,096 tokens are too few for its fit of 1,536-wide inputs)."""
    out = tmp_path_factory.mktemp("smollm2") / "gptq-g64"
    quantize(str(smollm2_dir), QuantSpec(bits=4, group_size=64, gptaq=True), CalibSpec(samples=64, seq_len=256), out=out)
    return out


@pytest.fixture(scope="module")
def smollm2_verified(smollm2_g64, smollm2_dir) -> tuple[int, dict]:
    """verify with default thresholds and the pure-torch loader, generations included."""
    return run_json(smollm2_g64, "--base", smollm2_dir, *SMOL, "--max-new-tokens", "16")


def _hf_perplexity(model, windows) -> float:
    """Independent of quantkit's metric code: transformers' own shifted cross-entropy (labels=)."""
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.float().item() for w in windows]
    return math.exp(sum(losses) / len(losses))


def _float_model_from_checkpoint(base_dir: Path, quantized_dir: Path):
    """A plain float32 transformers model holding the GPTQ checkpoint's tensors (Linears dequantized by the format
    definition), built without quantkit's loader."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    qcfg = json.loads((quantized_dir / "config.json").read_text())["quantization_config"]
    tensors = {}
    for shard in quantized_dir.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    with torch.no_grad():
        for name, t in tensors.items():
            if name.endswith(".qweight"):
                module = name[: -len(".qweight")]
                W = dequantize_module(*(tensors[f"{module}.{s}"] for s in ("qweight", "qzeros", "scales", "g_idx")),
                                      qcfg["bits"], qcfg["checkpoint_format"])
                model.get_submodule(module).weight.copy_(W)
            elif not name.endswith((".qzeros", ".scales", ".g_idx")):
                model.get_parameter(name).copy_(t.float())  # embeddings and norms are float16 in the checkpoint
    return model


@pytest.mark.slow
def test_smollm2_g64_passes_and_matches_an_independent_perplexity(smollm2_verified, smollm2_g64, smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantkit.source.calibration import evaluation_windows

    code, d = smollm2_verified
    assert code == 0 and d["passed"], d["failures"]
    assert d["tokens"] == 8 * 255 and 1.0 < d["ppl_ratio"] and d["kl_mean"] > 0 and d["top1_agreement"] < 1
    windows = evaluation_windows(AutoTokenizer.from_pretrained(smollm2_dir), "pydocs-eval", 256, 2048)
    base_ppl = _hf_perplexity(AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval(), windows)
    assert abs(d["base"]["ppl"] / base_ppl - 1) < 0.01, (d["base"]["ppl"], base_ppl)
    quant = _float_model_from_checkpoint(smollm2_dir, smollm2_g64)  # gptqmodel's own kernels: the loader test below
    quant_ppl = _hf_perplexity(quant, windows)
    assert abs(d["quantized"]["ppl"] / quant_ppl - 1) < 0.01, (d["quantized"]["ppl"], quant_ppl)
    gens = d["generations"]
    assert [g["kind"] for g in gens].count("chat") == 2 and all(g["base"] and g["quantized"] for g in gens)
    assert d["generation_config"]["eos_token_ids"] == [2]  # <|im_end|>: chat answers stop there
    assert any(g["kind"] == "chat" and g["base_stop"] == "eos" for g in gens)


@pytest.mark.slow
def test_smollm2_damaged_layer_fails_every_metric(smollm2_g64, smollm2_dir, tmp_path):
    damaged = copy_model(smollm2_g64, tmp_path / "damaged")
    scale_layer(damaged, layer=3, factor=4.0)
    code, d = run_json(damaged, "--base", smollm2_dir, "--seq-len", "256", "--max-tokens", "1024", "--no-generate")
    assert code == 1 and d["integrity"]["ok"]
    assert {f["metric"] for f in d["failures"]} == {"ppl_ratio", "kl_mean", "top1_agreement"}


@pytest.mark.slow
@pytest.mark.ecosystem
@pytest.mark.skipif(not has_ecosystem(), reason="needs optimum + gptqmodel")
def test_smollm2_both_loaders_agree(smollm2_verified, smollm2_g64, tmp_path):
    _, own = smollm2_verified
    alone = copy_model(smollm2_g64, tmp_path / "alone")  # no base to load: quantkit.json is not in its own manifest
    manifest = json.loads((alone / "quantkit.json").read_text())
    manifest["source"]["model"] = str(tmp_path / "elsewhere")
    (alone / "quantkit.json").write_text(json.dumps(manifest))
    # gptqmodel runs float16 on CPU (about 3x slower than float32 here): the first 4 of the 8 windows suffice
    code, hf = run_json(alone, "--seq-len", "256", "--max-tokens", "1024", "--no-generate", "--loader", "transformers")
    assert code == 0 and hf["base"]["ppl"] is None and hf["tokens"] == 4 * 255
    assert hf["quantized"]["load"]["loader"] == "transformers" and hf["quantized"]["load"]["dtype"] == "float16"
    own_ppl = math.exp(sum(math.log(w["quantized_ppl"]) for w in own["per_window"][:4]) / 4)  # equal-length windows
    assert abs(hf["quantized"]["ppl"] / own_ppl - 1) < 0.005, (hf["quantized"]["ppl"], own_ppl)


@pytest.mark.ecosystem
@pytest.mark.skipif(not has_ecosystem(), reason="needs optimum + gptqmodel")
def test_transformers_loader_agrees_on_a_tiny_model_and_keeps_stdout_clean(tiny_gptq):
    own = run(tiny_gptq, *FAST, "--no-generate", "--json")
    hf = run(tiny_gptq, *FAST, "--max-new-tokens", "4", "--json", "--loader", "transformers")
    assert own.exit_code == 0 and hf.exit_code == 0, hf.output
    own, hf = json.loads(own.stdout), json.loads(hf.stdout)  # gptqmodel's banners must not reach stdout
    assert hf["quantized"]["load"] == {"loader": "transformers", "path": str(tiny_gptq), "quantized": True,
                                       "dtype": "float16"}
    assert abs(hf["quantized"]["ppl"] / own["quantized"]["ppl"] - 1) < 0.005
    assert hf["base"]["ppl"] == pytest.approx(own["base"]["ppl"], rel=1e-5)


def test_report_numbers_keep_their_significant_digits():
    """A perplexity of exactly 7 reads 7.000 in the table, as 6.656 beside it does, not a bare 7."""
    from quantkit.verification.render import fmt
    assert [fmt(7.0), fmt(6.656), fmt(0.059), fmt(1234.0), fmt(12345.6), fmt(0.0), fmt(2e-5), fmt(None)] == \
        ["7.000", "6.656", "0.05900", "1234", "1.235e+04", "0.000", "2.00e-05", "–"]
