"""Files quantkit reads are untrusted: wrong-shaped JSON in an index, a config or a safetensors header, a config
that does not describe its weights, inconsistent tensor offsets, nonsense sizes for `estimate`, and calibration
sets too large to read whole. Each is one `Error:` line (exit 1) or is read only as far as needed."""
import json
import shutil
from pathlib import Path

import pytest
from conftest import cli_run as run

FAST = ["--samples", "8", "--seq-len", "32", "--group-size", "32"]
VERIFY_FAST = ["--seq-len", "32", "--max-tokens", "64", "--no-generate"]
INDEX = "model.safetensors.index.json"


def error_line(r) -> str:
    """The one `Error:` line of a failed command, which must have exited 1 without a traceback."""
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert r.exit_code == 1 and "Traceback" not in r.output and len(errors) == 1, (r.exit_code, r.output)
    assert "internal error" not in errors[0], errors[0]
    return errors[0]


def edit_json(path: Path, edit) -> None:
    """Replace the JSON in `path` by edit(value) (or the value edit changed in place)."""
    value = json.loads(path.read_text())
    new = edit(value)
    path.write_text(json.dumps(value if new is None else new))


def edit_header(path: Path, edit) -> None:
    """Rewrite a safetensors file's header through edit(header), keeping its data bytes as they are."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    new = edit(header)
    raw = json.dumps(header if new is None else new).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


def shard_of(model_dir: Path, tensor: str) -> Path:
    index = model_dir / INDEX
    if index.is_file():
        return model_dir / json.loads(index.read_text())["weight_map"][tensor]
    return next(model_dir.glob("*.safetensors"))


@pytest.fixture(scope="module")
def quantized_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """A round-to-nearest 4-bit checkpoint of the tiny Llama in several shards, without its manifest, so that
    verify reads the damaged files themselves rather than stopping at their changed hashes."""
    out = tmp_path_factory.mktemp("quantized") / "q"
    r = run("quantize", tiny_llama_dir, "--out", out, "--method", "rtn", "--group-size", "32",
            "--max-shard-size", "150KB")
    assert r.exit_code == 0, r.output
    assert (out / INDEX).is_file()
    (out / "quantkit.json").unlink()
    return out


def damaged(source: Path, tmp_path: Path) -> Path:
    d = tmp_path / "damaged"
    shutil.copytree(source, d)
    return d


def command(which: str, model_dir: Path, tmp_path: Path) -> list:
    if which == "quantize":
        return ["quantize", model_dir, "--out", tmp_path / "q", *FAST]
    if which == "verify":
        return ["verify", model_dir, *VERIFY_FAST]
    return ["inspect", model_dir]


# ---------------------------------------------------------------- 1. wrong-shaped JSON: one line, never a traceback
WRONG_INDEXES = {
    "a list": ([1], "holds a JSON array"),
    "weight_map a list": ({"weight_map": [1]}, "'weight_map' is [1]"),
    "a shard name that is a number": ({"weight_map": {"a": 5}}, "file name 5 is not a plain relative path"),
    "a shard outside the folder": ({"weight_map": {"a": "../x.safetensors"}}, "points outside its folder"),
}


@pytest.mark.parametrize("which", ["quantize", "verify", "inspect"])
@pytest.mark.parametrize("case", WRONG_INDEXES)
def test_an_index_of_the_wrong_shape_is_one_line(which, case, sharded_dir, quantized_dir, tmp_path):
    d = damaged(quantized_dir if which == "verify" else sharded_dir, tmp_path)
    value, phrase = WRONG_INDEXES[case]
    (d / INDEX).write_text(json.dumps(value))
    line = error_line(run(*command(which, d, tmp_path)))
    assert "is not a valid safetensors index" in line and phrase in line and INDEX in line
    assert not (tmp_path / "q").exists()


WRONG_CONFIGS = {
    "a list": (lambda cfg: [1], "holds a JSON array, expected a JSON object"),
    "quantization_config a list": (lambda cfg: cfg.update(quantization_config=[1]), "'quantization_config' is [1]"),
}


@pytest.mark.parametrize("which", ["quantize", "verify", "inspect"])
@pytest.mark.parametrize("case", WRONG_CONFIGS)
def test_a_config_of_the_wrong_shape_is_one_line(which, case, sharded_dir, quantized_dir, tmp_path):
    d = damaged(quantized_dir if which == "verify" else sharded_dir, tmp_path)
    edit, phrase = WRONG_CONFIGS[case]
    edit_json(d / "config.json", edit)
    line = error_line(run(*command(which, d, tmp_path)))
    assert phrase in line and str(d / "config.json") in line


NORM = "model.layers.0.input_layernorm.weight"


def without(key: str):
    def edit(header: dict) -> None:
        del header[NORM][key]
    return edit


WRONG_HEADERS = {
    "an entry that is a number": (lambda h: h.update({NORM: 5}), "is not an object with dtype, shape and data_offsets"),
    "an entry without dtype": (without("dtype"), "'dtype' is missing"),
    "an entry without shape": (without("shape"), "'shape' is missing"),
    "an entry without data_offsets": (without("data_offsets"), "'data_offsets' is missing"),
    "a negative shape": (lambda h: h[NORM].update(shape=[-64]), "shape [-64] is not a list of non-negative integers"),
    "a header that is a list": (lambda h: [1], "holds a JSON array"),
}


@pytest.mark.parametrize("which", ["quantize", "verify", "inspect"])
@pytest.mark.parametrize("case", WRONG_HEADERS)
def test_a_safetensors_header_of_the_wrong_shape_is_one_line(which, case, sharded_dir, quantized_dir, tmp_path):
    d = damaged(quantized_dir if which == "verify" else sharded_dir, tmp_path)
    shard = shard_of(d, NORM)
    edit, phrase = WRONG_HEADERS[case]
    edit_header(shard, edit)
    line = error_line(run(*command(which, d, tmp_path)))
    assert str(shard) in line and phrase in line
    if case != "a header that is a list":
        assert NORM in line
    assert not (tmp_path / "q").exists()


# ---------------------------------------------------------------- 2. estimate validates the fields it uses
LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}


@pytest.mark.parametrize("change, phrase", [
    ({"num_attention_heads": 0}, "'num_attention_heads' is 0, expected a positive integer"),
    ({"num_key_value_heads": 0}, "'num_key_value_heads' is 0, expected a positive integer"),
    ({"hidden_size": -64}, "'hidden_size' is -64, expected a positive integer"),
    ({"num_hidden_layers": -2}, "'num_hidden_layers' is -2, expected a positive integer"),
    ({"vocab_size": 0}, "'vocab_size' is 0, expected a positive integer"),
    ({"intermediate_size": 128.5}, "'intermediate_size' is 128.5, expected a positive integer"),
    ({"hidden_size": "64"}, "'hidden_size' is \"64\", expected a positive integer"),
    ({"head_dim": -16}, "'head_dim' is -16, expected a positive integer"),
    ({"num_attention_heads": 5}, "'num_attention_heads' (5) does not divide 'hidden_size' (64)"),
])
def test_estimate_refuses_nonsense_sizes_naming_field_and_file(change, phrase, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**LLAMA, **change}))
    for target in (path, tmp_path):   # the config file itself, and the directory holding it
        line = error_line(run("estimate", target))
        assert phrase in line and str(path) in line


def test_estimate_refuses_a_config_that_is_a_list(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1]")
    for target in (path, tmp_path):
        line = error_line(run("estimate", target))
        assert str(path) in line and "holds a JSON array, expected a JSON object" in line


def test_estimate_of_a_good_config_is_unchanged(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**LLAMA, "head_dim": None, "num_key_value_heads": None}))
    r = run("estimate", path, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["config"]["kv_heads"] == 4 and d["config"]["head_dim"] == 16 and d["params"]["total"] > 0


# ---------------------------------------------------------------- 3. a lying config is refused before any model
@pytest.fixture()
def no_model_built(monkeypatch):
    """Fail the test if a transformers model (even an empty one) is built."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built from config.json before it was checked against the weights")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", refuse)


