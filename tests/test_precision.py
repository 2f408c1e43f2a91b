"""--compute-dtype: which dtype the calibration forwards run in, on which hardware."""
import pytest
import torch

from quantkit import precision
from quantkit.errors import QuantkitError
from quantkit.gptq import accumulate_hessian
from quantkit.precision import compute_dtype, fast_float32_matmuls, lists_bf16_instructions

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


def _matmul_setting() -> str:
    return torch.backends.mkldnn.matmul.fp32_precision


def test_fast_float32_matmuls_only_where_the_probe_finds_float32_accuracy(monkeypatch):
    before = _matmul_setting()
    monkeypatch.setattr(precision, "bf16_float32_matmuls_are_accurate", lambda: False)
    with fast_float32_matmuls(CPU):
        assert _matmul_setting() == before
    monkeypatch.setattr(precision, "bf16_float32_matmuls_are_accurate", lambda: True)
    with fast_float32_matmuls(GPU):
        assert _matmul_setting() == before
    with pytest.raises(RuntimeError), fast_float32_matmuls(CPU):
        assert _matmul_setting() == "bf16"
        raise RuntimeError("a failing layer")
    assert _matmul_setting() == before  # restored, also after an error


def test_the_probe_rejects_a_cpu_without_bf16_instructions(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert not precision.bf16_float32_matmuls_are_accurate.__wrapped__()


def test_the_probe_rejects_a_torch_without_the_setting_or_refusing_it(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(torch.backends.mkldnn, "matmul", None, raising=False)
    assert not precision.bf16_float32_matmuls_are_accurate.__wrapped__()
    monkeypatch.undo()
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)

    def refuse():
        raise RuntimeError("oneDNN: unsupported fpmath mode")
    monkeypatch.setattr(precision, "_float32_matmuls_via_bf16", refuse)
    assert not precision.bf16_float32_matmuls_are_accurate.__wrapped__()


@pytest.mark.parametrize("width", [16, 600])  # 600: the lower-triangle product's blocks
def test_hessians_under_fast_float32_matmuls_keep_float32_accuracy(width):
    """Where this CPU passes the probe, the calibration's matmuls run on bfloat16 instructions; the Hessians of
    float32 activations (which plain bfloat16 would round by about 1e-3) must still be float32-accurate."""
    X = torch.randn(4096, width, dtype=torch.float64)
    H, n = torch.zeros(width, width), 0
    with fast_float32_matmuls(CPU):
        for chunk in X.float().split(1024):
            H, n = accumulate_hessian(H, n, chunk)
    exact = 2 * X.T @ X / n
    scale = 2 * X.abs().T @ X.abs() / n
    assert ((H.double() - exact).abs() / scale).max() < precision.FLOAT32_ACCURACY
