"""The CUDA-only branches against their CPU twins. Skipped without a GPU (CI has none); run them where one is:
`./scripts/test tests/test_cuda.py` (with QUANTKIT_TORCH naming a CUDA build of torch)."""
import pytest
import torch

from quantkit.calibrate.transfer import move as _move
from quantkit.calibrate.transfer import wait_for_copies
from quantkit.config import CalibSpec, QuantSpec
from quantkit.run.pipeline import quantize
from quantkit.solve.gptq import gptq_quantize
from quantkit.solve.grid import _clip_search_sequential, group_qparams
from quantkit.solve.hessian import SUM_DTYPE, accumulate_hessian, add_gram, mean_of_sum
from quantkit.verification.dequantized import load_dequantized

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
    x = torch.randn(3, 512, 2560, device=GPU).bfloat16()  # wider than GRAM_ROWS: two blocks of rows
    H16, n16 = accumulate_hessian(torch.zeros(2560, 2560, device=GPU), 0, x)
    H32, n32 = accumulate_hessian(torch.zeros(2560, 2560, device=GPU), 0, x.float())
    assert n16 == n32 == 1536
    torch.testing.assert_close(H16, H32, rtol=1e-5, atol=1e-6)  # exact products; only the summation order differs


def test_exact_sums_on_the_gpu_give_the_same_bits_however_shared():
    xs = [torch.randn(n, 2560, device=GPU).bfloat16() for n in (512, 512, 300)]  # 16-bit products, two row blocks

    def mean(shares: list[list[torch.Tensor]]) -> torch.Tensor:
        total = torch.zeros(2560, 2560, device=GPU, dtype=SUM_DTYPE)
        for share in shares:
            S = torch.zeros_like(total)
            for x in share:
                add_gram(S, x)
            total += S
        return mean_of_sum(total, 1324)
    one = mean([xs])
    assert torch.equal(mean([xs[2:], xs[:2]]), one)
    H, _ = accumulate_hessian(torch.zeros(2560, 2560, device=GPU), 0, torch.cat(xs).float())
    torch.testing.assert_close(one, H, rtol=1e-5, atol=1e-6)


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
    stage_peaks = on_gpu.layers[0]["stage_peak_gpu_mb"]
    assert set(stage_peaks) == {"load", "hessians", "solve", "propagate"}
    assert 0 < max(stage_peaks.values()) <= on_gpu.peak_gpu_mb
    ids = torch.arange(1, 33).unsqueeze(0)
    with torch.no_grad():
        top_gpu = load_dequantized(on_gpu.path)(input_ids=ids).logits.argmax(-1)
        top_cpu = load_dequantized(on_cpu.path)(input_ids=ids).logits.argmax(-1)
    assert (top_gpu == top_cpu).float().mean() > 0.9


def test_gptaq_on_cuda_agrees_with_the_cpu_run(tiny_llama_dir, tmp_path):
    """--gptaq on a GPU: the unquantized copy, its activations (saved in the background) and the cross term."""
    spec, calib = QuantSpec(bits=4, group_size=32, gptaq=True), CalibSpec(samples=8, seq_len=32)
    on_gpu = quantize(str(tiny_llama_dir), spec, calib, out=tmp_path / "gpu", device="cuda")
    on_cpu = quantize(str(tiny_llama_dir), spec, calib, out=tmp_path / "cpu", device="cpu")
    ids = torch.arange(1, 33).unsqueeze(0)
    with torch.no_grad():
        top_gpu = load_dequantized(on_gpu.path)(input_ids=ids).logits.argmax(-1)
        top_cpu = load_dequantized(on_cpu.path)(input_ids=ids).logits.argmax(-1)
    assert (top_gpu == top_cpu).float().mean() > 0.9


def test_graphed_sweeps_give_the_eager_bits_on_the_gpu(monkeypatch):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(384, 1000, generator=g)  # 7 full blocks of 128 columns and a partial one
    X = torch.randn(4096, 1000, generator=g)
    H = (2 * X.T @ X / X.shape[0]).to(GPU)
    spec = QuantSpec(bits=4, group_size=64, clip_search=True)
    graphed = gptq_quantize(W.to(GPU), H, spec)
    monkeypatch.setenv("QUANTKIT_CUDA_GRAPHS", "0")
    eager = gptq_quantize(W.to(GPU), H, spec)
    for field in ("codes", "scales", "zeros", "g_idx", "weight"):
        assert torch.equal(getattr(graphed, field), getattr(eager, field)), field
    assert graphed.loss == eager.loss


def test_a_solve_needs_no_second_hessian_of_gpu_memory():
    """The permutation, the factorization and the inverse run in the Hessian's own memory and the codes are
    bytes: beyond its inputs a solve needs the float32 weight, its codes and small temporaries."""
    k = 4096
    weight = torch.randn(2048, k, device=GPU, dtype=torch.bfloat16)
    x = torch.randn(8192, k, device=GPU)
    hessian = 2 * x.T @ x / x.shape[0]
    del x
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    gptq_quantize(weight, hessian, QuantSpec(bits=4, group_size=64), consume_hessian=True)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    weight_and_codes = weight.numel() * (4 + 1)
    assert extra <= weight_and_codes + 0.5 * hessian.numel() * 4, extra / 2**20


def test_a_stages_packed_tensors_reach_the_host_pinned_and_equal_to_the_cpus(tiny_llama_dir):
    """The packed tensors are copied to pinned host memory without a wait per tensor; the stage waits once."""
    from quantkit.calibrate.statistics import Statistics
    from quantkit.run.ranks import Ranks
    from quantkit.run.solves import solve_stage

    spec = QuantSpec(bits=4, group_size=32)
    W = torch.randn(64, 64)
    X = torch.randn(512, 64)
    H = 2 * X.T @ X / X.shape[0]
    results = {}
    for device in (torch.device("cpu"), GPU):
        modules = {"q": torch.nn.Linear(64, 64, bias=False).to(device)}
        modules["q"].weight.data.copy_(W)
        results[device.type] = solve_stage(Ranks.single(), "layer", [["q"]], [Statistics(H.to(device), None, 512)],
                                           modules, spec, "gptq", lambda n: n)["q"].tensors
    assert all(t.is_pinned() for t in results["cuda"].values())
    same = (results["cuda"]["q.qweight"] == results["cpu"]["q.qweight"]).float().mean().item()
    assert same > 0.95