LIES = {
    "a billion layers": ({"num_hidden_layers": 10**9}, "says num_hidden_layers is 1000000000, but the weights"),
    "one layer more": ({"num_hidden_layers": 3}, "says num_hidden_layers is 3, but the weights"),
    "one layer less": ({"num_hidden_layers": 1}, "says num_hidden_layers is 1, but the weights"),
    "a huge hidden size": ({"hidden_size": 10**12}, "implies a token embedding of [512, 1000000000000]"),
    "another vocabulary": ({"vocab_size": 1000}, "implies a token embedding of [1000, 64]"),
    "zero heads": ({"num_attention_heads": 0}, "'num_attention_heads' is 0, expected a positive integer"),
    "layers as text": ({"num_hidden_layers": "2"}, "'num_hidden_layers' is \"2\", expected a positive integer"),
}


@pytest.mark.parametrize("which", ["quantize", "verify"])
@pytest.mark.parametrize("lie", LIES)
def test_a_config_that_does_not_describe_the_weights_is_refused_before_a_model_is_built(
        which, lie, tiny_llama_dir, quantized_dir, tmp_path, no_model_built):
    d = damaged(quantized_dir if which == "verify" else tiny_llama_dir, tmp_path)
    change, phrase = LIES[lie]
    edit_json(d / "config.json", lambda cfg: cfg.update(change))
    line = error_line(run(*command(which, d, tmp_path)))
    assert phrase in line and str(d / "config.json") in line
    assert not (tmp_path / "q").exists()


