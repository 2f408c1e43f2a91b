"""End-to-end `quantkit quantize` on a tiny random Llama, and every bad input the CLI must refuse cleanly."""
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import hub_cache_env

from quantkit.cli.app import cli
from quantkit.untrusted import sha256_file
from quantkit.verification.dequantized import load_dequantized

FAST = ["--samples", "8", "--seq-len", "32", "--group-size", "32"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


@pytest.fixture(scope="module")
def quantized(tiny_llama_dir, tmp_path_factory):
    """One quantize run into a private hub cache, shared by the assertions below."""
    with hub_cache_env(tmp_path_factory.mktemp("hub")) as cache:
        r = run("quantize", tiny_llama_dir, "--repo-id", "test/tiny-gptq", "--json", *FAST)
    assert r.exit_code == 0, r.output
    return cache, json.loads(r.output)


def test_json_result_schema(quantized):
    _, res = quantized
    assert {"repo_id", "path", "bits", "group_size", "sym", "seconds", "peak_rss_mb", "layers"} <= res.keys()
    assert res["repo_id"] == "test/tiny-gptq" and res["bits"] == 4 and res["group_size"] == 32 and res["sym"] is True
    assert len(res["layers"]) == 2 and set(res["layers"][0]["losses"]) >= {"self_attn.q_proj", "mlp.down_proj"}
    assert res["peak_rss_mb"] > 0 and res["seconds"] > 0 and res["peak_gpu_mb"] is None  # a CPU run
    assert res["compute_dtype"] == "float32"  # the tiny model is float32: auto calibrates it in float32
    # where each layer's time went; the last layer is not propagated (nothing reads its outputs)
    assert set(res["layers"][0]["stage_seconds"]) == {"load", "hessians", "solve", "propagate"}
    assert set(res["layers"][-1]["stage_seconds"]) == {"load", "hessians", "solve"}
    assert all(v >= 0 for layer in res["layers"] for v in layer["stage_seconds"].values())
    assert not any("stage_peak_gpu_mb" in layer for layer in res["layers"])  # a GPU run's only
    # where the run's time went, phase by phase, in order; the phases account for the run's seconds
    from quantkit.run.pipeline import PHASES

    assert list(res["phase_seconds"]) == list(PHASES)
    assert sum(res["phase_seconds"].values()) <= res["seconds"] + 0.01
    assert res["phase_seconds"]["layers"] >= sum(layer["seconds"] for layer in res["layers"]) - 0.01


def test_published_into_hub_cache_layout(quantized):
    cache, res = quantized
    folder = cache / "models--test--tiny-gptq"
    revision = (folder / "refs" / "main").read_text()
    snapshot = folder / "snapshots" / revision
    assert Path(res["path"]) == snapshot
    names = {p.name for p in snapshot.iterdir()}
    assert {"config.json", "quantize_config.json", "model.safetensors.index.json", "README.md", "quantkit.json",
            "tokenizer.json", "tokenizer_config.json"} <= names
    assert all((snapshot / n).is_symlink() for n in names)
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(cache)
    assert not info.warnings and [r.repo_id for r in info.repos] == ["test/tiny-gptq"]
    assert not [p for p in folder.iterdir() if p.name not in ("blobs", "snapshots", "refs")]


def test_config_manifest_and_card(quantized, tiny_llama_dir):
    _, res = quantized
    snap = Path(res["path"])
    config = json.loads((snap / "config.json").read_text())
    qcfg = config["quantization_config"]
    assert qcfg == json.loads((snap / "quantize_config.json").read_text())
    assert qcfg["quant_method"] == "gptq" and qcfg["bits"] == 4 and qcfg["group_size"] == 32
    assert qcfg["checkpoint_format"] == "gptq" and qcfg["meta"]["quantizer"][0].startswith("quantkit:")
    assert qcfg["desc_act"] is True
    manifest = json.loads((snap / "quantkit.json").read_text())
    for name, entry in manifest["files"].items():
        assert sha256_file(snap / name) == entry["sha256"]
    assert set(manifest["files"]) | {"quantkit.json"} == {p.name for p in snap.iterdir()}
    card = (snap / "README.md").read_text()
    assert str(tiny_llama_dir.resolve()) in card and "group size | 32" in card and "pydocs-calib" in card


def test_gptq_tensors_have_the_documented_shapes(quantized):
    from safetensors import safe_open

    snap = Path(quantized[1]["path"])
    index = json.loads((snap / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.mlp.down_proj"  # in=128, out=64, group 32
    with safe_open(str(snap / index[f"{name}.qweight"]), "pt") as f:
        assert f.get_tensor(f"{name}.qweight").shape == (128 * 4 // 32, 64)
        assert f.get_tensor(f"{name}.qzeros").shape == (4, 64 * 4 // 32)
        assert f.get_tensor(f"{name}.scales").dtype == torch.float16
        g_idx = f.get_tensor(f"{name}.g_idx")  # act-order (the default): a permuted grouping, 32 channels each
        assert g_idx.dtype == torch.int32 and torch.bincount(g_idx.long()).tolist() == [32] * 4
    assert f"{name}.weight" not in index and "lm_head.weight" in index


def test_dequantized_weights_stay_close_to_the_originals(quantized, tiny_llama_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    cache, res = quantized
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    deq = load_dequantized("test/tiny-gptq")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    w, wq = base.model.layers[1].mlp.up_proj.weight, deq.model.layers[1].mlp.up_proj.weight
    assert 0 < ((w - wq).norm() / w.norm()).item() < 0.2
    assert {p.dtype for p in deq.parameters()} == {torch.float32}  # the file is float16; the reference is not
    ids = torch.randint(0, 500, (1, 16))
    assert torch.isfinite(deq(ids).logits).all()
    assert {p.dtype for p in load_dequantized("test/tiny-gptq", torch.bfloat16).parameters()} == {torch.bfloat16}


def test_only_one_decoder_layer_is_materialised_at_a_time(tiny_tokenizer, tmp_path, hub_cache, monkeypatch):
    from conftest import make_tiny_model

    from quantkit.run import layer as run_layer
    from quantkit.run import model as run_model
    from quantkit.source import skeleton as model_skeleton

    model_dir = make_tiny_model(tmp_path / "deep", tiny_tokenizer, layers=6)
    seen = []
    real = model_skeleton.materialize

    def spy(module, prefix, *a, **kw):
        layers = module_parent[0]
        seen.append(sum(any(p.device.type != "meta" for p in layer.parameters()) for layer in layers))
        return real(module, prefix, *a, **kw)

    module_parent = []
    real_decoder_layers = run_model.decoder_layers

    def capture_layers(model, n):
        prefix, layers = real_decoder_layers(model, n)
        module_parent.append(layers)
        return prefix, layers

    monkeypatch.setattr(run_layer, "materialize", spy)
    monkeypatch.setattr(run_model, "decoder_layers", capture_layers)
    r = run("quantize", model_dir, "--json", *FAST)
    assert r.exit_code == 0, r.output
    assert seen == [0] * 6  # when a layer is loaded, every other layer is empty


def test_out_dir_overwrite_and_rtn(tiny_llama_dir, tmp_path):
    out = tmp_path / "q"
    assert run("quantize", tiny_llama_dir, "--out", out, "--method", "rtn", "--bits", "8").exit_code == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 8
    r = run("quantize", tiny_llama_dir, "--out", out, "--method", "rtn")
    assert r.exit_code == 1 and "already exists" in r.output and "--overwrite" in r.output
    assert run("quantize", tiny_llama_dir, "--out", out, "--method", "rtn", "--overwrite").exit_code == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no work or staging directories left behind


def test_existing_repo_needs_overwrite(tiny_llama_dir, hub_cache):
    assert run("quantize", tiny_llama_dir, "--repo-id", "a/b", "--method", "rtn").exit_code == 0
    before = tree(hub_cache / "models--a--b")
    r = run("quantize", tiny_llama_dir, "--repo-id", "a/b", "--method", "rtn", "--group-size", "64")
    assert r.exit_code == 1 and "a/b already exists in the hub cache" in r.output
    assert tree(hub_cache / "models--a--b") == before
    r = run("quantize", tiny_llama_dir, "--repo-id", "a/b", "--method", "rtn", "--group-size", "64", "--overwrite")
    assert r.exit_code == 0
    snapshots = list((hub_cache / "models--a--b" / "snapshots").iterdir())
    assert len(snapshots) == 1  # the replaced revision and its blobs are gone


def _assert_clean_failure(r, hub_cache, message, code=1):
    assert r.exit_code == code, r.output
    assert message in r.output, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert "Traceback" not in r.output and len(errors) == 1 and message in errors[0]
    assert not list(hub_cache.glob("models--*")), "nothing may be published"


def test_missing_path(hub_cache, tmp_path):
    _assert_clean_failure(run("quantize", tmp_path / "nope"), hub_cache, "not found")


def test_directory_without_config(hub_cache, tmp_path):
    _assert_clean_failure(run("quantize", tmp_path), hub_cache, "has no config.json")


def test_pickle_only_checkpoint_is_refused(hub_cache, tmp_path, tiny_llama_dir):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    _assert_clean_failure(run("quantize", d), hub_cache, "only pickle weights (pytorch_model.bin)")


def test_unsupported_architecture(hub_cache, tmp_path, tiny_tokenizer):
    from conftest import make_tiny_model

    d = make_tiny_model(tmp_path / "bloom", tiny_tokenizer, model_type="bloom", n_embd=32, n_layer=1, n_head=2)
    _assert_clean_failure(run("quantize", d), hub_cache, "unsupported architecture 'bloom'")


def test_bits_5_is_a_usage_error(hub_cache, tiny_llama_dir):
    _assert_clean_failure(run("quantize", tiny_llama_dir, "--bits", "5"), hub_cache, "'5' is not one of", code=2)


def test_unknown_compute_dtype_is_a_usage_error(hub_cache, tiny_llama_dir):
    _assert_clean_failure(run("quantize", tiny_llama_dir, "--compute-dtype", "int8"), hub_cache,
                          "'int8' is not one of 'auto', 'float32', 'bfloat16', 'float16'", code=2)


def test_bad_group_size_names_the_flag(hub_cache, tiny_llama_dir):
    _assert_clean_failure(run("quantize", tiny_llama_dir, "--group-size", "0"), hub_cache, "--group-size", code=2)


def test_empty_and_short_calibration(hub_cache, tiny_llama_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    _assert_clean_failure(run("quantize", tiny_llama_dir, "--calib", tmp_path / "empty.txt"), hub_cache,
                          "has 0 tokens; --samples 128 x --seq-len 512 needs 65536")
    (tmp_path / "short.txt").write_text("a short calibration text " * 20)
    r = run("quantize", tiny_llama_dir, "--calib", tmp_path / "short.txt", "--samples", "4", "--seq-len", "64")
    _assert_clean_failure(r, hub_cache, "needs 256")


def test_invalid_repo_id(hub_cache, tiny_llama_dir):
    _assert_clean_failure(run("quantize", tiny_llama_dir, "--repo-id", "../escape"), hub_cache, "invalid repo id")


def test_quantize_by_cached_repo_id(tiny_llama_dir, hub_cache):
    assert run("quantize", tiny_llama_dir, "--repo-id", "base/tiny", "--method", "rtn").exit_code == 0
    # a quantized model in the cache is found by repo id, and refused as a base
    r = run("quantize", "base/tiny", "--method", "rtn", "--repo-id", "x/y")
    assert r.exit_code == 1 and "already quantized" in r.output


def test_skip_keeps_matching_linears_in_float16(tiny_llama_dir, tmp_path):
    import json as _json

    from quantkit.source.checkpoint import SafetensorsCheckpoint

    r = run("quantize", tiny_llama_dir, "--out", tmp_path / "q", "--skip", "mlp.down_proj", "--skip", "self_attn.[kv]_proj",
            *FAST)
    assert r.exit_code == 0, r.output
    ckpt = SafetensorsCheckpoint(tmp_path / "q")
    names = set(ckpt.names())
    for i in range(2):
        for kept in ("mlp.down_proj", "self_attn.k_proj", "self_attn.v_proj"):
            assert f"model.layers.{i}.{kept}.weight" in names and f"model.layers.{i}.{kept}.qweight" not in names
            assert ckpt.get(f"model.layers.{i}.{kept}.weight").dtype == torch.float16
        assert f"model.layers.{i}.mlp.up_proj.qweight" in names and f"model.layers.{i}.mlp.up_proj.weight" not in names
    qcfg = _json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qcfg["modules_in_block_to_quantize"] == [["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj",
                                                     "mlp.up_proj"]]
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    deq = load_dequantized(str(tmp_path / "q"))
    assert torch.equal(deq.model.layers[1].mlp.down_proj.weight, base.model.layers[1].mlp.down_proj.weight.half().float())


def test_skip_pattern_that_matches_nothing_is_refused(tiny_llama_dir, tmp_path):
    r = run("quantize", tiny_llama_dir, "--out", tmp_path / "q", "--skip", "mlp.down", *FAST)
    assert r.exit_code == 1 and "--skip 'mlp.down' matches none" in r.output and "mlp.down_proj" in r.output
    assert not (tmp_path / "q").exists()
    r = run("quantize", tiny_llama_dir, "--out", tmp_path / "q", "--skip", "*", *FAST)
    assert r.exit_code == 1 and "leaves no Linear to quantize" in r.output


def test_calibration_longer_than_the_model_positions_is_refused(tiny_tokenizer, tmp_path):
    from conftest import make_tiny_model

    d = make_tiny_model(tmp_path / "gpt2", tiny_tokenizer, model_type="gpt2", max_position_embeddings=64)
    r = run("quantize", d, "--out", tmp_path / "q", "--samples", "8", "--seq-len", "128")
    assert r.exit_code == 1 and "--seq-len 128 is longer than the model's 64 positions" in r.output
    assert not (tmp_path / "q").exists()


def test_gpu_peaks_per_stage_and_over_the_run(monkeypatch):
    """On a GPU each stage of a layer reports torch's peak allocation since the stage before (the counter is
    reset as a stage ends), and the run's peak is the largest of them or of what came after: here with torch's
    counters stood in for, as CI has no GPU."""
    import torch

    from quantkit.run.telemetry import GpuPeaks as _GpuPeaks
    from quantkit.run.telemetry import StageClock as _StageClock

    counter = {"peak": 0}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: counter["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: counter.update(peak=0))
    gpu = torch.device("cuda")
    peaks = _GpuPeaks(gpu)
    counter["peak"] = 300 * 2**20  # the layer's weights being loaded
    clock = _StageClock(gpu, load=0.0, gpu_peaks=peaks)
    for stage, mb in [("hessians", 900), ("solve", 1200), ("hessians", 1000), ("propagate", 500)]:
        counter["peak"] = mb * 2**20
        clock.lap(stage)
    assert clock.gpu_mb == {"load": 300, "hessians": 1000, "solve": 1200, "propagate": 500}
    counter["peak"] = 1500 * 2**20  # after the last layer (the head, say)
    assert peaks.overall_mb() == 1500
    cpu = _StageClock(torch.device("cpu"), load=0.0, gpu_peaks=_GpuPeaks(torch.device("cpu")))
    cpu.lap("solve")
    assert cpu.gpu_mb == {} and _GpuPeaks(torch.device("cpu")).overall_mb() is None


def test_a_layers_attention_leaves_memory_once_it_is_only_replayed(tiny_llama_dir, tmp_path, monkeypatch):
    """True-sequential GPTQ replays the quantized attention from records in the MLP stages and the propagation,
    so its weights are dropped (to the meta device, where any use would fail loudly) before the MLP is solved."""
    from quantkit.config import CalibSpec, QuantSpec
    from quantkit.run import layer, pipeline

    released = []
    release = layer.release
    monkeypatch.setattr(layer, "release", lambda module: (released.append(type(module).__name__), release(module)))
    pipeline.quantize(str(tiny_llama_dir), QuantSpec(bits=4, group_size=32), CalibSpec(samples=8, seq_len=32),
                      out=tmp_path / "q")
    assert released == ["LlamaAttention", "LlamaDecoderLayer"] * 2  # per layer: the attention, then the layer
