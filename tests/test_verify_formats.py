"""`verify` on every format it reads, each artifact made by the format's own tool from one tiny Llama: GPTQ and AWQ
by GPTQModel, compressed-tensors by its own compressors, FP8 by transformers' quantize op, bitsandbytes by
transformers + bitsandbytes, GGUF by gguf-py (Q6_K packed here: gguf-py only dequantizes K-types). For each: verify
passes integrity, names the format, and reports the perplexity transformers itself computes for that artifact on the
same token windows; the streamed and in-memory evaluations agree; a layer whose scales are multiplied fails the
thresholds and is the layer with the largest error; a missing part or a truncated file is one `Error:` line naming
it; `--format` naming another format is refused in one line; and `--loader transformers` agrees with quantkit's."""
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_run, error_line, make_tiny_model
from safetensors.torch import load_file, save_file

from quantkit.config import DEFAULT_EVAL
from quantkit.source.calibration import evaluation_windows
from quantkit.verification.api import verify
from quantkit.verification.report import VerifyReport

pytestmark = [pytest.mark.slow,
              # transformers says so whenever from_pretrained is given loading attributes for a quantized checkpoint
              pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning"),
              pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning")]

SEQ_LEN, MAX_TOKENS = 64, 512
EVAL = ["--seq-len", str(SEQ_LEN), "--max-tokens", str(MAX_TOKENS), "--no-generate"]
FAST = dict(seq_len=SEQ_LEN, max_tokens=MAX_TOKENS, generate=False)
LAYERS = 4
# Hidden size 256 so that Q6_K (blocks of 256 inputs) fits every Linear. The wider init gives peaked logits, so the
# perplexity sees the weights: a 4-bit artifact moves it by a few percent, a damaged layer by far more than 1%.
SHAPE = dict(layers=LAYERS, hidden_size=256, intermediate_size=512, initializer_range=0.1)
# What a good 4-bit artifact of this random model passes and a damaged one fails, for the "passes" and the "damaged"
# checks alike (the defaults are for real models: a random tiny model's top-1 predictions are near ties that 4-bit
# rounding flips, so they fail good 4-bit artifacts here too)
PASS = ["--max-ppl-ratio", "1.15", "--max-kl", "1.5", "--min-top1", "0.15"]
CLOSENESS = {"ppl_ratio", "kl_mean", "top1_agreement"}
SCALE = 4.0  # the damage: every weight of one decoder layer this many times too large


WEIGHTS, ACTIVATIONS, REFUSED = "weights", "activations", "refused"  # what transformers' from_pretrained does


@dataclass(frozen=True)
class Case:
    fmt: str            # the format verify reports
    scales: str | None  # the per-Linear tensor that scales the codes (None: GGUF, whose blocks hold their scales)
    part: str | None    # a part of each quantized Linear whose absence is structural damage (None: GGUF)
    # --loader transformers: WEIGHTS loads the weights as quantkit reads them (the same perplexity); ACTIVATIONS
    # also quantizes the activations, as the artifact is deployed; REFUSED cannot load it on CPU
    transformers: str = WEIGHTS


CASES = {
    "gptq": Case("gptq", "scales", "qzeros"),
    "awq": Case("awq", "scales", "qzeros"),
    "ct-w4a16-sym": Case("compressed-tensors", "weight_scale", "weight_scale"),
    # compressed-tensors 0.20.1 compresses the empty model's zero points without packing them, so their shapes
    # disagree with the file's (test_format_compressed_tensors)
    "ct-w4a16-asym": Case("compressed-tensors", "weight_scale", "weight_zero_point", REFUSED),
    "ct-fp8-block": Case("compressed-tensors", "weight_scale", "weight_scale", ACTIVATIONS),
    "ct-w8a8-int": Case("compressed-tensors", "weight_scale", "weight_scale", ACTIVATIONS),
    "fp8": Case("fp8", "weight_scale_inv", "weight_scale_inv"),  # on CPU transformers dequantizes while loading
    "bnb-nf4": Case("bitsandbytes", "weight.absmax", "weight.quant_map"),
    "bnb-int8": Case("bitsandbytes", "SCB", "SCB"),
    "gguf-q8_0": Case("gguf", None, None),
    "gguf-q4_0": Case("gguf", None, None),
    "gguf-q6_k": Case("gguf", None, None),
}
NAMES = list(CASES)


# --- the artifacts ---------------------------------------------------------------------------------------------------

# GPTQModel quantizes the base with GPTQ and with AWQ (GEMM, zero points) in a child process, which keeps its
# environment settings, patches and banners out of this one; there transformers loads each artifact (through
# GPTQModel's kernels) and scores verify's evaluation windows, and verify --loader transformers runs.
PEERS = """
import json, sys, torch
from pathlib import Path
from click.testing import CliRunner
base, out, seq_len, max_tokens = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
thresholds = sys.argv[5:]
from gptqmodel import GPTQModel, QuantizeConfig
from gptqmodel.utils.backend import BACKEND
from transformers import AutoModelForCausalLM, AutoTokenizer
from quantkit.cli.app import cli
from quantkit.config import DEFAULT_EVAL
from quantkit.errors import QuantkitError
from quantkit.source.calibration import evaluation_windows
g = torch.Generator().manual_seed(0)
rows = [torch.randint(3, 500, (32,), generator=g).tolist() for _ in range(8)]
calib = [{"input_ids": r, "attention_mask": [1] * len(r)} for r in rows]
result = {}
for name, config, kwargs in (
        ("gptq", QuantizeConfig(bits=4, group_size=32, sym=True, format="gptq"), {}),
        ("awq", QuantizeConfig(bits=4, group_size=32, sym=False, quant_method="awq", format="gemm"),
         {"backend": BACKEND.AWQ_TORCH})):
    model = GPTQModel.load(base, config, device="cpu")
    model.quantize(calib, batch_size=1, **kwargs)
    model.save(str(out / name))
    windows = evaluation_windows(AutoTokenizer.from_pretrained(out / name), DEFAULT_EVAL, seq_len, max_tokens)
    hf = AutoModelForCausalLM.from_pretrained(out / name, device_map="cpu", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(windows).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="none")
    r = CliRunner().invoke(cli, ["verify", str(out / name), "--base", base, "--loader", "transformers", "--json",
                                 "--seq-len", str(seq_len), "--max-tokens", str(max_tokens), "--no-generate", *thresholds])
    result[name] = {"windows": windows.tolist(), "window_nll": nll.view(len(windows), -1).mean(1).tolist(),
                    "loader_transformers": {"exit_code": r.exit_code, "stdout": r.stdout, "output": r.output}}
(out / "result.json").write_text(json.dumps(result))
"""


def gptqmodel_peers(base: Path, out: Path) -> dict:
    """GPTQModel's GPTQ and AWQ artifacts under `out`, and what the child process measured on them."""
    env = {**os.environ, "BUILD_CUDA_EXT": "0", "GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}  # as this process runs (one_thread)
    r = subprocess.run([sys.executable, "-c", PEERS, str(base), str(out), str(SEQ_LEN), str(MAX_TOKENS), *PASS],
                       capture_output=True, text=True, env=env, timeout=600, cwd=out)  # GPTQModel writes logs/ here
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


def q6_k(a: np.ndarray) -> np.ndarray:
    """A float32 [rows, cols] (cols a multiple of 256) as Q6_K blocks, by round-to-nearest: per 16 inputs an int8
    scale of the block's float16 d, and 6-bit codes."""
    x = a.astype(np.float32).reshape(-1, 16, 16)                              # [blocks, 16 scales, 16 inputs]
    sub = np.abs(x).max(-1) / 31                                                # each 16's step, codes in [-32, 31]
    d16 = (sub.max(-1) / 127).astype(np.float16)
    d = d16.astype(np.float32)[:, None]
    scales = np.divide(sub, d, out=np.zeros_like(sub), where=d > 0).round().clip(-128, 127).astype(np.int8)
    step = (d * scales)[..., None]
    codes = np.divide(x, step, out=np.zeros_like(x), where=step != 0).round().clip(-32, 31) + 32
    return pack_q6_k(codes.astype(np.uint8).reshape(-1, 256), scales, d16).reshape(a.shape[0], -1)


def pack_q6_k(codes: np.ndarray, scales: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q6_K blocks [n, 210] from codes [n, 256] in [0, 64), int8 scales [n, 16] and float16 d [n], laid out as
    gguf-py's Q6_K.dequantize_blocks (llama.cpp's block_q6_K) unpacks them: ql (low nibbles, two codes a byte),
    qh (high two bits, four codes a byte), scales, d. Each half of 128 codes packs on its own."""
    n = codes.shape[0]
    q = codes.reshape(n, 2, 128)
    lo, hi = q & 0x0F, q >> 4
    ql = lo[:, :, :64] | (lo[:, :, 64:] << 4)
    qh = hi[:, :, :32] | (hi[:, :, 32:64] << 2) | (hi[:, :, 64:96] << 4) | (hi[:, :, 96:] << 6)
    return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), scales.view(np.uint8),
                           d.astype(np.float16).view(np.uint8).reshape(n, 2)], axis=1)


def test_q6_k_blocks_are_what_gguf_py_unpacks():
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 64, (6, 256), dtype=np.uint8)
    scales = rng.integers(-128, 128, (6, 16), dtype=np.int16).astype(np.int8)
    d = rng.random(6).astype(np.float16)
    back = gguf.quants.dequantize(pack_q6_k(codes, scales, d), gguf.GGMLQuantizationType.Q6_K)
    expected = (d.astype(np.float32)[:, None] * scales.astype(np.float32))[..., None] * (
        codes.astype(np.float32).reshape(6, 16, 16) - 32)
    assert np.array_equal(back, expected.reshape(6, 256))
    a = rng.standard_normal((8, 512)).astype(np.float32)  # and q6_k quantizes: 6 bits, a small error
    error = np.linalg.norm(gguf.quants.dequantize(q6_k(a), gguf.GGMLQuantizationType.Q6_K) - a, axis=1)
    assert np.all(error < 0.03 * np.linalg.norm(a, axis=1))


def gguf_artifact(base: Path, path: Path, qtype_name: str) -> Path:
    """The base as a llama GGUF (llama.cpp's names and q/k permutation, test_format_gguf.write_gguf), every 2-D
    tensor in one type. Q6_K: written with placeholder blocks, then each tensor's blocks replaced by q6_k() of the
    same tensor as an F32 GGUF of the base holds it."""
    import gguf
    from test_format_gguf import every_type, write_gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    write_gguf(base, path, dict.fromkeys(every_type(base), qtype))
    if qtype != gguf.GGMLQuantizationType.Q6_K:
        return path
    from quantkit.source.gguf_header import read_header

    floats = {t.name: np.array(t.data) for t in gguf.GGUFReader(write_gguf(base, path.with_suffix(".f32"))).tensors}
    path.with_suffix(".f32").unlink()
    data = bytearray(path.read_bytes())
    for entry in read_header(path).tensors:
        if entry.ggml_type == qtype:
            blocks = q6_k(floats[entry.name]).tobytes()
            assert len(blocks) == entry.nbytes, entry.name
            data[entry.start:entry.start + entry.nbytes] = blocks
    path.write_bytes(bytes(data))
    return path


def bnb_artifact(base: Path, out: Path, kind: str) -> Path:
    """transformers + bitsandbytes quantize the base while loading it; save_pretrained, with the base's tokenizer."""
    from test_format_bitsandbytes import bnb_config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base), quantization_config=bnb_config(kind), dtype=torch.float16,
                                                 device_map="cpu")
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


class Artifacts:
    """Each case's artifact, made the first time a test asks for it (GPTQModel's two in one child process)."""

    def __init__(self, base: Path, root: Path) -> None:
        self.base, self.root = base, root
        self.paths: dict[str, Path] = {}
        self.peers: dict = {}

    def __call__(self, name: str) -> Path:
        if name not in self.paths:
            self.paths[name] = self.build(name)
        return self.paths[name]

    def build(self, name: str) -> Path:
        kind = name.split("-", 1)[-1]
        if name in ("gptq", "awq"):
            pytest.importorskip("gptqmodel")
            if not self.peers:
                (self.root / "peers").mkdir()
                self.peers = gptqmodel_peers(self.base, self.root / "peers")
            return self.root / "peers" / name
        if name.startswith("ct-"):
            pytest.importorskip("compressed_tensors")
            from test_format_compressed_tensors import SCHEMES, llm_compressor_save

            return llm_compressor_save(self.base, self.root / name, SCHEMES[kind])
        if name == "fp8":
            from test_format_fp8 import quantized_copy
            from transformers import FineGrainedFP8Config

            return quantized_copy(self.base, self.root / name, FineGrainedFP8Config(weight_block_size=[32, 32]))
        if name.startswith("bnb-"):
            pytest.importorskip("bitsandbytes")
            return bnb_artifact(self.base, self.root / name, kind)
        pytest.importorskip("gguf")
        (self.root / name).mkdir()
        return gguf_artifact(self.base, self.root / name / "model.gguf", kind.upper())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for this module: its models are so small that more threads gain nothing, and on a shared
    machine their spin-waits make every small op many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_tokenizer) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("base") / "tiny", tiny_tokenizer, **SHAPE)


