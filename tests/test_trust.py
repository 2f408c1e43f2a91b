"""Files quantkit reads are untrusted: code in a checkpoint never runs, a manifest cannot name files outside its
checkpoint, a checkpoint's recorded base is only a cached repo id or an existing absolute directory, what the
output copies from the base is checked, and every error is one line (a traceback only under --debug)."""
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from quantkit.cli.app import cli

FAST = ["--samples", "8", "--seq-len", "32", "--group-size", "32"]


def run(*args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def one_error_line(r) -> str:
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, r.output
    return errors[0]


def edit_tensor(model_dir: Path, name: str, edit) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(model_dir / "model.safetensors")
    state[name] = edit(state[name])
    save_file(state, model_dir / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture()
def model_copy(tiny_llama_dir, tmp_path) -> Path:
    d = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, d)
    return d


@pytest.fixture(scope="module")
def quantized(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trust") / "q"
    r = run("quantize", tiny_llama_dir, "--out", out, *FAST)
    assert r.exit_code == 0, r.output
    return out


def test_verify_never_runs_or_prompts_for_code_in_a_checkpoint(tiny_tokenizer, tmp_path):
    """An unknown model_type with auto_map: transformers would ask on stdin and a `y` would run evil.py."""
    d = tmp_path / "evil"
    tiny_tokenizer.save_pretrained(d)
    marker = tmp_path / "pwned"
    (d / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                               "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n"
                               "from transformers import LlamaConfig as EvilConfig\n")
    (d / "config.json").write_text(json.dumps({"model_type": "evilnet", "auto_map": {"AutoConfig": "evil.EvilConfig"}}))
    tok_config = json.loads((d / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    (d / "tokenizer_config.json").write_text(json.dumps(tok_config))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(d / "model.safetensors"))
    r = subprocess.run([sys.executable, "-m", "quantkit", "verify", str(d), "--no-generate"], input="y\ny\n",
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert not marker.exists(), "code shipped in the checkpoint was executed"
    assert "[y/N]" not in r.stdout + r.stderr, "quantkit must never prompt"
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("Error:"), r.stderr


def test_a_manifest_cannot_vouch_for_files_outside_its_checkpoint(quantized, tmp_path):
    q = tmp_path / "q"
    shutil.copytree(quantized, q)
    outside = tmp_path / "secret.txt"
    outside.write_text("not part of the checkpoint")
    manifest = json.loads((q / "quantkit.json").read_text())
    manifest["files"]["../secret.txt"] = {"sha256": hashlib.sha256(outside.read_bytes()).hexdigest(),
                                          "size": outside.stat().st_size}
    (q / "quantkit.json").write_text(json.dumps(manifest))
    r = run("inspect", q)
    assert r.exit_code == 1 and "points outside its folder" in r.output, r.output
    r = run("verify", q, "--no-generate")
    assert "points outside its folder" in one_error_line(r)


@pytest.mark.parametrize("manifest", [[1], {"files": [1]}, {"files": {"config.json": 5}},
                                      {"files": {"config.json": {"sha256": "zz"}}}, {"source": [], "layers": "x"}])
def test_a_manifest_of_the_wrong_shape_is_an_integrity_error(quantized, tmp_path, manifest):
    q = tmp_path / "q"
    shutil.copytree(quantized, q)
    (q / "quantkit.json").write_text(json.dumps(manifest))
    r = run("verify", q, "--no-generate")
    assert "quantkit.json" in one_error_line(r)


@pytest.mark.parametrize("recorded", ["relative-base", {"model": "x"}, 5, "../relative-base"])
def test_the_base_a_manifest_names_is_only_a_cached_repo_or_an_absolute_directory(quantized, tiny_llama_dir, tmp_path,
                                                                                  monkeypatch, recorded):
    """A checkpoint's own quantkit.json chose its base; a relative path would be read from wherever verify runs."""
    q = tmp_path / "q"
    shutil.copytree(quantized, q)
    shutil.copytree(tiny_llama_dir, tmp_path / "relative-base")
    manifest = json.loads((q / "quantkit.json").read_text())
    manifest["source"]["model"] = recorded
    (q / "quantkit.json").write_text(json.dumps(manifest))
    sub = tmp_path / "sub"
    sub.mkdir()
    monkeypatch.chdir(sub if str(recorded).startswith("..") else tmp_path)
    # the manifest is not among its own hashed files, so the checkpoint stays intact
    r = run("verify", q, "--no-generate", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["base"]["path"] is None
    assert any("is not available here (a recorded base is used only as a repo id in the local hub cache or an "
               "existing absolute directory)" in n for n in report["notes"]), report["notes"]


def test_the_recorded_absolute_base_is_used_and_said_so(quantized):
    r = run("verify", quantized, "--no-generate", "--json")
    report = json.loads(r.output)
    assert report["base"]["origin"] == "manifest" and report["base"]["path"], report["base"]


@pytest.mark.parametrize("name, value, phrase", [
    ("model.embed_tokens.weight", float("nan"), "holds NaN or Inf values"),
    ("model.norm.weight", 1e6, "beyond float16's range"),
    ("lm_head.weight", float("inf"), "holds NaN or Inf values"),
])
def test_tensors_copied_into_the_output_are_checked_before_any_work(model_copy, tmp_path, name, value, phrase):
    """Embeddings, final norm and an unquantized head are written as float16: NaN/Inf, or a float16 overflow, is
    refused before calibration starts, not published."""
    def damage(t):
        t = t.clone()
        t.view(-1)[0] = value
        return t
    edit_tensor(model_copy, name, damage)
    r = run("quantize", model_copy, "--out", tmp_path / "q", *FAST)
    line = one_error_line(r)
    assert name in line and phrase in line, line
    assert "layer 1/" not in r.output
    assert not (tmp_path / "q").exists()


def test_a_side_file_linking_outside_the_model_is_refused(model_copy, tmp_path):
    """A tokenizer file that is a link to a secret would be published with the output."""
    secret = tmp_path / "secret"
    secret.write_text("API_KEY=hunter2")
    (model_copy / "chat_template.jinja").symlink_to(secret)
    r = run("quantize", model_copy, "--out", tmp_path / "q", *FAST)
    assert "chat_template.jinja is a link" in one_error_line(r)
    assert not (tmp_path / "q").exists()


def test_a_side_file_linking_inside_the_model_is_copied(model_copy, tmp_path):
    (model_copy / "real-template.jinja").write_text("{{ messages }}")
    (model_copy / "chat_template.jinja").symlink_to(model_copy / "real-template.jinja")
    r = run("quantize", model_copy, "--out", tmp_path / "q", "--method", "rtn")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "q" / "chat_template.jinja").read_text() == "{{ messages }}"
    assert not (tmp_path / "q" / "chat_template.jinja").is_symlink()


def test_an_unexpected_error_is_one_line_and_debug_shows_its_traceback(monkeypatch):
    import quantkit.tools.estimate

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")
    monkeypatch.setattr(quantkit.tools.estimate, "estimate", broken)
    r = run("estimate", "llama-2-7b")
    line = one_error_line(r)
    assert line == "Error: internal error (RuntimeError: boom); rerun with --debug for the traceback", line
    r = run("--debug", "estimate", "llama-2-7b")
    assert isinstance(r.exception, RuntimeError)


def test_debug_shows_the_traceback_of_a_user_error_in_a_real_process(tmp_path):
    missing = tmp_path / "nowhere"
    plain = subprocess.run([sys.executable, "-m", "quantkit", "inspect", str(missing)], capture_output=True,
                           text=True, timeout=120)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert len(plain.stderr.strip().splitlines()) == 1 and plain.stderr.startswith("Error:"), plain.stderr
    debug = subprocess.run([sys.executable, "-m", "quantkit", "--debug", "inspect", str(missing)],
                           capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "QuantkitError" in debug.stderr, debug.stderr
