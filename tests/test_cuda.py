"""The CUDA-only branches against their CPU twins. Skipped without a GPU (CI has none); run them where one is:
`./scripts/test tests/test_cuda.py` (with QUANTKIT_TORCH naming a CUDA build of torch). Written on 2026-11-26
after that session's GPU time was spent: their first run on a GPU is still to come."""
import pytest
import torch

from quantkit.capture import _move, wait_for_copies
from quantkit.config import CalibSpec, QuantSpec
from quantkit.dequantized import load_dequantized
from quantkit.gptq import accumulate_hessian, gptq_quantize
from quantkit.pipeline import quantize
from quantkit.quant import _clip_search_sequential, group_qparams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU = torch.device("cuda")


def test_copies_to_the_host_are_pinned_and_exact():
    x = torch.randn(64, 96, device=GPU, dtype=torch.bfloat16)
    host = _move(x, torch.device("cpu"), torch.bfloat16)
    wait_for_copies(GPU)
    assert host.is_pinned() and torch.equal(host, x.cpu())
    back = _move(host, GPU, torch.float32)
    assert back.is_cuda and torch.equal(back, x.float())


def test_16_bit_hessian_products_equal_the_float32_ones():
    x = torch.randn(3, 512, 256, device=GPU).bfloat16()
    H16, n16 = accumulate_hessian(torch.zeros(256, 256, device=GPU), 0, x)
    H32, n32 = accumulate_hessian(torch.zeros(256, 256, device=GPU), 0, x.float())
    assert n16 == n32 == 1536
    torch.testing.assert_close(H16, H32, rtol=1e-5, atol=1e-6)  # exact products; only the summation order differs


def test_batched_clip_search_on_the_gpu_picks_the_cpus_factors():
    w = torch.randn(300, 64)
    w[:, :2] *= 25
    xmin, xmax = w.min(dim=1).values.clamp(max=0), w.max(dim=1).values.clamp(min=0)
    cpu = _clip_search_sequential(w, xmin, xmax, 4, True)
    gpu = group_qparams(w.to(GPU), 4, True, clip_search=True)
    assert torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])


def test_the_solver_on_the_gpu_agrees_with_the_cpu():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(256, 512, generator=g)
    X = torch.randn(2048, 512, generator=g)
    H = 2 * X.T @ X / X.shape[0]
    spec = QuantSpec(bits=4, group_size=64)
    cpu, gpu = gptq_quantize(W, H, spec), gptq_quantize(W.to(GPU), H.to(GPU), spec)
    same = (gpu.codes.cpu() == cpu.codes).float().mean().item()
    assert same > 0.99, same  # float32 on both; the libraries round differently in the last bits
    assert gpu.loss == pytest.approx(cpu.loss, rel=1e-2)


def test_quantize_on_cuda_writes_what_the_cpu_run_writes(tiny_llama_dir, tmp_path):
    spec, calib = QuantSpec(bits=4, group_size=32), CalibSpec(samples=8, seq_len=32)
    on_gpu = quantize(str(tiny_llama_dir), spec, calib, out=tmp_path / "gpu", device="cuda")
    on_cpu = quantize(str(tiny_llama_dir), spec, calib, out=tmp_path / "cpu", device="cpu")
    assert on_gpu.device.startswith("cuda") and on_gpu.peak_gpu_mb > 0
    assert set(on_gpu.layers[0]["stage_seconds"]) == {"load", "hessians", "solve", "propagate"}
    ids = torch.arange(1, 33).unsqueeze(0)
    with torch.no_grad():
        top_gpu = load_dequantized(on_gpu.path)(input_ids=ids).logits.argmax(-1)
        top_cpu = load_dequantized(on_cpu.path)(input_ids=ids).logits.argmax(-1)
    assert (top_gpu == top_cpu).float().mean() > 0.9