@pytest.fixture(scope="module")
def artifacts(base, tmp_path_factory) -> Artifacts:
    return Artifacts(base, tmp_path_factory.mktemp("artifacts"))


@pytest.fixture(scope="module")
def reports(artifacts, base) -> Callable[[str], dict]:
    """Each artifact's streamed verify (--json, PASS thresholds), run once."""
    cache: dict[str, dict] = {}

    def report(name: str) -> dict:
        if name not in cache:
            code, cache[name] = verify_json(artifacts(name), "--base", base, "--stream", "on", *PASS)
            assert code == 0, cache[name]["failures"]
        return cache[name]
    return report


def verify_json(*args) -> tuple[int, dict]:
    r = cli_run("verify", *args, *EVAL, "--json")
    assert r.exit_code in (0, 1) and "Traceback" not in r.output, r.output
    return r.exit_code, json.loads(r.stdout)


# --- what transformers computes for each artifact --------------------------------------------------------------------

def transformers_model(name: str, path: Path):
    """The artifact as transformers' own from_pretrained loads it on CPU."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    if CASES[name].fmt == "gguf":
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    kwargs = {"dtype": torch.float32}  # as verify computes: a float16 forward moves these peaked logits by ~1%
    if CASES[name].fmt == "compressed-tensors":  # dequantized while loading: weight-only, as verify reads it (the
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)  # default path cannot load asym)
    return AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu", **kwargs)


def window_nll(model, windows: torch.Tensor) -> list[float]:
    """Each window's mean next-token NLL."""
    with torch.no_grad():
        logits = model.eval()(windows).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="none")
    return nll.view(windows.shape[0], -1).double().mean(1).tolist()