def test_the_check_accepts_every_supported_layout(tmp_path, tiny_tokenizer):
    """GPT-2 spells its sizes n_layer/n_embd and names its embedding wte; OPT's embedding is word_embed_proj_dim
    wide; GPT-NeoX calls it embed_in: each passes the check exactly when its config is true."""
    from conftest import make_tiny_model

    from quantkit.errors import QuantkitError
    from quantkit.source.checkpoint import (
        SafetensorsCheckpoint,
        check_config_fits,
        read_config_dict,
    )

    for model_type, extra in (("gpt2", {}), ("opt", {"word_embed_proj_dim": 32}), ("gpt_neox", {})):
        d = make_tiny_model(tmp_path / model_type, tiny_tokenizer, model_type, **extra)
        config = read_config_dict(d)
        check_config_fits(config, SafetensorsCheckpoint(d))
        layers_key = "n_layer" if model_type == "gpt2" else "num_hidden_layers"
        with pytest.raises(QuantkitError, match=f"says {layers_key} is 5"):
            check_config_fits({**config, layers_key: 5}, SafetensorsCheckpoint(d))


# ---------------------------------------------------------------- 4. inspect checks tensor offsets and sizes
def _swap_offsets_to_overlap(h: dict) -> None:
    """The second of two same-sized tensors is made to point at the first one's bytes."""
    first, second = sorted((n for n in h if n.endswith("layernorm.weight")), key=lambda n: h[n]["data_offsets"])[:2]
    h[second]["data_offsets"] = list(h[first]["data_offsets"])


def _last(h: dict) -> str:
    return max((n for n in h if n != "__metadata__"), key=lambda n: h[n]["data_offsets"][1])


INCONSISTENT = {
    "overlapping tensors": (_swap_offsets_to_overlap, "overlaps tensor"),
    "offsets in reverse": (lambda h: h[NORM].update(data_offsets=h[NORM]["data_offsets"][::-1]),
                           "are not [begin, end] with 0 <= begin <= end"),
    "a size that is not dtype x shape": (lambda h: h[NORM].update(dtype="F16"),
                                         "but a F16 tensor of shape [64] takes 128 bytes"),
    "a tensor past the end of the file": (lambda h: h[_last(h)].update(
        data_offsets=[o + 4096 for o in h[_last(h)]["data_offsets"]]), "past its end"),
}


