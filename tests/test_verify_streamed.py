"""verify layer by layer (`--stream on`, streamed.py): the same numbers as the in-memory path, each layer's error
pointing at the damaged layer, the device and mode options, and memory that does not grow with depth."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_tiny_model
from test_verify import error_lines, run, run_json, scale_layer

from quantkit.config import CalibSpec, QuantSpec
from quantkit.errors import QuantkitError
from quantkit.run.pipeline import quantize
from quantkit.tools.synthetic import shape_config, write_synthetic_checkpoint
from quantkit.verification.api import verify

FAST = dict(seq_len=64, max_tokens=512, generate=False)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory, tiny_tokenizer):
    base = make_tiny_model(tmp_path_factory.mktemp("base") / "m", tiny_tokenizer, layers=4)
    out = tmp_path_factory.mktemp("q") / "gptq"
    quantize(str(base), QuantSpec(bits=4, group_size=32), CalibSpec(samples=8, seq_len=32), out=out)
    return base, out


def test_streamed_and_in_memory_give_the_same_metrics(tiny_pair):
    base, q = tiny_pair
    whole = verify(str(q), str(base), stream="off", **FAST)
    layered = verify(str(q), str(base), stream="on", **FAST)
    assert (whole.eval["mode"], layered.eval["mode"]) == ("in memory", "streamed")
    for key in ("quantized_ppl", "base_ppl", "ppl_ratio", "kl_mean", "kl_p99", "top1_agreement"):
        a, b = getattr(whole, key), getattr(layered, key)
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7), key
    assert whole.tokens == layered.tokens
    assert [w["kl_mean"] for w in whole.per_window] == pytest.approx([w["kl_mean"] for w in layered.per_window],
                                                                     rel=1e-4, abs=1e-7)
    assert whole.layer_errors == []  # measured by the streamed path only
    assert [row["index"] for row in layered.layer_errors] == [0, 1, 2, 3]


def test_a_model_against_itself_has_no_layer_error(tiny_pair):
    base, _ = tiny_pair
    r = verify(str(base), str(base), stream="on", **FAST)
    assert r.kl_mean == 0 and r.top1_agreement == 1
    assert all(row["relative_error"] == 0 and row["local_error"] == 0 for row in r.layer_errors)


def test_the_damaged_layer_has_the_largest_local_error(tiny_pair, tmp_path):
    base, q = tiny_pair
    import shutil

    damaged = shutil.copytree(q, tmp_path / "damaged")
    scale_layer(damaged, 2, 1.5)
    code, report = run_json(damaged, "--base", base, "--stream", "on", "--seq-len", "64", "--max-tokens", "512",
                            "--no-generate")
    errors = report["layer_errors"]
    assert max(errors, key=lambda row: row["local_error"])["index"] == 2
    # the error accumulated before the damaged layer is the intact model's; from it on it jumps
    assert errors[2]["relative_error"] > 2 * errors[1]["relative_error"]
    assert report["eval"]["mode"] == "streamed"


def test_the_report_shows_where_the_error_comes_from(tiny_pair, tmp_path):
    base, q = tiny_pair
    r = run(q, "--base", base, "--stream", "on", "--seq-len", "64", "--max-tokens", "512", "--report",
            tmp_path / "rep")
    assert r.exit_code == 0, r.output
    assert "streamed on cpu" in r.output
    assert "4-bit g32 sym gptq, 28 modules" in r.output, r.output  # the integrity line names the GPTQ settings
    assert "largest error added" in r.output
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Where the error comes from" in md
    assert "| 3 |" in md
    assert (tmp_path / "rep" / "verify.png").stat().st_size > 10_000
    assert "generations 0/5 identical" in r.output or "identical (greedy)" in r.output  # run in memory afterwards


@pytest.mark.parametrize("args, message", [
    (["--device", "cuda"], "--device cuda: torch sees no CUDA device here"),
    (["--stream", "on", "--loader", "transformers"], "--stream on reads the models through quantkit's own loader"),
])
def test_device_and_mode_refusals_are_one_line(tiny_pair, args, message):
    if torch.cuda.is_available() and "cuda" in args:
        pytest.skip("this machine has a GPU")
    base, q = tiny_pair
    r = run(q, "--base", base, *args, "--seq-len", "64", "--max-tokens", "512", "--no-generate")
    assert r.exit_code == 1
    assert len(error_lines(r)) == 1 and message in error_lines(r)[0]


PEAK = textwrap.dedent("""
    import json, sys
    from quantkit.verification.api import verify
    r = verify(sys.argv[1], sys.argv[2], stream="on", device="cpu", seq_len=128, max_tokens=1024, generate=False)
    status = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
    print(json.dumps({"peak_kb": int(status), "kl": r.kl_mean, "layers": len(r.layer_errors)}))