def independent_nll(name: str, artifacts: Artifacts, base: Path) -> tuple[torch.Tensor, list[float]]:
    """verify's evaluation windows, made here with the tokenizer verify uses (the artifact's; a GGUF's base's), and
    each window's NLL under the model transformers loads from the artifact (GPTQModel's: in its child process)."""
    from transformers import AutoTokenizer

    path = artifacts(name)
    tokenizer = AutoTokenizer.from_pretrained(base if CASES[name].fmt == "gguf" else path)
    windows = evaluation_windows(tokenizer, DEFAULT_EVAL, SEQ_LEN, MAX_TOKENS)
    if name in artifacts.peers:
        peer = artifacts.peers[name]
        assert torch.equal(torch.tensor(peer["windows"]), windows)
        return windows, peer["window_nll"]
    return windows, window_nll(transformers_model(name, path), windows)


def ppl(nll: list[float]) -> float:
    return math.exp(sum(nll) / len(nll))


# --- 1. verify passes, names the format, and has transformers' perplexity ---------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_verify_passes_and_has_the_perplexity_transformers_computes(name, artifacts, reports, base):
    d = reports(name)
    windows, nll = independent_nll(name, artifacts, base)
    assert d["passed"] and d["integrity"]["ok"], d["integrity"]["errors"]
    assert d["quantized"]["format"] == CASES[name].fmt
    # every decoder Linear (and a GGUF's embeddings and output head, which llama.cpp quantizes too)
    assert d["integrity"]["quantized_modules"] == 7 * LAYERS + (2 if CASES[name].fmt == "gguf" else 0)
    assert not any("cover GPTQ checkpoints only" in n for n in d["integrity"]["notes"]), d["integrity"]["notes"]
    assert d["eval"]["windows"] == windows.shape[0] and d["tokens"] == windows.numel() - windows.shape[0]
    assert d["quantized"]["ppl"] == pytest.approx(ppl(nll), rel=0.01)
    # window by window too, within 2%: GPTQModel's AWQ kernel and LLM.int8 compute in float16 on CPU
    assert [w["quantized_ppl"] for w in d["per_window"]] == pytest.approx([math.exp(x) for x in nll], rel=0.02)
    assert d["ppl_ratio"] != 1 and d["kl_mean"] > 0  # quantized: not the base itself
    assert [row["index"] for row in d["layer_errors"]] == list(range(LAYERS))