@pytest.mark.parametrize("case", INCONSISTENT)
def test_inspect_refuses_inconsistent_offsets_naming_file_and_tensor(case, tiny_llama_dir, tmp_path):
    d = damaged(tiny_llama_dir, tmp_path)
    shard = d / "model.safetensors"
    edit, phrase = INCONSISTENT[case]
    edit_header(shard, edit)
    line = error_line(run("inspect", d))
    assert line.startswith(f"Error: checkpoint damaged: {shard}: tensor ") and phrase in line
    r = run("inspect", d, "--json")
    assert r.exit_code == 1 and json.loads(r.stdout)["errors"][0] == line.removeprefix("Error: checkpoint damaged: ")


def test_inspect_of_a_good_checkpoint_is_unchanged(tiny_llama_dir, sharded_dir):
    from quantkit.verification.integrity import read_header

    for d in (tiny_llama_dir, sharded_dir):
        r = run("inspect", d, "--json")
        assert r.exit_code == 0, r.output
        report = json.loads(r.output)
        assert report["errors"] == [] and report["tensor_bytes"] == sum(
            info["data_offsets"][1] - info["data_offsets"][0]
            for f in d.glob("*.safetensors") for info in read_header(f).values())


# ---------------------------------------------------------------- 5. parquet and hf: sets are read only as needed
def _parquet_with_unreadable_tail(path: Path, rows: list[str], rows_per_group: int, readable_groups: int) -> None:
    """A parquet file whose row groups after the first `readable_groups` hold garbage where their pages are:
    a reader that reads the whole file fails, one that stops at its budget never sees them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": rows}), path, row_group_size=rows_per_group, compression="none",
                   use_dictionary=False)
    meta = pq.ParquetFile(path).metadata
    data = bytearray(path.read_bytes())
    for group in range(readable_groups, meta.num_row_groups):
        column = meta.row_group(group).column(0)
        start = column.dictionary_page_offset or column.data_page_offset
        data[start:start + column.total_compressed_size] = b"\xff" * column.total_compressed_size
    path.write_bytes(bytes(data))


def test_a_large_parquet_set_is_read_only_as_far_as_the_budget(tmp_path):
    from quantkit.errors import CalibrationError
    from quantkit.source.calibration import load_documents

    rows = [f"document {i:04d}: " + "text " * 200 for i in range(4000)]
    path = tmp_path / "big.parquet"
    _parquet_with_unreadable_tail(path, rows, rows_per_group=500, readable_groups=2)
    budget = 600 * len(rows[0])   # the first row group and part of the second
    assert load_documents(str(path), budget) == rows[:600]
    with pytest.raises(CalibrationError, match="is not a readable parquet file"):   # the whole file is damaged
        load_documents(str(path))


def test_a_small_parquet_set_reads_as_before(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from quantkit.source.calibration import load_documents

    rows = ["alpha " * 10, None, "beta", "", "gamma " * 50]
    pq.write_table(pa.table({"text": rows}), tmp_path / "small.parquet", row_group_size=2)
    strings = [t for t in rows if isinstance(t, str)]
    assert load_documents(str(tmp_path / "small.parquet")) == strings
    assert load_documents(str(tmp_path / "small.parquet"), 65) == [strings[0], "beta", "", "g"]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "other.parquet")
    with pytest.raises(Exception, match="has no 'text' column"):
        load_documents(str(tmp_path / "other.parquet"))


class _RowCountingDataset:
    """What datasets.load_dataset returns, reduced to what quantkit uses; counts the rows handed out."""

    def __init__(self, rows: list[str]):
        self.rows, self.column_names, self.served = rows, ["text", "id"], 0

    def select_columns(self, names: list[str]):
        return self

    def __iter__(self):
        for row in self.rows:
            self.served += 1
            yield {"text": row}


def test_an_hf_set_is_read_only_as_far_as_the_budget(monkeypatch):
    import sys
    import types

    from quantkit.source.calibration import load_documents

    rows = [f"row {i} " + "word " * 100 for i in range(100_000)]
    dataset = _RowCountingDataset(rows)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: dataset))
    docs = load_documents("hf:some/set", 10 * len(rows[0]))
    assert docs == rows[:10] and dataset.served == 10
    dataset.served = 0
    assert load_documents("hf:some/set:default:train", None) == rows and dataset.served == len(rows)
