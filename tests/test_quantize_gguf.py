"""quantize --format gguf: one .gguf file that transformers' GGUF loader (and so llama.cpp's format) reads, its
tensors in llama.cpp's types for the mix, its values those quantkit's own decoder reads, resumable, and refused
with one line where llama.cpp's files cannot hold the model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_run, error_line, listing, make_tiny_model

from quantkit.solve.ggml_grids import dequantize as ggml_dequantize
from quantkit.write.ggml_blocks import unpack
from quantkit.write.gguf_file import rows_permutation

pytestmark = pytest.mark.slow
SMALL = ["--samples", "8", "--seq-len", "32"]
WIDE = dict(hidden_size=256, intermediate_size=512)  # rows of 256: K-quants apply (64-wide rows fall back)


@pytest.fixture(scope="module")
def wide_llama(tiny_tokenizer, tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("wide-llama"), tiny_tokenizer, layers=2, **WIDE)


def _tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """{GGUF name: (ggml type name, raw data as stored)} through gguf's own reader."""
    from gguf import GGUFReader

    return {t.name: (t.tensor_type.name, np.array(t.data)) for t in GGUFReader(path).tensors}


def _reference_state(path: Path, model_dir: Path) -> dict[str, torch.Tensor]:
    """The model's tensors decoded by quantkit's own block decoder (not gguf's), under the model's names and
    row order: what quantkit says it wrote."""
    from quantkit.source.checkpoint import SafetensorsCheckpoint
    from quantkit.write.gguf_file import gguf_tensor_name

    config = json.loads((model_dir / "config.json").read_text())
    stored = _tensors(path)
    state = {}
    checkpoint = SafetensorsCheckpoint(model_dir)
    for name in checkpoint.names():
        gguf_name = gguf_tensor_name(name, config)
        if gguf_name is None:
            continue
        ggml, data = stored[gguf_name]
        shape = checkpoint.shape(name)
        if ggml in ("F32", "F16"):
            value = torch.from_numpy(data.astype(np.float32)).reshape(shape)
        else:
            codes, grid = unpack(data.reshape(shape[0], -1), ggml, shape[1])
            value = ggml_dequantize(codes, grid)
        order = rows_permutation(name, config)
        if order is not None:  # stored rows are order[j]: put row order[j] back at j
            value = value[torch.argsort(torch.as_tensor(order))]
        state[name] = value
    checkpoint.close()
    return state