# --- 2. both evaluation paths --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_streamed_and_in_memory_agree(name, artifacts, reports, base):
    streamed = reports(name)
    whole = verify(str(artifacts(name)), str(base), stream="off", **FAST)
    assert (streamed["eval"]["mode"], whole.eval["mode"]) == ("streamed", "in memory")
    for key in ("ppl_ratio", "kl_mean", "kl_p99", "top1_agreement"):
        assert getattr(whole, key) == pytest.approx(streamed[key], rel=1e-5, abs=1e-7), key
    assert whole.quantized_ppl == pytest.approx(streamed["quantized"]["ppl"], rel=1e-5)
    assert whole.base_ppl == pytest.approx(streamed["base"]["ppl"], rel=1e-5)
    assert whole.tokens == streamed["tokens"]


# --- 3. damaged copies -----------------------------------------------------------------------------------------------

def copy_of(path: Path, dst: Path) -> Path:
    """A copy of the artifact (a folder, or a GGUF file in a folder of its own) under dst; returns the artifact."""
    if path.is_file():
        dst.mkdir()
        return Path(shutil.copy(path, dst / path.name))
    return shutil.copytree(path, dst)


def rewrite_tensors(model_dir: Path, change) -> None:
    """change(tensors) on every safetensors file of the folder, each rewritten."""
    for shard in sorted(model_dir.glob("*.safetensors")):
        tensors = load_file(shard)
        change(tensors)
        save_file(tensors, shard, metadata={"format": "pt"})


