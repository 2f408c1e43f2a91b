"""A resumed run trusts nothing in its work directory: the base model must still be the one the finished layers
came from, every saved file must match its recorded sha256, and state.json must be whole and of this format.
Each refusal is one line, before any work, saying how to start over; nothing is published."""
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_model

from quantkit.cli.app import cli

ARGS = ["--samples", "8", "--seq-len", "32", "--group-size", "32"]
DAMAGED = "is damaged; remove that directory to start over"
CHANGED = "the base model's weights changed since the unfinished run in"


@pytest.fixture(scope="module")
def tiny4(tiny_tokenizer, tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny4"), tiny_tokenizer, layers=4)


def killed_run(model: Path, base: Path, kill_at: str, *extra: str) -> Path:
    """A real quantize process killed (SIGKILL) at `kill_at`, writing --out base/q; returns base, which then holds
    only the run's work directory."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "QUANTKIT_KILL_AT": kill_at}
    cmd = [sys.executable, "-m", "quantkit", "quantize", str(model), "--out", str(base / "q"), *ARGS, *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == -9, r.stderr[-2000:]
    return base


@pytest.fixture(scope="module")
def two_layers_done(tiny4, tmp_path_factory) -> Path:
    """The work of a run killed once layer 1 of 4 was saved: layer files 0 and 1, the inputs of layer 2."""
    return killed_run(tiny4, tmp_path_factory.mktemp("killed"), "layer:1:saved")


def copy_of(template: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of a killed run's folder: (its --out path, its state folder, where state.json lies)."""
    base = tmp_path / "run"
    shutil.copytree(template, base, symlinks=True)
    return base / "q", next(base.rglob("state.json")).parent


def resume(model: Path, out: Path, *extra: str):
    return CliRunner().invoke(cli, ["quantize", str(model), "--out", str(out), *ARGS, *extra])


def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(r) -> str:
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert "Traceback" not in r.output and len(errors) == 1, r.output
    return errors[0]


def assert_refused_before_any_work(r, out: Path, state: Path, before: dict, *phrases: str) -> str:
    """Exit 1 and one Error line holding every phrase; no calibration forward ran, nothing was published and
    the saved state is as it was."""
    assert r.exit_code == 1, r.output
    line = error_line(r)
    for phrase in phrases:
        assert phrase in line, line
    assert "calibration:" not in r.output and "layer 3/4" not in r.output, r.output
    assert not out.exists()
    assert tree_hashes(state) == before
    return line


def retrain(model_dir: Path, name: str) -> None:
    """New values for tensor `name` of the same shape and dtype, written in place: the safetensors header (and so
    the size, the header and config.json) stay exactly as they were."""
    path = model_dir / "model.safetensors"
    with open(path, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        entry = json.loads(f.read(n))[name]
        assert entry["dtype"] == "F32"
        start, end = entry["data_offsets"]
        values = torch.Generator().manual_seed(1)
        new = torch.randn((end - start) // 4, generator=values) * 0.02
        f.seek(8 + n + start)
        f.write(new.numpy().tobytes())


# --- the base model changed between the killed run and its resume --------------------------------------------------

@pytest.mark.parametrize("tensor, differs", [
    ("model.layers.0.mlp.up_proj.weight", "(layer 0 differs)"),
    ("model.layers.1.input_layernorm.weight", "(layer 1 differs)"),
    ("model.embed_tokens.weight", "(tensor model.embed_tokens.weight differs)"),  # read by the calibration
])
def test_new_weights_of_the_same_shapes_are_refused(tensor, differs, tiny4, two_layers_done, tmp_path):
    out, state = copy_of(two_layers_done, tmp_path)
    model = tmp_path / "model"
    shutil.copytree(tiny4, model)
    retrain(model, tensor)
    before = tree_hashes(state)
    line = assert_refused_before_any_work(resume(model, out), out, state, before, CHANGED, differs,
                                          "remove that directory to start over")
    assert str(state) in line


def test_a_change_in_a_layer_not_yet_quantized_resumes(tiny4, two_layers_done, tmp_path):
    """Layers 2 and 3 were never read: the resumed run quantizes them as they are now, and the finished ones
    came from weights that are still the same."""
    out, _ = copy_of(two_layers_done, tmp_path)
    model = tmp_path / "model"
    shutil.copytree(tiny4, model)
    retrain(model, "model.layers.3.mlp.up_proj.weight")
    r = resume(model, out)
    assert r.exit_code == 0 and "resuming after layer 2/4" in r.output, r.output


def test_a_changed_quantized_head_is_refused(tiny4, tmp_path_factory, tmp_path):
    """--lm-head: the head's weights, read when it was quantized, are recorded with its step too."""
    done = killed_run(tiny4, tmp_path_factory.mktemp("killed-head"), "assembled", "--lm-head")
    out, state = copy_of(done, tmp_path)
    model = tmp_path / "model"
    shutil.copytree(tiny4, model)
    retrain(model, "lm_head.weight")
    before = tree_hashes(state)
    assert_refused_before_any_work(resume(model, out, "--lm-head"), out, state, before, CHANGED,
                                   "(tensor lm_head.weight differs)")
    r = resume(tiny4, out, "--lm-head")  # the base it came from: it resumes
    assert r.exit_code == 0 and "resuming after layer 5/4" in r.output, r.output


def test_resume_reads_each_finished_layer_once_and_a_fresh_run_reads_nothing_twice(tiny4, two_layers_done,
                                                                                      tmp_path, monkeypatch):
    """The base tensors' sha256s come from the reads the run makes anyway: a fresh run reads each quantized
    weight once; a resumed one reads each finished layer's once to check it and each other one once to quantize
    it, so it reads what a fresh run reads (the norms twice: once more when they are copied into the output)."""
    from collections import Counter

    from quantkit.source.checkpoint import SafetensorsCheckpoint

    reads: list[str] = []
    get = SafetensorsCheckpoint.get

    def counted(self, name):
        reads.append(name)
        return get(self, name)

    monkeypatch.setattr(SafetensorsCheckpoint, "get", counted)
    r = resume(tiny4, tmp_path / "fresh")
    assert r.exit_code == 0, r.output
    fresh = Counter(n for n in reads if n.startswith("model.layers."))
    weights = [n for n in _tensor_names(tiny4) if n.startswith("model.layers.") and n.endswith("_proj.weight")]
    assert len(weights) == 28 and all(fresh[n] == 1 for n in weights)
    reads.clear()
    out, _ = copy_of(two_layers_done, tmp_path)
    r = resume(tiny4, out)
    assert r.exit_code == 0 and "resuming after layer 2/4" in r.output, r.output
    assert Counter(n for n in reads if n.startswith("model.layers.")) == fresh


def _tensor_names(model_dir: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return list(f.keys())


# --- saved files that changed on disk -------------------------------------------------------------------------

def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # a bit of the last tensor's data: the file still parses
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-16])


@pytest.mark.parametrize("name, damage", [
    ("layers/layer-00000.safetensors", _flip),
    ("layers/layer-00001.safetensors", _truncate),
    ("layers/layer-00001.safetensors", Path.unlink),
    ("activations-00002.safetensors", _flip),
    ("activations-00002.safetensors", _truncate),
])
def test_a_damaged_resume_file_is_refused_before_any_work(name, damage, tiny4, two_layers_done, tmp_path):
    out, state = copy_of(two_layers_done, tmp_path)
    damage(state / name)
    before = tree_hashes(state)
    line = assert_refused_before_any_work(resume(tiny4, out), out, state, before, str(state / name),
                                          f"the unfinished run's state in {state} {DAMAGED}")
    assert ("is missing" in line) if damage is Path.unlink else True


def test_a_layer_file_damaged_after_the_check_is_refused_when_assembled(tmp_path):
    """The layer files are checked again as they are read for the output."""
    from quantkit.errors import QuantkitError
    from quantkit.run.resume import RunState

    state = RunState(tmp_path / "work", "fingerprint")
    state.save_layer(0, {"w": torch.arange(64, dtype=torch.float32)}, {"index": 0, "seconds": 0.0, "losses": {}},
                     None)
    assert torch.equal(state.layer_tensors(0)["w"], torch.arange(64, dtype=torch.float32))
    _flip(state.layer_file(0))
    with pytest.raises(QuantkitError, match=f"layer-00000.safetensors does not match the sha256 .*{DAMAGED}"):
        state.layer_tensors(0)


def test_checksums_are_recorded_as_files_are_written(two_layers_done):
    """state.json holds each saved file's sha256 and size, and which base tensors each layer came from."""
    state_dir = next(two_layers_done.rglob("state.json")).parent
    saved = json.loads((state_dir / "state.json").read_text())
    for i, step in enumerate(saved["steps"]):
        data = (state_dir / "layers" / f"layer-{i:05d}.safetensors").read_bytes()
        assert step["sha256"] == hashlib.sha256(data).hexdigest() and step["size"] == len(data)
        assert any(n.startswith(f"model.layers.{i}.") for n in step["base"])
    data = (state_dir / "activations-00002.safetensors").read_bytes()
    assert saved["activations"] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


# --- a damaged or older state.json ---------------------------------------------------------------------------------

def _edit(change):
    def apply(saved: dict) -> str:
        change(saved)
        return json.dumps(saved)
    return apply


STATES = {
    "not JSON": lambda saved: '{"fingerprint": ',
    "not UTF-8": lambda saved: b"\xff\xfe{}",
    "a JSON list": lambda saved: "[1]",
    "an empty object": lambda saved: "{}",
    "the older format without checksums": lambda saved: json.dumps(
        {"fingerprint": saved["fingerprint"], "layers": saved["layers"]}),
    "another format": _edit(lambda s: s.update(format=3)),
    "layers not a list": _edit(lambda s: s.update(layers={"0": s["layers"][0]})),
    "a layer that is not an object": _edit(lambda s: s["layers"].__setitem__(1, 7)),
    "a layer without losses": _edit(lambda s: s["layers"][1].pop("losses")),
    "losses of the wrong type": _edit(lambda s: s["layers"][0].__setitem__("losses", [1.0])),
    "a loss that is not a number": _edit(lambda s: s["layers"][0]["losses"].__setitem__("mlp.up_proj", "low")),
    "a layer's index out of place": _edit(lambda s: s["layers"][1].__setitem__("index", 0)),
    "a step that is not an object": _edit(lambda s: s["steps"].__setitem__(0, None)),
    "a step without its sha256": _edit(lambda s: s["steps"][1].pop("sha256")),
    "a size of the wrong type": _edit(lambda s: s["steps"][0].__setitem__("size", "26120")),
    "a step without its base": _edit(lambda s: s["steps"][0].pop("base")),
    "fewer steps than layers": _edit(lambda s: s["steps"].pop()),
    "activations of the wrong type": _edit(lambda s: s.update(activations=[1])),
    "a missing base tensor's sha256": _edit(lambda s: s["steps"][1]["base"].pop("model.layers.1.mlp.up_proj.weight")),
}


def _damage_state(state: Path, case: str) -> None:
    path = state / "state.json"
    content = STATES[case](json.loads(path.read_text()))
    path.write_bytes(content if isinstance(content, bytes) else content.encode())


@pytest.mark.parametrize("case", ["not JSON", "a JSON list", "the older format without checksums",
                                  "a layer that is not an object", "a layer without losses"])
def test_a_damaged_state_json_is_one_line_before_any_work(case, tiny4, two_layers_done, tmp_path):
    out, state = copy_of(two_layers_done, tmp_path)
    _damage_state(state, case)
    before = tree_hashes(state)
    assert_refused_before_any_work(resume(tiny4, out), out, state, before, str(state / "state.json"),
                                   f"the unfinished run's state in {state} {DAMAGED}")


@pytest.mark.parametrize("case", list(STATES))
def test_every_damage_of_state_json_is_refused_as_it_is_read(case, two_layers_done, tmp_path):
    """Each value of state.json that a later step uses is checked when the state is read (the base tensors'
    sha256s when the base is checked, before any work too)."""
    from quantkit.errors import QuantkitError
    from quantkit.run.resume import RunState

    _, state = copy_of(two_layers_done, tmp_path)
    fingerprint = json.loads((state / "state.json").read_text())["fingerprint"]
    _damage_state(state, case)
    with pytest.raises(QuantkitError, match=f"the unfinished run's state in .* {DAMAGED}"):
        RunState(state, fingerprint).check_base(None, [_tensor_names_of_layer(i) for i in range(4)], 4)


def _tensor_names_of_layer(i: int) -> list[str]:
    return [f"model.layers.{i}.{name}" for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                    "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                                                    "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                                    "mlp.down_proj.weight", "input_layernorm.weight",
                                                    "post_attention_layernorm.weight")]