""")


@pytest.mark.slow
def test_streamed_peak_rss_is_flat_in_depth(tmp_path):
    shape = dict(hidden_size=1024, intermediate_size=2752, num_attention_heads=8, num_key_value_heads=8,
                 vocab_size=4096)
    peaks = {}
    for layers in (2, 8):
        base = tmp_path / f"base-{layers}"
        write_synthetic_checkpoint(base, shape_config("llama-2-7b", layers, **shape), torch.bfloat16)
        q = tmp_path / f"q-{layers}"
        quantize(str(base), QuantSpec(bits=4, group_size=128, method="rtn"), out=q)
        proc = subprocess.run([sys.executable, "-c", PEAK, str(q), str(base)], capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
        result = json.loads(proc.stdout.splitlines()[-1])
        assert result["layers"] == layers and result["kl"] > 0
        peaks[layers] = result["peak_kb"]
    assert peaks[8] <= 1.15 * peaks[2], f"streamed verify's peak RSS grew with depth: {peaks} (kB)"


@pytest.mark.slow
def test_streamed_and_in_memory_agree_on_smollm2(smollm2_dir, tmp_path):
    q = tmp_path / "rtn"
    quantize(str(smollm2_dir), QuantSpec(bits=4, group_size=64, method="rtn"), out=q)
    kwargs = dict(seq_len=256, max_tokens=1024, generate=False)
    whole = verify(str(q), str(smollm2_dir), stream="off", **kwargs)
    layered = verify(str(q), str(smollm2_dir), stream="on", **kwargs)
    for key in ("quantized_ppl", "base_ppl"):
        assert abs(getattr(layered, key) - getattr(whole, key)) <= 1e-4 * getattr(whole, key), key
    assert abs(layered.kl_mean - whole.kl_mean) <= 1e-4
    assert len(layered.layer_errors) == 30


def test_opt_with_projections_streams_like_the_whole_model(tiny_tokenizer, tmp_path):
    """OPT-350m's shape: embeddings narrower than the layers, projected in and out around them (a head of the
    embedding's width; project_out has no bias)."""
    base = make_tiny_model(tmp_path / "opt", tiny_tokenizer, model_type="opt", ffn_dim=128, word_embed_proj_dim=32)
    q = tmp_path / "q"
    quantize(str(base), QuantSpec(bits=4, group_size=32, method="rtn"), out=q)
    whole = verify(str(q), str(base), stream="off", **FAST)
    layered = verify(str(q), str(base), stream="on", **FAST)
    assert layered.quantized_ppl == pytest.approx(whole.quantized_ppl, rel=1e-5)
    assert layered.kl_mean == pytest.approx(whole.kl_mean, rel=1e-4, abs=1e-7)


def test_a_base_of_another_width_is_one_line(tiny_pair, tiny_tokenizer, tmp_path):
    _, q = tiny_pair
    wide = make_tiny_model(tmp_path / "wide", tiny_tokenizer, layers=4, hidden_size=128)
    r = run(q, "--base", wide, "--stream", "on", "--seq-len", "64", "--max-tokens", "512", "--no-generate")
    assert r.exit_code == 1
    assert error_lines(r) == ["Error: the quantized model's hidden_size is 64 and the base's 128: is --base the model "
                              "it was made from?"]


def test_a_gpu_host_keeps_whole_model_paths_on_the_cpu(monkeypatch):
    """--device auto picks the GPU for the layer-by-layer path only; whole models (--stream off, --max-memory,
    --loader transformers) stay on the CPU instead of being refused."""
    from quantkit.verification.modes import evaluation_device, streams

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert evaluation_device("auto", streams("auto", "auto", "quantkit", None)).type == "cuda"
    for stream, loader, budget in (("off", "quantkit", None), ("auto", "quantkit", 2**30), ("auto", "transformers", None)):
        assert not streams(stream, "auto", loader, budget)
        assert evaluation_device("auto", False).type == "cpu"
    with pytest.raises(QuantkitError, match="runs on the CPU"):
        streams("off", "cuda", "quantkit", None)