def _assert_transformers_reads_quantkits_values(out: Path, model_dir: Path, tolerance: float) -> None:
    """transformers' GGUF loader gives the logits of the model holding quantkit's own decoding of `out`."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference.load_state_dict(_reference_state(out, model_dir), strict=False)
    loaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
    ids = torch.randint(0, reference.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference.eval()(ids).logits, rtol=tolerance, atol=tolerance)


def test_a_q4_k_m_file_loads_in_transformers_with_quantkits_values(wide_llama: Path, tmp_path: Path) -> None:

    out = tmp_path / "model.gguf"
    r = cli_run("quantize", wide_llama, "--format", "gguf", "--gguf-type", "Q4_K_M", "--out", out, *SMALL)
    assert r.exit_code == 0, r.output
    assert f"wrote {out}" in r.output and f"llama-cli -m {out}" in r.output
    assert listing(tmp_path) == ["model.gguf"]  # no work directory or temporary left

    types = {name: ggml for name, (ggml, _) in _tensors(out).items()}
    # llama.cpp's Q4_K_M: attn_v and ffn_down get Q6_K in the last eighth of the layers (use_more_bits(1, 2))
    assert types["blk.1.attn_v.weight"] == types["blk.1.ffn_down.weight"] == "Q6_K"
    assert types["blk.0.attn_v.weight"] == types["blk.0.attn_q.weight"] == types["blk.1.ffn_up.weight"] == "Q4_K"
    assert types["output.weight"] == "Q6_K" and types["blk.0.attn_norm.weight"] == "F32"

    _assert_transformers_reads_quantkits_values(out, wide_llama, tolerance=1e-4)


@pytest.mark.parametrize("gguf_type", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q4_K_S",
                                       "Q5_K_M"])
def test_every_type_is_written_in_its_blocks(gguf_type: str, wide_llama: Path, tmp_path: Path) -> None:
    from gguf.quants import dequantize

    out = tmp_path / "m.gguf"
    r = cli_run("quantize", wide_llama, "--format", "gguf", "--gguf-type", gguf_type, "--method", "rtn",
                "--out", out)
    assert r.exit_code == 0, r.output
    stored = _tensors(out)
    base = gguf_type.split("_")[0] + "_" + gguf_type.split("_")[1]
    assert stored["blk.1.attn_q.weight"][0] == base
    for name, (ggml, data) in stored.items():
        if ggml not in ("F32", "F16"):
            from gguf import GGMLQuantizationType

            assert np.isfinite(dequantize(data, GGMLQuantizationType[ggml])).all(), name


def test_the_hub_cache_holds_the_file_with_a_card_and_manifest_and_verify_reads_it(wide_llama: Path,
                                                                                    hub_cache: Path) -> None:
    r = cli_run("quantize", wide_llama, "--format", "gguf", "--gguf-type", "Q8_0", "--repo-id", "t/wide-gguf", *SMALL)
    assert r.exit_code == 0, r.output
    snapshot = next((hub_cache / "models--t--wide-gguf" / "snapshots").iterdir())
    assert sorted(p.name for p in snapshot.iterdir()) == ["README.md", "quantkit.json", "wide-Q8_0.gguf"]
    manifest = json.loads((snapshot / "quantkit.json").read_text())
    assert manifest["quantization"]["gguf_type"] == "Q8_0"
    assert "ollama" in (snapshot / "README.md").read_text()
    v = cli_run("verify", snapshot / "wide-Q8_0.gguf", "--base", wide_llama, "--max-tokens", "256", "--seq-len", "32",
                "--no-generate")
    assert v.exit_code == 0, v.output
    assert "gguf" in v.output


def test_a_killed_gguf_run_resumes_to_the_same_bytes(wide_llama: Path, tmp_path: Path) -> None:
    def run(out: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        env.pop("QUANTKIT_KILL_AT", None)
        if kill_at:
            env["QUANTKIT_KILL_AT"] = kill_at
        cmd = [sys.executable, "-m", "quantkit", "quantize", str(wide_llama), "--format", "gguf", "--gguf-type",
               "Q4_K_M", "--out", str(out), *SMALL]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)

    whole = tmp_path / "whole.gguf"
    assert run(whole).returncode == 0
    out = tmp_path / "resumed" / "model.gguf"
    out.parent.mkdir()
    killed = run(out, kill_at="layer:1:solved")
    assert killed.returncode == -9 and not out.exists()
    resumed = run(out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after layer 1/2" in resumed.stderr
    assert out.read_bytes() == whole.read_bytes()
    assert listing(out.parent) == ["model.gguf"]


@pytest.mark.parametrize(("args", "message"), [
    (["--gguf-type", "Q4_0"], "--gguf-type applies to --format gguf"),
    (["--format", "gguf", "--gguf-type", "Q3_K"], "'Q3_K' is not one of"),
    (["--format", "gguf", "--lm-head"], "--lm-head applies to GPTQ checkpoints"),
    (["--format", "gguf", "--method", "bnb-nf4"], "GGUF files are written by gptq or rtn"),
    (["--format", "gguf", "--bits", "8", "--asym"], "--bits, --sym applies to GPTQ checkpoints"),
])
def test_bad_gguf_options_are_one_line(args: list[str], message: str, wide_llama: Path, tmp_path: Path) -> None:
    r = cli_run("quantize", wide_llama, *args, "--out", tmp_path / "x.gguf")
    assert r.exit_code != 0 and message in r.output, r.output
    assert not (tmp_path / "x.gguf").exists()


def test_outputs_a_gguf_file_cannot_be_are_refused(wide_llama: Path, tmp_path: Path) -> None:
    r = cli_run("quantize", wide_llama, "--format", "gguf", "--method", "rtn", "--out", tmp_path / "x.bin")
    assert "--format gguf writes one file, named *.gguf" in error_line(r)
    taken = tmp_path / "taken.gguf"
    taken.write_bytes(b"not a gguf")
    r = cli_run("quantize", wide_llama, "--format", "gguf", "--method", "rtn", "--out", taken)
    assert "already exists; pass --overwrite" in error_line(r)
    r = cli_run("quantize", wide_llama, "--format", "gguf", "--method", "rtn", "--out", taken, "--overwrite")
    assert "is not a GGUF file" in error_line(r)
    assert taken.read_bytes() == b"not a gguf"


def test_models_llama_cpp_files_cannot_hold_are_refused(tiny_tokenizer, tmp_path: Path) -> None:
    opt = make_tiny_model(tmp_path / "opt", tiny_tokenizer, model_type="opt", ffn_dim=128, word_embed_proj_dim=64)
    r = cli_run("quantize", opt, "--format", "gguf", "--method", "rtn", "--out", tmp_path / "o.gguf")
    assert "opt" in error_line(r)
    moe = make_tiny_model(tmp_path / "moe", tiny_tokenizer, model_type="qwen3_moe", num_experts=4,
                          num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1)
    r = cli_run("quantize", moe, "--format", "gguf", "--method", "rtn", "--out", tmp_path / "m.gguf")
    assert "Mixture-of-Experts" in error_line(r) or "qwen3_moe" in error_line(r)
    assert not (tmp_path / "o.gguf").exists() and not (tmp_path / "m.gguf").exists()


def test_the_demo_model_exported_loads_in_transformers_with_quantkits_values(smollm2_dir: Path,
                                                                             tmp_path: Path) -> None:
    """SmolLM2 (tied embeddings, 576-wide rows that K-quants fall back from, llama.cpp's tokenizer names): the
    exported file's logits in transformers' GGUF loader are those of quantkit's own decoding of it."""

    out = tmp_path / "smollm2.gguf"
    r = cli_run("quantize", smollm2_dir, "--format", "gguf", "--gguf-type", "Q4_K_M", "--method", "rtn", "--out", out)
    assert r.exit_code == 0, r.output
    types = {name: ggml for name, (ggml, _) in _tensors(out).items()}
    assert "output.weight" not in types and types["token_embd.weight"] == "Q8_0"  # tied: the head's type
    assert types["blk.0.attn_q.weight"] == "Q5_0" and types["blk.0.ffn_down.weight"] == "Q6_K"
    _assert_transformers_reads_quantkits_values(out, smollm2_dir, tolerance=1e-3)


def test_a_model_llama_cpp_cannot_hold_is_refused_before_any_layer_is_quantized(tiny_tokenizer,
                                                                               tmp_path: Path) -> None:
    """A rope kind llama.cpp does not read is found before calibration, not after the last layer."""
    model = make_tiny_model(tmp_path / "dyn", tiny_tokenizer, layers=2, **WIDE,
                            rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    r = cli_run("quantize", model, "--format", "gguf", "--out", tmp_path / "d.gguf", *SMALL)
    assert "dynamic" in error_line(r)
    assert "layer 1/2" not in r.output
    assert listing(tmp_path) == [p for p in listing(tmp_path) if not p.startswith(".d.gguf")]
