"""`quantkit inspect FILE.gguf`: a GGUF file described from its header and metadata, checked against gguf's own
reader; damaged files and wrongly typed metadata give one line and exit 1."""
import json
import logging
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import cli_run, error_line, make_tiny_model

import quantkit
from quantkit import QuantSpec
from quantkit.tools.convert import convert
from quantkit.tools.inspect_gguf import inspect_gguf

REPORT_KEYS = {"path", "architecture", "name", "file_type", "hparams", "tensor_types", "tensors", "tensor_bytes",
               "elements", "size_on_disk", "tokenizer_model", "tokenizer_pre", "chat_template", "quant_method",
               "errors", "notes", "bits_per_weight"}
HPARAMS = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "context": 256, "vocab": 512}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_tokenizer) -> Path:
    root = tmp_path_factory.mktemp("inspect-gguf")
    base = make_tiny_model(root / "base", tiny_tokenizer)
    gptq = quantkit.quantize(str(base), QuantSpec(method="rtn", bits=4, group_size=32, sym=True), out=root / "gptq")
    return Path(convert(gptq.path, root / "tiny.gguf").path)


def handmade(path: Path, **metadata) -> Path:
    """A small GGUF written by gguf-py itself: one F32 tensor and the metadata given (key -> str or int)."""
    w = gguf.GGUFWriter(path, "llama")
    for key, value in metadata.items():
        key = key.replace("__", ".")
        w.add_string(key, value) if isinstance(value, str) else w.add_uint32(key, value)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_converted_file_is_described_as_gguf_reads_it(converted):
    r = inspect_gguf(converted)
    assert (r.architecture, r.file_type, r.hparams) == ("llama", "MOSTLY_Q4_0", HPARAMS)
    reader = gguf.GGUFReader(converted)
    by_type: dict[str, dict[str, int]] = {}
    for t in reader.tensors:
        entry = by_type.setdefault(t.tensor_type.name, {"tensors": 0, "bytes": 0, "elements": 0})
        entry["tensors"] += 1
        entry["bytes"] += int(t.n_bytes)
        entry["elements"] += int(t.n_elements)
    assert r.tensor_types == by_type and set(by_type) == {"Q4_0", "F16", "F32"}
    assert by_type["Q4_0"]["tensors"] == 14 and by_type["Q4_0"]["bytes"] == by_type["Q4_0"]["elements"] // 32 * 18
    total_bytes, total_elements = sum(e["bytes"] for e in by_type.values()), sum(e["elements"] for e in by_type.values())
    assert (r.tensors, r.tensor_bytes, r.elements) == (len(reader.tensors), total_bytes, total_elements)
    assert r.bits_per_weight == 8 * total_bytes / total_elements
    assert r.size_on_disk == converted.stat().st_size > total_bytes
    assert r.tokenizer_model == reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert r.tokenizer_pre == reader.fields["tokenizer.ggml.pre"].contents()
    assert r.chat_template is ("tokenizer.chat_template" in reader.fields)
    assert r.errors == [] and r.notes == []


def test_the_command_prints_the_report_and_its_json(converted):
    r = cli_run("inspect", converted)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    report = inspect_gguf(converted)
    assert lines[0] == f"path          {converted}"
    assert lines[1] == f"quantization  gguf MOSTLY_Q4_0, {report.bits_per_weight:.2f} bits per weight"
    assert lines[2].endswith(": 2 layers, hidden 64, 4 heads (2 kv), context 256, vocab 512")
    assert lines[3].startswith("tokenizer     gpt2 (pre ")
    rows = {line.split()[0]: line.split()[1] for line in lines if line.startswith("  ")}
    assert rows == {"ggml": "type", "Q4_0": "14", "F16": "2", "F32": "5", "total": "21"}
    r = cli_run("inspect", converted, "--json")
    assert r.exit_code == 0
    data = json.loads(r.output)
    assert set(data) == REPORT_KEYS and data["quant_method"] == "gguf"
    assert data["hparams"] == HPARAMS and data["tensor_types"] == report.tensor_types
    assert data["bits_per_weight"] == report.bits_per_weight


def test_the_chat_template_and_a_missing_tokenizer_are_reported(tmp_path):
    r = inspect_gguf(handmade(tmp_path / "a.gguf", tokenizer__chat_template="{{ messages }}", llama__block_count=3))
    assert r.chat_template and r.hparams["layers"] == 3 and r.hparams["vocab"] is None and r.file_type is None
    assert r.tokenizer_model is None and r.notes == ["no tokenizer.ggml.model: llama.cpp cannot load this file "
                                                     "without a tokenizer"]
    assert r.tensor_types == {"F32": {"tensors": 1, "bytes": 8 * 32 * 4, "elements": 256}}


def test_metadata_of_the_wrong_type_is_one_error_line(tmp_path):
    path = handmade(tmp_path / "typed.gguf", llama__block_count="two", general__file_type=999)
    report = inspect_gguf(path)
    assert report.hparams["layers"] is None and report.file_type is None
    assert report.errors == ["metadata llama.block_count (STRING): expected a non-negative integer",
                             "metadata general.file_type = 999: not a llama.cpp file type"]
    r = cli_run("inspect", path)
    assert r.exit_code == 1
    assert error_line(r) == "Error: GGUF metadata damaged: metadata llama.block_count (STRING): expected a " \
                            "non-negative integer"


