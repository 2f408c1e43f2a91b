"""--compute-dtype: which dtype the calibration forwards run in, on which hardware."""
import pytest
import torch

from quantkit.calibrate import precision
from quantkit.calibrate.precision import (
    compute_dtype,
    fast_float32_matmuls,
    lists_bf16_instructions,
)
from quantkit.errors import QuantkitError
from quantkit.solve.hessian import accumulate_hessian

CPU, GPU = torch.device("cpu"), torch.device("cuda")
ZEN4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\nbugs\t\t: sysret_ss_attrs\n"
ZEN2 = "processor\t: 0\nflags\t\t: fpu avx2 fma bmi2\n"


def test_bf16_instructions_are_read_from_the_flags_line():
    assert lists_bf16_instructions(ZEN4)
    assert lists_bf16_instructions("flags\t: sse avx512f amx_bf16 amx_tile\n")
    assert not lists_bf16_instructions(ZEN2)
    assert not lists_bf16_instructions("model name\t: avx512_bf16 in a name, not a flag\n")
    assert not lists_bf16_instructions("")


@pytest.mark.parametrize("native,model,expected", [
    (True, torch.bfloat16, torch.bfloat16),   # the model's own dtype, at about 5x float32's rate
    (False, torch.bfloat16, torch.float32),   # emulated bfloat16 is slower than float32
    (True, torch.float32, torch.float32),     # a float32 model is calibrated in float32
    (True, torch.float16, torch.float32),     # float16 has no fast CPU path
])
def test_auto_on_a_cpu_takes_bfloat16_only_where_it_is_native(native, model, expected, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert compute_dtype("auto", model, CPU) == expected


@pytest.mark.parametrize("model,expected", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                            (torch.float32, torch.float32)])
def test_auto_on_a_gpu_takes_the_models_dtype(model, expected):
    assert compute_dtype("auto", model, GPU) == expected


def test_a_named_dtype_is_used_as_asked():
    assert compute_dtype("float32", torch.bfloat16, GPU) == torch.float32
    assert compute_dtype("bfloat16", torch.float32, CPU) == torch.bfloat16


def test_an_unknown_dtype_is_one_clear_error():
    with pytest.raises(QuantkitError, match="unknown compute dtype 'int8'; use one of auto, float32, bfloat16"):
        compute_dtype("int8", torch.float32, CPU)


HAS_SETTING = hasattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision")
needs_setting = pytest.mark.skipif(not HAS_SETTING, reason="torch < 2.9 has no mkldnn.matmul.fp32_precision")


def _matmul_setting() -> str:
    return torch.backends.mkldnn.matmul.fp32_precision


@needs_setting
def test_fast_float32_matmuls_only_where_the_probe_finds_float32_accuracy(monkeypatch):
    before = _matmul_setting()
    monkeypatch.setattr(precision, "onednn_float32_matmuls_are_accurate", lambda: False)
    with fast_float32_matmuls(CPU):
        assert _matmul_setting() == before
    monkeypatch.setattr(precision, "onednn_float32_matmuls_are_accurate", lambda: True)
    with fast_float32_matmuls(GPU):
        assert _matmul_setting() == before
    with pytest.raises(RuntimeError), fast_float32_matmuls(CPU):
        assert _matmul_setting() == "bf16"
        raise RuntimeError("a failing layer")
    assert _matmul_setting() == before  # restored, also after an error


@needs_setting
def test_overlapping_blocks_restore_the_original_setting_when_the_last_ends(monkeypatch):
    before = _matmul_setting()
    monkeypatch.setattr(precision, "onednn_float32_matmuls_are_accurate", lambda: True)
    first, second = fast_float32_matmuls(CPU), fast_float32_matmuls(CPU)
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # ended out of order, as two threads may
    assert _matmul_setting() == "bf16"
    second.__exit__(None, None, None)
    assert _matmul_setting() == before


def test_the_probe_rejects_a_path_that_rounds_to_bfloat16(monkeypatch):
    """What oneDNN does with the permission on a CPU with AMX: a result as from bfloat16 inputs."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(precision, "_onednn_product", lambda a, b: (a.bfloat16() @ b.bfloat16()).float())
    assert HAS_SETTING is False or not precision.onednn_float32_matmuls_are_accurate.__wrapped__()
    monkeypatch.setattr(precision, "_onednn_product", lambda a, b: a @ b)
    assert precision.onednn_float32_matmuls_are_accurate.__wrapped__() == HAS_SETTING


def test_the_probe_rejects_a_cpu_without_bf16_instructions(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert not precision.onednn_float32_matmuls_are_accurate.__wrapped__()


def test_the_probe_rejects_a_torch_without_the_setting_or_refusing_it(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(torch.backends.mkldnn, "matmul", None, raising=False)
    assert not precision.onednn_float32_matmuls_are_accurate.__wrapped__()
    monkeypatch.undo()
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)

    def refuse():
        raise RuntimeError("oneDNN: unsupported fpmath mode")
    monkeypatch.setattr(precision, "_onednn_product", lambda a, b: refuse())
    assert not precision.onednn_float32_matmuls_are_accurate.__wrapped__()


@pytest.mark.skipif(not precision.onednn_float32_matmuls_are_accurate(), reason="float32 matmuls stay on torch's "
                    "default path on this machine (no bfloat16 instructions, or the probe says no)")
@pytest.mark.parametrize("width", [16, 600])  # 600: the lower-triangle product's blocks
def test_hessians_under_fast_float32_matmuls_keep_float32_accuracy(width):
    """Where this CPU passes the probe, the calibration's matmuls run on bfloat16 instructions; the Hessians of
    float32 activations (which plain bfloat16 would round by about 1e-3) must still be float32-accurate."""
    X = torch.randn(4096, width, dtype=torch.float64)
    H, n = torch.zeros(width, width), 0
    with fast_float32_matmuls(CPU):
        assert _matmul_setting() == "bf16"
        for chunk in X.float().split(1024):
            H, n = accumulate_hessian(H, n, chunk)
    assert precision.matmul_errors(H, 2 * X.T / n, X).max() < precision.FLOAT32_ACCURACY


def test_a_bfloat16_model_on_a_cpu_with_bf16_instructions_calibrates_in_bfloat16(tiny_tokenizer, tmp_path,
                                                                                  monkeypatch):
    """--compute-dtype auto through the CLI, on any CPU (the instructions are only patched in); recorded in the JSON
    result and in the manifest beside the float32 matmul path."""
    import json

    from click.testing import CliRunner
    from conftest import make_tiny_model
    from transformers import AutoModelForCausalLM

    from quantkit.cli.app import cli

    model_dir = make_tiny_model(tmp_path / "bf16", tiny_tokenizer)
    AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).save_pretrained(model_dir)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    args = ["quantize", str(model_dir), "--out", str(tmp_path / "q"), "--group-size", "32", "--samples", "4",
            "--seq-len", "32", "--json"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["compute_dtype"] == "bfloat16"
    manifest = json.loads((tmp_path / "q" / "quantkit.json").read_text())
    assert manifest["compute"]["dtype"] == "bfloat16" and manifest["compute"]["device"] == "cpu"
    assert manifest["compute"]["float32_matmuls"] in ("onednn", "default")
