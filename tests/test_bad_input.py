"""Damaged checkpoints, fake GGUF files and oversized calibration text: one clear error, nothing written."""
import json
import shutil
from pathlib import Path

import pytest
from conftest import cli_run as run
from conftest import error_line, listing

FAST = ["--samples", "8", "--seq-len", "32", "--group-size", "32"]
VICTIM = "model.layers.1.mlp.up_proj.weight"


def damaged_copy(sharded_dir: Path, tmp_path: Path, edit_index=None) -> Path:
    d = tmp_path / "damaged"
    shutil.copytree(sharded_dir, d)
    if edit_index is not None:
        index = json.loads((d / "model.safetensors.index.json").read_text())
        edit_index(index["weight_map"])
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


def assert_refused_before_any_work(r, message: str, out: Path):
    assert r.exit_code == 1, r.output
    assert message in error_line(r)
    assert "layer 1/" not in r.output, "the damage must be found before calibration starts"
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*")), "nothing written, no work directory"


def test_the_sharded_fixture_quantizes(sharded_dir, tmp_path):
    r = run("quantize", sharded_dir, "--out", tmp_path / "q", *FAST)
    assert r.exit_code == 0, r.output


def test_index_naming_a_missing_shard(sharded_dir, tmp_path):
    d = damaged_copy(sharded_dir, tmp_path)
    (d / "model-00002-of-00002.safetensors").unlink()
    r = run("quantize", d, "--out", tmp_path / "q", *FAST)
    assert_refused_before_any_work(r, "names shard model-00002-of-00002.safetensors, which is missing", tmp_path / "q")


def test_index_without_a_tensor_the_model_needs(sharded_dir, tmp_path):
    d = damaged_copy(sharded_dir, tmp_path, lambda wm: wm.pop(VICTIM))
    r = run("quantize", d, "--out", tmp_path / "q", *FAST)
    assert_refused_before_any_work(r, f"tensor {VICTIM} is missing from the checkpoint", tmp_path / "q")
    assert "model.safetensors.index.json does not list it" in r.output


def test_index_placing_a_tensor_in_the_wrong_shard(sharded_dir, tmp_path):
    def move(wm):
        other = {"model-00001-of-00002.safetensors": "model-00002-of-00002.safetensors"}
        wm[VICTIM] = other.get(wm[VICTIM], "model-00001-of-00002.safetensors")

    d = damaged_copy(sharded_dir, tmp_path, move)
    r = run("quantize", d, "--out", tmp_path / "q", *FAST)
    assert_refused_before_any_work(r, f"places tensor {VICTIM} in model-0000", tmp_path / "q")


def test_index_that_is_not_json(sharded_dir, tmp_path):
    d = damaged_copy(sharded_dir, tmp_path)
    (d / "model.safetensors.index.json").write_text('{"weight_map": ')
    r = run("quantize", d, "--out", tmp_path / "q", *FAST)
    assert_refused_before_any_work(r, "model.safetensors.index.json is not a valid safetensors index", tmp_path / "q")


