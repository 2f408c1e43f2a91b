"""Exact sums (--exact-sums): Hessians and GPTAQ's cross terms summed in float64 from each mini-batch's float32
product, the same bits however the mini-batches are shared and in whatever order the shares are added; the windows
shared among processes in whole mini-batches; and what the setting costs, as the estimate and the expert chunks
size it. Two torchrun processes against one: tests/test_distributed.py."""
import pytest
import torch

from quantkit.config import InvalidSetting, QuantSpec
from quantkit.memory.expert_chunks import expert_chunk
from quantkit.run.ranks import Ranks, batch_share
from quantkit.solve.hessian import (
    SUM_DTYPE,
    accumulate_cross,
    accumulate_hessian,
    add_cross,
    add_gram,
    hessian_itemsize,
    mean_of_sum,
)
from quantkit.tools.estimate import estimate


def batches(width: int, sizes: list[int], seed: int = 0) -> list[torch.Tensor]:
    """Mini-batches of inputs whose channels span four orders of magnitude, as a layer's activations do."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-2, 2, width)
    return [torch.randn(n, width, generator=g) * scale for n in sizes]


def exact_hessian(shares: list[list[torch.Tensor]]) -> torch.Tensor:
    """Each share summed on its own (as one process would), the shares' sums added in reverse order, the mean."""
    width = shares[0][0].shape[-1]
    sums = []
    for share in shares:
        S = torch.zeros(width, width, dtype=SUM_DTYPE)
        tokens = sum(add_gram(S, x) for x in share)
        sums.append((S, tokens))
    total = torch.zeros(width, width, dtype=SUM_DTYPE)
    for S, _ in reversed(sums):
        total += S
    return mean_of_sum(total, sum(t for _, t in sums))


@pytest.mark.parametrize("width", [48, 600])  # 600: several row blocks of the lower-triangle product
def test_exact_sums_give_the_same_bits_however_the_batches_are_shared(width):
    xs = batches(width, [64, 64, 64, 40, 64, 17])
    one = exact_hessian([xs])
    assert one.dtype == torch.float32
    for shares in ([xs[:3], xs[3:]], [xs[:1], xs[1:4], xs[4:]], [[x] for x in xs]):
        assert torch.equal(exact_hessian(shares), one)
    X = torch.cat(xs).double()
    exact = 2 * X.T @ X / X.shape[0]
    scale = exact.diagonal().sqrt()
    scale = scale[:, None] * scale[None, :]  # what an entry's float32 rounding is relative to (Cauchy-Schwarz)
    assert ((one.double() - exact).abs() / scale).max() < 1e-6
    # the running mean of the default sums is the same Hessian, to float32's rounding
    H, n = torch.zeros(width, width), 0
    for x in xs:
        H, n = accumulate_hessian(H, n, x)
    assert ((H.double() - exact).abs() / scale).max() < 1e-6


def test_an_exact_sum_is_symmetric_off_its_diagonal_blocks_and_counts_its_tokens():
    S = torch.zeros(600, 600, dtype=SUM_DTYPE)
    assert add_gram(S, batches(600, [30])[0].reshape(3, 10, 600)) == 30  # [batch, seq, in] as a Linear sees it
    lower = torch.tril(S, diagonal=-256)  # entries below the first block's diagonal block
    assert lower.abs().sum() > 0 and torch.equal(lower, torch.triu(S, diagonal=256).T)


def test_exact_cross_terms_give_the_same_bits_however_shared():
    xs, drift = batches(96, [32, 32, 20]), batches(96, [32, 32, 20], seed=1)
    refs = [x + 0.01 * d for x, d in zip(xs, drift)]

    def cross(shares: list[list[int]]) -> torch.Tensor:
        total = torch.zeros(96, 96, dtype=SUM_DTYPE)
        for share in shares:
            S = torch.zeros(96, 96, dtype=SUM_DTYPE)
            for i in share:
                add_cross(S, refs[i], xs[i])
            total += S
        return mean_of_sum(total, 84)
    one = cross([[0, 1, 2]])
    assert torch.equal(cross([[2], [0, 1]]), one)
    C, n = torch.zeros(96, 96), 0
    for ref, x in zip(refs, xs):
        accumulate_cross(C, n, ref, x)
        n += x.shape[0]
    assert (C - one).abs().max() < 1e-6 * one.abs().max()


def test_one_process_makes_an_exact_sum_its_mean_and_leaves_a_running_mean_alone():
    x = batches(32, [20])[0]
    S = torch.zeros(32, 32, dtype=SUM_DTYPE)
    add_gram(S, x)
    expected = mean_of_sum(S.clone(), 20)
    got = Ranks.single().mean_to("test", 0, S, 20, 20)
    assert got is not None and got.dtype == torch.float32 and torch.equal(got, expected)
    H, _ = accumulate_hessian(torch.zeros(32, 32), 0, x)
    assert Ranks.single().mean_to("test", 0, H, 20, 20) is H


@pytest.mark.parametrize("samples,per_batch,world", [(40, 16, 2), (48, 16, 3), (33, 16, 2), (64, 16, 3), (5, 1, 4)])
def test_batch_shares_are_whole_mini_batches_covering_every_window_once(samples, per_batch, world):
    shares = [batch_share(samples, per_batch, r, world) for r in range(world)]
    assert [i for s in shares for i in range(samples)[s]] == list(range(samples))
    assert all(s.start % per_batch == 0 for s in shares)
    counts = [-(-(s.stop - s.start) // per_batch) for s in shares]
    assert max(counts) - min(counts) <= 1 and min(counts) >= 1


def test_exact_sums_cost_twice_the_hessians_bytes():
    assert (hessian_itemsize(False), hessian_itemsize(True)) == (4, 8)
    assert expert_chunk(128, 4096, hessian_itemsize(True)) == expert_chunk(128, 4096, hessian_itemsize(False)) // 2
    default = estimate("llama-2-7b", samples=128, seq_len=2048, device="cuda")
    exact = estimate("llama-2-7b", samples=128, seq_len=2048, device="cuda", exact_sums=True)
    assert exact.to_dict()["calibration"]["exact_sums"] is True
    layer, exact_layer = default.modes[0].parts["layer"], exact.modes[0].parts["layer"]
    assert exact_layer["hessians"] == 2 * layer["hessians"] == 2 * 11008**2 * 4  # down_proj's, the largest
    assert exact.modes[0].gpu_allocated > default.modes[0].gpu_allocated


def test_exact_sums_apply_to_gptq_only():
    with pytest.raises(InvalidSetting, match="exact sums .* --method gptq only"):
        QuantSpec(method="rtn", exact_sums=True)
    assert QuantSpec(exact_sums=True).to_dict()["exact_sums"] is True