GGUF_SCALE_OFFSETS = {"Q8_0": 0, "Q4_0": 0, "Q6_K": 208}  # where a block's float16 d lies in it


def scale_gguf_layer(path: Path, layer: int, factor: float) -> int:
    """Every block scale (d) of every quantized tensor of blk.<layer> multiplied by factor, in place; returns how
    many tensors."""
    import gguf

    from quantkit.source.gguf_header import read_header

    data = bytearray(path.read_bytes())
    hit = [t for t in read_header(path).tensors if t.name.startswith(f"blk.{layer}.") and t.ggml_type.name in
           GGUF_SCALE_OFFSETS]
    for t in hit:
        block = gguf.GGML_QUANT_SIZES[t.ggml_type][1]
        d = np.frombuffer(data, np.uint8, t.nbytes, t.start).reshape(-1, block)
        at = GGUF_SCALE_OFFSETS[t.ggml_type.name]
        scaled = (d[:, at:at + 2].copy().view(np.float16).astype(np.float32) * factor).astype(np.float16)
        d[:, at:at + 2] = scaled.view(np.uint8)
    path.write_bytes(bytes(data))
    return len(hit)


def scale_layer(name: str, path: Path, layer: int, factor: float) -> None:
    """Every scales tensor (the format's) of one decoder layer multiplied by factor."""
    case = CASES[name]
    if case.scales is None:
        assert scale_gguf_layer(path, layer, factor) == 7
        return
    suffix = f".{case.scales}"

    def scale(tensors: dict) -> None:
        hit = [k for k in tensors if k.startswith(f"model.layers.{layer}.") and k.endswith(suffix)]
        assert len(hit) == 7, hit
        for k in hit:
            tensors[k] = (tensors[k].float() * factor).to(tensors[k].dtype)
    rewrite_tensors(path, scale)