@pytest.mark.parametrize("damage", ["truncated", "garbled header"])
def test_damaged_shard_is_named(sharded_dir, tmp_path, damage):
    d = damaged_copy(sharded_dir, tmp_path)
    shard = d / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncated" else data[:8] + b"{not json" + data[17:])
    r = run("quantize", d, "--out", tmp_path / "q", *FAST)
    assert r.exit_code == 1 and str(shard) in error_line(r)
    assert not (tmp_path / "q").exists()


def test_a_file_that_is_not_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("<html>404 Not Found</html>")
    r = run("import-gguf", fake, tmp_path / "out")
    assert r.exit_code == 1 and f"{fake} is not a GGUF file" in error_line(r)
    assert listing(tmp_path) == ["model.gguf"]


def test_a_truncated_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x07" * 13)  # right magic and version, then garbage
    r = run("import-gguf", fake, tmp_path / "out")
    assert r.exit_code == 1 and f"{fake} is not a valid GGUF file" in error_line(r)
    assert listing(tmp_path) == ["model.gguf"], "no output and no staging directory left behind"


def test_a_gguf_that_is_missing(tmp_path):
    r = run("import-gguf", tmp_path / "nope.gguf", tmp_path / "out")
    assert r.exit_code == 1 and "not found" in error_line(r) and listing(tmp_path) == []


def test_calibration_jsonl_with_a_huge_line(tiny_llama_dir, tmp_path):
    from quantkit.source.calibration import MAX_LINE_BYTES

    calib = tmp_path / "calib.jsonl"
    with open(calib, "w") as f:
        f.write(json.dumps({"text": "a fine first document"}) + "\n")
        f.write('{"text": "' + "x" * (MAX_LINE_BYTES + 10) + '"}\n')
    r = run("quantize", tiny_llama_dir, "--calib", calib, "--out", tmp_path / "q", *FAST)
    assert r.exit_code == 1 and f"{calib}:2: line is longer than 16 MiB" in error_line(r)
    assert not (tmp_path / "q").exists()


def test_calibration_jsonl_with_invalid_utf8_names_the_line(tiny_llama_dir, tmp_path):
    calib = tmp_path / "calib.jsonl"
    calib.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    r = run("quantize", tiny_llama_dir, "--calib", calib, "--out", tmp_path / "q", *FAST)
    assert r.exit_code == 1 and f"{calib}:2: not valid UTF-8" in error_line(r)


def test_a_huge_calibration_text_is_read_only_as_far_as_needed(tiny_tokenizer, tmp_path, monkeypatch):
    """A 40 MB single-line .txt: the calibration reads its first text_budget() characters, not the whole file."""
    from quantkit.config import CalibSpec
    from quantkit.source import calibration

    big = tmp_path / "big.txt"
    with open(big, "w") as f:
        for _ in range(40):
            f.write("def f(x): return x + 1  # one long line without a newline " * 17_000)
    seen = []
    real = calibration.token_stream
    monkeypatch.setattr(calibration, "token_stream", lambda tok, docs: seen.append(sum(map(len, docs))) or real(tok, docs))
    monkeypatch.setattr(calibration, "MIN_TEXT_BUDGET", 200_000)
    batch = calibration.calibration_batch(tiny_tokenizer, CalibSpec(source=str(big), samples=4, seq_len=64))
    assert batch.shape == (4, 64)
    assert seen == [calibration.text_budget(4 * 64)] and seen[0] < big.stat().st_size / 100


def test_non_finite_activations_stop_the_run_naming_the_module(tiny_tokenizer, tmp_path):
    """A float16 model whose first layer overflows float16: the next layer's Hessian is not finite, and the run
    stops with one line naming that Linear, before anything is published."""
    import torch
    from conftest import make_tiny_model
    from safetensors.torch import load_file, save_file

    d = make_tiny_model(tmp_path / "hot", tiny_tokenizer, torch_dtype="float16")
    state = load_file(d / "model.safetensors")
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        state[name] = torch.full_like(state[name], 60000.0)  # finite in float16; their product is not
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    r = run("quantize", d, "--out", tmp_path / "q", *FAST)
    assert r.exit_code == 1, r.output
    line = error_line(r)
    assert line.startswith("Error: model.layers.1.") and "not finite" in line, line
    assert not (tmp_path / "q").exists()


def test_remote_code_in_a_checkpoint_is_never_run(tiny_llama_dir, tmp_path):
    """A checkpoint whose config and tokenizer point at Python files (auto_map): quantkit must not import them."""
    d = tmp_path / "remote"
    shutil.copytree(tiny_llama_dir, d)
    marker = tmp_path / "pwned"
    (d / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                               "from transformers import LlamaConfig as EvilConfig, LlamaForCausalLM as EvilModel\n"
                               "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    config = json.loads((d / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((d / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    (d / "tokenizer_config.json").write_text(json.dumps(tok_config))
    r = run("quantize", d, "--out", tmp_path / "q", *FAST)
    assert not marker.exists(), "remote code was executed"
    assert r.exit_code == 0, r.output  # quantized with transformers' own Llama classes
    assert not (tmp_path / "q" / "evil.py").exists() and not marker.exists()