@pytest.mark.parametrize("cut", ["metadata", "tensor data"])
def test_a_truncated_file_is_one_line(converted, tmp_path, cut):
    data = converted.read_bytes()
    keep = 600 if cut == "metadata" else len(data) - 100
    damaged = tmp_path / "cut.gguf"
    damaged.write_bytes(data[:keep])
    r = cli_run("inspect", damaged)
    assert r.exit_code == 1
    line = error_line(r)
    assert line.startswith(f"Error: {damaged} is not a valid GGUF file: ")
    assert ("runs past the end of the file" if cut == "metadata" else "lies past the end of the file") in line


@pytest.mark.parametrize("content,message", [(b"garbage\n" * 10, "its first bytes are not 'GGUF'"),
                                             (b"", "cannot read GGUF file")])
def test_a_garbage_or_empty_gguf_is_one_line(tmp_path, content, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    r = cli_run("inspect", path, "--json")
    assert r.exit_code == 1 and message in error_line(r)


def test_a_checkpoint_directory_is_still_inspected_as_one(converted):
    r = cli_run("inspect", converted.parent / "gptq")
    assert r.exit_code == 0 and "quantization  gptq 4-bit, group 32, sym" in r.output


def test_metadata_strings_are_shown_with_control_characters_escaped(tmp_path):
    forged = "\x1b[2J\nquantization  forged"
    path = handmade(tmp_path / "forged.gguf", general__name=forged, tokenizer__ggml__model="gpt2\r\x1b[31m",
                    tokenizer__ggml__pre="pre\u202eevil")
    r = cli_run("inspect", path)
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.output and "\r" not in r.output and "\u202e" not in r.output
    lines = r.output.splitlines()
    assert [line[:14] for line in lines[:5]] == ["path          ", "quantization  ", "model         ",
                                                 "tokenizer     ", "size on disk  "]
    assert lines[1] == "quantization  gguf file type not stated, 32.00 bits per weight"
    assert lines[2].startswith("model         llama (\\x1b[2J\\nquantization  forged): ")
    assert lines[3] == "tokenizer     gpt2\\r\\x1b[31m (pre pre\\u202eevil), chat template no"
    data = json.loads(cli_run("inspect", path, "--json").output)  # JSON keeps the strings as they are
    assert (data["name"], data["tokenizer_model"], data["tokenizer_pre"]) == (forged, "gpt2\r\x1b[31m", "pre\u202eevil")


def test_a_folder_holding_one_gguf_and_no_config_is_inspected_as_that_file(tmp_path):
    folder = tmp_path / "alone"
    folder.mkdir()
    handmade(folder / "model.gguf", general__name="alone")
    r = cli_run("inspect", folder)
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0] == f"path          {folder / 'model.gguf'}"
    handmade(folder / "other.gguf")
    r = cli_run("inspect", folder)
    assert r.exit_code == 1
    assert error_line(r) == f"Error: {folder} holds 2 GGUF files (model.gguf, other.gguf) and no config.json; " \
                            "give the path of one"


def test_a_gguf_linking_outside_its_folder_is_refused(tmp_path):
    secret = handmade(tmp_path / "elsewhere.gguf")
    folder = tmp_path / "linked"
    folder.mkdir()
    (folder / "model.gguf").symlink_to(secret)
    for command in (("inspect", folder), ("verify", folder, "--base", folder)):
        r = cli_run(*command)
        assert r.exit_code == 1
        assert error_line(r) == f"Error: {folder / 'model.gguf'} is a link to {secret}, outside the model; " \
                                "quantkit reads only files that belong to it"


@pytest.fixture()
def quantkit_logger():
    """quantkit's logger as it was: the CLI's quantize points it at the terminal, which later in-process commands
    (convert logs its summary) would print through."""
    logger = logging.getLogger("quantkit")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


@pytest.mark.slow
def test_a_gguf_published_in_the_hub_cache_is_inspected_and_verified_by_repo_id(tiny_tokenizer, tmp_path,
                                                                                  hub_cache, quantkit_logger):
    wide = make_tiny_model(tmp_path / "wide", tiny_tokenizer, hidden_size=256, intermediate_size=512)
    r = cli_run("quantize", wide, "--format", "gguf", "--gguf-type", "Q8_0", "--method", "rtn", "--repo-id",
                "t/wide-gguf")
    assert r.exit_code == 0, r.output
    snapshot = next((hub_cache / "models--t--wide-gguf" / "snapshots").iterdir())
    (published,) = snapshot.glob("*.gguf")
    assert published.is_symlink()  # to ../../blobs, inside the repo's folder
    for given in ("t/wide-gguf", snapshot):
        r = cli_run("inspect", given)
        assert r.exit_code == 0, r.output
        assert r.output.splitlines()[:2] == [f"path          {published}",
                                             f"quantization  gguf MOSTLY_Q8_0, {inspect_gguf(published).bits_per_weight:.2f}"
                                             " bits per weight"]
    v = cli_run("verify", "t/wide-gguf", "--base", wide, "--max-tokens", "256", "--seq-len", "32", "--no-generate",
                "--json")
    assert v.exit_code == 0, v.output
    report = json.loads(v.output)
    assert report["quantized"]["format"] == "gguf" and report["quantized"]["path"] == str(published)
    types = {kind: e["tensors"] for kind, e in inspect_gguf(published).tensor_types.items()}
    assert report["integrity"]["quantization"]["types"] == types and "Q8_0" in types