@pytest.mark.parametrize("name", NAMES)
def test_a_layer_with_scaled_weights_fails_and_is_found(name, artifacts, reports, base, tmp_path):
    good = reports(name)
    layer = min(good["layer_errors"], key=lambda row: row["local_error"])["index"]  # the one adding the least error
    damaged = copy_of(artifacts(name), tmp_path / "damaged")
    scale_layer(name, damaged, layer, SCALE)
    code, d = verify_json(damaged, "--base", base, "--stream", "on", *PASS)
    assert code == 1 and not d["passed"] and d["integrity"]["ok"], d["integrity"]["errors"]
    assert {f["metric"] for f in d["failures"]} & CLOSENESS and {f["metric"] for f in d["failures"]} <= CLOSENESS
    assert max(d["layer_errors"], key=lambda row: row["local_error"])["index"] == layer
    assert d["layer_errors"][layer]["local_error"] > 2 * good["layer_errors"][layer]["local_error"]
    # the perplexity checks of the first test can fail: this damage moves each window's by far more than 2%
    moved = [abs(a["quantized_ppl"] / b["quantized_ppl"] - 1) for a, b in zip(d["per_window"], good["per_window"])]
    assert sum(moved) / len(moved) > 0.1, moved


def first_module(path: Path, part: str) -> str:
    """The first quantized Linear of decoder layer 1 holding `part`."""
    from safetensors import safe_open

    names = []
    for shard in path.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            names += [n.removesuffix(f".{part}") for n in f.keys() if n.endswith(f".{part}")]
    return sorted(n for n in names if n.startswith("model.layers.1."))[0]


@pytest.mark.parametrize("name", NAMES)
def test_a_missing_part_or_truncated_file_is_one_error_line(name, artifacts, base, tmp_path):
    damaged = copy_of(artifacts(name), tmp_path / "damaged")
    part = CASES[name].part
    if part is None:
        damaged.write_bytes(damaged.read_bytes()[:-1000])
        expected = [f"{damaged} is not a valid GGUF file", "lies past the end of the file"]
    else:
        module = first_module(damaged, part)
        rewrite_tensors(damaged, lambda t: t.pop(f"{module}.{part}"))
        expected = [module, part]
    r = cli_run("verify", damaged, "--base", base, *EVAL)
    assert r.exit_code == 1
    line = error_line(r)
    assert all(e in line for e in expected) and "internal error" not in line, line
    assert line.startswith("Error: integrity check failed:"), line  # found from the headers, before any model


def test_a_truncated_safetensors_file_is_one_error_line(artifacts, base, tmp_path):
    damaged = copy_of(artifacts("fp8"), tmp_path / "damaged")
    shard = damaged / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4096])
    r = cli_run("verify", damaged, "--base", base, *EVAL)
    assert r.exit_code == 1
    line = error_line(r)
    assert "model.safetensors" in line and "internal error" not in line, line


# --- 4. --format and --loader ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_format_naming_another_format_is_one_line(name, artifacts, base):
    fmt = CASES[name].fmt
    other = "gguf" if fmt != "gguf" else "gptq"
    path = artifacts(name)
    r = cli_run("verify", path, "--base", base, "--format", other, *EVAL)
    assert r.exit_code == 1
    assert error_line(r) == f"Error: {path} is in the {fmt} format, not {other} (--format)"
    code, d = verify_json(path, "--base", base, "--format", fmt, *PASS)  # naming its own format is fine
    assert code == 0 and d["quantized"]["format"] == fmt


@pytest.mark.parametrize("name", NAMES)
def test_transformers_loader_agrees_with_quantkits(name, artifacts, reports, base):
    quantkit_ppl = reports(name)["quantized"]["ppl"]
    path = artifacts(name)
    if name in artifacts.peers:  # run in the child process, where GPTQModel is imported
        r = artifacts.peers[name]["loader_transformers"]
    else:
        result = cli_run("verify", path, "--base", base, "--loader", "transformers", *EVAL, "--json", *PASS)
        r = {"exit_code": result.exit_code, "stdout": result.stdout, "output": result.output}
    if CASES[name].transformers == REFUSED:
        errors = [line for line in r["output"].splitlines() if line.startswith("Error:")]
        assert r["exit_code"] == 1 and "Traceback" not in r["output"] and len(errors) == 1, r["output"]
        assert errors[0].startswith(f"Error: transformers cannot load {path}: "), errors
        return
    assert r["exit_code"] == 0 and "Error:" not in r["output"], r["output"]
    d = json.loads(r["stdout"])
    assert d["quantized"]["loader"] == "transformers" and d["eval"]["mode"] == "in memory"
    if CASES[name].transformers == WEIGHTS:
        assert d["quantized"]["ppl"] == pytest.approx(quantkit_ppl, rel=0.01)
    else:  # activations quantized too: what quantkit's report says it does not measure
        assert d["quantized"]["ppl"] == pytest.approx(quantkit_ppl, rel=0.03)
        assert any("also quantizes activations" in n for n in reports(name)["integrity"]["notes"])


# --- generations, once ------------------------------------------------------------------------------------------------

def test_generations_run_for_a_format_read_through_its_view(artifacts, base):
    r: VerifyReport = verify(str(artifacts("gguf-q8_0")), str(base), seq_len=SEQ_LEN, max_tokens=MAX_TOKENS,
                             max_new_tokens=4)
    assert r.format == "gguf" and r.generations and all(g.base is not None for g in r.generations)
    assert all(g.match is not None for g in r.generations)


# --- option combinations that used to end badly ------------------------------------------------------------------

def test_stream_on_with_max_memory_and_generations_on_a_format_read_through_its_view(artifacts, base):
    r = verify(str(artifacts("fp8")), str(base), stream="on", max_memory=2**30, seq_len=SEQ_LEN,
               max_tokens=MAX_TOKENS, max_new_tokens=2)
    assert r.eval["mode"] == "streamed" and r.quantized_ppl is not None


def test_max_memory_with_the_transformers_loader_gives_advice_that_can_be_followed(artifacts, base):
    r = cli_run("verify", artifacts("fp8"), "--base", base, "--loader", "transformers", "--max-memory", "1GB", *EVAL)
    assert r.exit_code in (0, 1)
    if r.exit_code == 1:
        assert "--stream on" not in error_line(r)


def test_the_transformers_loader_note_on_an_8bit_bitsandbytes_artifact(artifacts, base):
    code, d = verify_json(artifacts("bnb-int8"), "--base", base, "--loader", "transformers", *PASS)
    note = next(n for n in d["notes"] if "bitsandbytes checkpoint" in n)
    assert code == 0 and "4-bit" not in note, note
