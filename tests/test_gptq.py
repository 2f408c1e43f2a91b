import dataclasses
import math

import pytest
import torch
from conftest import peak_rss_growth
from safetensors.torch import save_file

from quantkit.config import QuantSpec
from quantkit.errors import NumericalError
from quantkit.solve.gptq import gptq_quantize, gptq_quantize_batched, gptq_quantize_shared
from quantkit.solve.grid import (
    _clip_search_batched,
    dequantize_grouped,
    group_qparams,
    rtn_quantize,
)
from quantkit.solve.hessian import accumulate_hessian
from quantkit.write.gptq_format import dequantize_module, module_tensors


def _correlated(n_out=64, n_in=128, tokens=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n_out, n_in, generator=g)
    X = torch.randn(tokens, n_in, generator=g) @ torch.randn(n_in, n_in, generator=g)
    return W, X, 2 * X.T @ X / X.shape[0]


@pytest.mark.parametrize("spec", [
    QuantSpec(bits=4, group_size=32),
    QuantSpec(bits=4, group_size=32, act_order=True, clip_search=True),
    QuantSpec(bits=3, group_size=-1, sym=False, act_order=True),
    QuantSpec(bits=8, group_size=64, sym=False),
], ids=["g32", "act-order+clip", "3bit-asym-per-channel", "8bit-g64"])
@pytest.mark.parametrize("n_in", [200, 130])  # a partial last block of 72 columns, and of 2
def test_a_batch_of_solves_gives_each_solve_its_own_bits(spec, n_in):
    """Experts solved together (one column sweep for the batch) get what each solved alone gets, bit for bit: codes,
    grids, g_idx, dequantized weights, losses and damping. Two Linears per solve (gate/up share a Hessian), a
    partial last block, and one solve whose Hessian needs more damping than asked."""
    solves = []
    for seed in range(3):
        W, X, H = _correlated(44, n_in, 3 * n_in, seed=seed)  # 44 rows: no multiple of a vector width
        if seed == 1:
            X[:, 7] = X[:, 8]  # two identical inputs: H is singular, so its damping is raised
            H = 2 * X.T @ X / X.shape[0]
        solves.append(([W[:24], W[24:]], H))
    spec = dataclasses.replace(spec, damp=1e-9)
    alone = [gptq_quantize_shared(ws, H.clone(), spec) for ws, H in solves]
    hessians = [H.clone() for _, H in solves]
    together = gptq_quantize_batched([ws for ws, _ in solves], hessians, spec)
    assert hessians == []  # consumed
    assert len({r[0].damp for r in alone}) == 2  # the singular one was damped more
    for one, batched in zip(alone, together):
        for a, b in zip(one, batched):
            for field in ("codes", "scales", "zeros", "g_idx", "weight"):
                assert torch.equal(getattr(a, field), getattr(b, field)), field
            assert (a.loss, a.damp) == (b.loss, b.damp)


class _HostWaits(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that make a GPU's host wait: a tensor read as a Python number, and indexing by a boolean mask
    (the host needs the mask's count of True entries to size the result)."""

    def __init__(self):
        super().__init__()
        self.waits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        operands = torch.utils._pytree.tree_flatten((args, kwargs))[0]
        if name in ("_local_scalar_dense", "nonzero") or (name.startswith("index") and any(
                isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in operands)):
            self.waits.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, group_size=64),
                                  QuantSpec(bits=4, group_size=64, act_order=True, clip_search=True, sym=False),
                                  QuantSpec(bits=4, group_size=64, static_groups=True)])
def test_a_solve_waits_for_its_device_twice_whatever_its_size(spec):
    """Only the Hessian's finiteness and the factorization's success are read back to decide anything (the losses
    come back with the results, in one copy): no wait per block or column, nor for always-zero inputs."""
    W, X, _ = _correlated(64, 256, 1024)
    X[:, 3] = 0  # an input that is always zero
    H = 2 * X.T @ X / X.shape[0]
    with _HostWaits() as alone:
        gptq_quantize_shared([W[:32], W[32:]], H.clone(), spec)
    assert alone.waits == ["_local_scalar_dense"] * 2


def test_a_failing_solve_of_a_batch_is_named_by_its_index():
    W, _, H = _correlated(16, 64, 256)
    bad = H.clone()
    bad[3, 3] = float("nan")
    with pytest.raises(NumericalError, match="NaN/Inf") as e:
        gptq_quantize_batched([[W], [W], [W]], [H.clone(), bad, H.clone()], QuantSpec(bits=4, group_size=32))
    assert e.value.solve == 1


@pytest.mark.parametrize("width", [16, 600])  # 600: wider than a block of the lower-triangle product, not a multiple
def test_accumulate_hessian_equals_batch_formula(width):
    X = torch.randn(300, width)
    H, n = torch.zeros(width, width), 0
    for chunk in X.split(70):
        H, n = accumulate_hessian(H, n, chunk.reshape(2, -1, width) if chunk.shape[0] % 2 == 0 else chunk)
    assert n == 300
    torch.testing.assert_close(H, 2 * X.T @ X / 300, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(H, H.T)


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, group_size=32, act_order=False),
                                  QuantSpec(bits=3, group_size=64, sym=False, act_order=False),
                                  QuantSpec(bits=4, group_size=-1, act_order=True),
                                  QuantSpec(bits=2, group_size=32, act_order=True, static_groups=True)],
                         ids=["4b-g32", "3b-g64-asym", "4b-row-actorder", "2b-g32-static"])
def test_gptq_beats_rtn_and_leaves_inputs_alone(spec):
    W, X, H = _correlated()
    W0, H0 = W.clone(), H.clone()
    res = gptq_quantize(W, H, spec)
    assert torch.equal(W, W0) and torch.equal(H, H0)
    codes, scales, zeros = rtn_quantize(W, spec.bits, spec.group_size, spec.sym)
    g_idx = torch.arange(W.shape[1]) // spec.effective_group_size(W.shape[1])
    rtn = dequantize_grouped(codes, scales, zeros, g_idx)
    out_err = lambda Wq: (X @ (W - Wq).T).pow(2).mean().item()  # noqa: E731
    assert out_err(res.weight) < 0.8 * out_err(rtn)
    assert res.codes.shape == W.shape and int(res.codes.min()) >= 0 and int(res.codes.max()) <= spec.maxq
    assert res.loss > 0 and math.isfinite(res.loss)


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, group_size=32, act_order=True),
                                  QuantSpec(bits=3, group_size=64, sym=False, act_order=True, static_groups=True)],
                         ids=["4b-g32-actorder", "3b-g64-asym-static"])
def test_a_shared_solve_gives_each_linear_its_own_result(spec, tmp_path):
    """q/k/v (or gate/up) solved as one stack of rows equal three separate solves against the same Hessian."""
    W, X, H = _correlated(n_out=128, n_in=128)
    parts = [W[:64], W[64:96], W[96:]]  # q, k, v of different heights (3-bit packing needs multiples of 32)
    shared = gptq_quantize_shared(parts, H, spec)
    for part, got in zip(parts, shared):
        alone = gptq_quantize(part, H, spec)
        assert torch.equal(got.codes, alone.codes) and torch.equal(got.zeros, alone.zeros)
        assert torch.equal(got.g_idx, alone.g_idx) and got.damp == alone.damp
        torch.testing.assert_close(got.scales, alone.scales, rtol=0, atol=0)
        torch.testing.assert_close(got.weight, alone.weight, rtol=0, atol=0)
        assert got.loss == pytest.approx(alone.loss, rel=1e-5)
    # the pipeline writes them side by side; safetensors refuses tensors that share storage
    tensors = {k: v for n, r in zip("qkv", shared) for k, v in module_tensors(n, r, spec.bits, "gptq").items()}
    save_file(tensors, str(tmp_path / "shared.safetensors"))


@pytest.mark.parametrize("bits,sym", [(4, True), (3, False), (8, True), (2, False)])
def test_the_gpus_batched_clip_search_picks_what_the_sequential_one_picks(bits, sym):
    """On a GPU all shrink factors are tried at once; the choice (ties included) must be the CPU loop's."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(257, 64, generator=g)
    w[:, :2] *= 25  # outliers, so that shrinking wins for many rows
    w[3] = 0        # an empty row
    w[4] = 0.5      # a constant row: every factor ties
    xmin, xmax = w.min(dim=1).values.clamp(max=0), w.max(dim=1).values.clamp(min=0)
    sequential = group_qparams(w, bits, sym, clip_search=True)
    batched = _clip_search_batched(w, xmin, xmax, bits, sym)
    assert torch.equal(sequential[0], batched[0]) and torch.equal(sequential[1], batched[1])
    assert not torch.equal(sequential[0], group_qparams(w, bits, sym, clip_search=False)[0])  # the search did shrink


def test_partial_last_group_has_its_own_scale():
    W, X, H = _correlated(n_out=16, n_in=96)
    res = gptq_quantize(W, H, QuantSpec(bits=4, group_size=64, act_order=False))  # 64 + a ragged group of 32
    assert res.scales.shape == (16, 2)
    assert torch.equal(res.g_idx, (torch.arange(96) // 64).to(torch.int32))


def test_act_order_g_idx_is_a_permuted_grouping():
    W, X, H = _correlated(n_out=8, n_in=64)
    res = gptq_quantize(W, H, QuantSpec(bits=4, group_size=16, act_order=True))
    assert sorted(torch.bincount(res.g_idx.long()).tolist()) == [16, 16, 16, 16]
    assert not torch.equal(res.g_idx, (torch.arange(64) // 16).to(torch.int32))


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, group_size=32), QuantSpec(bits=8, group_size=-1),
                                  QuantSpec(bits=4, group_size=48, sym=False),
                                  QuantSpec(bits=3, group_size=32, act_order=True)])
def test_written_tensors_reproduce_the_solver_exactly(spec):
    W, X, H = _correlated(n_out=64, n_in=96)
    res = gptq_quantize(W, H, spec)
    fmt = "gptq" if spec.sym else "gptq_v2"
    t = module_tensors("m", res, spec.bits, fmt)
    got = dequantize_module(t["m.qweight"], t["m.qzeros"], t["m.scales"], t["m.g_idx"], spec.bits, fmt)
    assert torch.equal(got, res.weight)


def test_dead_input_channels_quantize_to_zero():
    W, X, H = _correlated(n_out=8, n_in=64)
    H[5, :] = 0
    H[:, 5] = 0
    res = gptq_quantize(W, H, QuantSpec(bits=4, group_size=32))
    assert torch.all(res.weight[:, 5] == 0)


def test_act_order_beats_plain_order_on_uneven_inputs():
    W, X, H = _correlated()
    X = X * torch.linspace(0.1, 3.0, X.shape[1])  # input channels of very different energy
    H = 2 * X.T @ X / X.shape[0]
    err = lambda Wq: (X @ (W - Wq).T).pow(2).mean().item()  # noqa: E731
    plain = gptq_quantize(W, H, QuantSpec(bits=3, group_size=-1, act_order=False))
    ordered = gptq_quantize(W, H, QuantSpec(bits=3, group_size=-1, act_order=True))
    assert err(ordered.weight) < err(plain.weight)


def test_singular_hessian_retries_with_more_damping():
    W = torch.randn(8, 32)
    H = torch.ones(32, 32) - 0.05 * torch.eye(32)  # eigenvalues -0.05 (x31) and 31.95: indefinite
    res = gptq_quantize(W, H, QuantSpec(bits=4, group_size=32, damp=0.01))
    assert res.damp == pytest.approx(0.1)
    assert torch.isfinite(res.weight).all()


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("indefinite", [False, True], ids=["pd", "needs-more-damping"])
def test_a_consumed_hessian_gives_the_same_result(act_order, indefinite):
    """The pipeline lets the solve reuse the Hessian's memory (one [K, K] less at 485 MB for an 11008-wide one):
    the result is the copying solve's, bit for bit, also when damping has to be raised; a dead input still works."""
    W, X, H = _correlated()
    H[7, :] = H[:, 7] = 0  # an input that is always zero
    if indefinite:  # lowest eigenvalue (the dead input's aside) -0.05 x the mean diagonal: damp 0.01 is too little
        live = torch.arange(H.shape[0]) != 7
        lowest = torch.linalg.eigvalsh(H[live][:, live])[0]
        H.diagonal()[live] -= lowest + 0.05 * H.diagonal().mean()
    spec = QuantSpec(bits=4, group_size=32, act_order=act_order, damp=0.01)
    copied = gptq_quantize(W, H, spec)
    consumed = gptq_quantize(W, H.clone(), spec, consume_hessian=True)
    assert (copied.damp > spec.damp) == indefinite and consumed.damp == copied.damp
    for field in ("codes", "scales", "zeros", "g_idx", "weight"):
        assert torch.equal(getattr(consumed, field), getattr(copied, field)), field
    assert consumed.loss == copied.loss and torch.all(copied.weight[:, 7] == 0)


@pytest.mark.parametrize("bits,sym", [(4, True), (3, False), (8, True), (2, False)])
def test_the_searchs_rounding_error_is_the_formats_dequantization_error(bits, sym):
    """The search rounds in one reused buffer (clamping round(w / scale) instead of forming codes): its error
    must be the one the files' dequantization gives, bit for bit, clipped weights included."""
    from quantkit.solve.grid import (
        CLIP_NORM,
        _range_qparams,
        _rounding_error,
        dequantize_codes,
        quantize_codes,
    )

    g = torch.Generator().manual_seed(bits)
    w = torch.randn(300, 64, generator=g)
    w[:, :2] *= 25
    w[5] = 0
    xmin, xmax = w.min(dim=1).values.clamp(max=0), w.max(dim=1).values.clamp(min=0)
    scale, zero = _range_qparams(xmin * 0.83, xmax * 0.83, bits, sym)  # shrunk: the outliers clip
    format_error = (dequantize_codes(quantize_codes(w, scale, zero, bits), scale[:, None], zero[:, None]) - w)
    expected = format_error.abs().pow(CLIP_NORM).sum(dim=1)
    assert torch.equal(_rounding_error(w, scale, zero, bits, sym), expected)
    assert torch.equal(_rounding_error(w, scale, zero, bits, sym, buffer=torch.empty_like(w)), expected)


@pytest.mark.parametrize("sym", [True, False])
def test_clip_search_never_rounds_worse_and_clips_outliers(sym):
    from quantkit.solve.grid import (
        CLIP_NORM,
        dequantize_codes,
        group_qparams,
        quantize_codes,
    )

    torch.manual_seed(0)
    w = torch.randn(64, 128)
    w[:8, 0] = 12.0  # one outlier in each of 8 rows

    def error(scale, zero):
        q = dequantize_codes(quantize_codes(w, scale, zero, 4), scale[:, None], zero[:, None])
        return (q - w).abs().pow(CLIP_NORM).sum(dim=1)

    plain, clipped = group_qparams(w, 4, sym), group_qparams(w, 4, sym, clip_search=True)
    assert (error(*clipped) <= error(*plain)).all()
    assert (clipped[0] <= plain[0]).all() and (clipped[0] < plain[0]).any()
    assert torch.equal(clipped[0], clipped[0].half().float())  # still exactly representable on disk


class _FakeGraph:
    """torch.cuda.CUDAGraph on a CPU: capturing records the sweep instead of running it (as a real capture runs
    nothing), and replay runs what was recorded on the buffers' contents at that moment."""
    capturing = None

    def __init__(self):
        self.recorded, self.replays = [], 0

    def capture_begin(self, capture_error_mode="global"):
        assert capture_error_mode == "thread_local"
        _FakeGraph.capturing = self

    def capture_end(self):
        _FakeGraph.capturing = None

    def replay(self):
        self.replays += 1
        for args in self.recorded:
            _real_sweep(*args)


def _real_sweep(*args):
    from quantkit.solve import gptq

    return gptq._sweep_columns.__wrapped__(*args)


@pytest.mark.parametrize("group_size,n_in", [(64, 512), (32, 300), (256, 512), (-1, 200)])
def test_graphed_column_sweeps_give_the_eager_bits(monkeypatch, group_size, n_in):
    """The GPU's CUDA-graph path (fixed buffers, one capture per run of columns, replays) through a CPU stand-in
    for the graph: the same codes, grid and dequantized weights as the eager sweep, bit for bit, also for a final
    partial block and for groups wider than a block."""
    import contextlib
    import functools

    from quantkit.solve import gptq

    W, _, H = _correlated(48, n_in, 4 * n_in, seed=3)
    spec = QuantSpec(bits=4, group_size=group_size, act_order=True)
    eager = gptq_quantize(W, H, spec)

    sweep = gptq._sweep_columns

    @functools.wraps(sweep)
    def recording_sweep(*args):
        if _FakeGraph.capturing is not None:
            _FakeGraph.capturing.recorded.append(args)
        else:
            sweep(*args)

    captures = []
    monkeypatch.setattr(gptq, "_sweep_columns", recording_sweep)
    monkeypatch.setattr(gptq, "_graph_sweeps", lambda W: True)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: captures.append(_FakeGraph()) or captures[-1])
    stream = type("Stream", (), {"wait_stream": lambda self, other: None})()
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    graphed = gptq_quantize(W, H, spec)
    assert captures and all(c.recorded for c in captures)
    if n_in >= 2 * max(group_size, 128):  # more than one full block: later blocks replay
        assert sum(c.replays for c in captures) > 0
    for field in ("codes", "scales", "zeros", "g_idx", "weight"):
        assert torch.equal(getattr(graphed, field), getattr(eager, field)), field
    assert graphed.loss == eager.loss


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_hessian_with_one_non_finite_entry_is_refused(bad):
    H = torch.eye(64)
    H[3, 40] = H[40, 3] = bad  # off the diagonal: the check reads every entry, not only the diagonal
    with pytest.raises(NumericalError, match="the Hessian holds NaN/Inf"):
        gptq_quantize(torch.randn(8, 64), H, QuantSpec(bits=4, group_size=32))


class _LiveTensorBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """The most bytes that tensors made inside the block held at once, beyond the storages of `inputs` (a
    stand-in for a GPU allocator's peak on the CPU: every op's outputs, grouped by storage, freed when no tensor
    on them is left)."""

    def __init__(self, *inputs):
        super().__init__()
        self.live, self.peak = {}, 0
        self.inputs = {t.untyped_storage().data_ptr() for t in inputs}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.inputs | {0}:
                storage = t.untyped_storage()
                self.live.setdefault(storage.data_ptr(), [storage.nbytes(), []])[1].append(weakref.ref(t))
        for ptr in [p for p, (_, refs) in self.live.items() if all(r() is None for r in refs)]:
            del self.live[ptr]
        self.peak = max(self.peak, sum(n for n, _ in self.live.values()))
        return out


def test_a_solve_makes_no_temporary_of_the_hessians_size():
    """Beyond its inputs a solve holds the float32 weight, its uint8 codes, on a CPU the Hessian's copy for a
    retry (on a GPU that waits in host memory), and temporaries far smaller than the Hessian: no abs or masks
    of it for the finiteness check, no permuted copy, no column-major copy for the Cholesky or the inverse."""
    n, k = 256, 3072
    weight, x, hessian = _correlated(n, k, 2 * k)
    weight = weight.bfloat16()
    del x
    with _LiveTensorBytes(weight, hessian) as tracked:
        gptq_quantize(weight, hessian, QuantSpec(bits=4, group_size=64), consume_hessian=True)
    hessian_bytes = k * k * 4
    expected = n * k * (4 + 1) + hessian_bytes  # weight in float32, codes, the retry copy
    assert tracked.peak <= expected + hessian_bytes // 2, (tracked.peak - expected) / hessian_bytes


def test_the_factorization_makes_no_hidden_copy_of_the_hessian():
    """The Cholesky factor and its inverse are made in the Hessian's own memory: beyond it, a CPU holds the copy
    kept for a retry and one block's temporaries. Written into a row-major H, torch would factor a column-major
    copy; a triangular solve on a trailing block copies that block (the whole Hessian for the first)."""
    from quantkit.solve.inverse_factor import reversed_inverse_factor as _reversed_inverse_factor

    _, x, H = _correlated(1, 4096, 2 * 4096)
    del x
    _reversed_inverse_factor(H.clone(), 0.01)  # the first call's lasting allocations (LAPACK's buffers) not counted
    grown = peak_rss_growth(lambda: _reversed_inverse_factor(H, 0.01))
    assert grown < 1.75 * H.nbytes, grown / H.nbytes  # a copy of H more would make it 2x or more


@pytest.mark.parametrize("shape,group_size", [((32, 256), 32), ((16, 100), 32), ((8, 64), -1)])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_solves_every_group_as_its_own_grid(shape, group_size, sym):
    """Round-to-nearest of a whole matrix gives each (row, group) exactly the grid group_qparams gives that slice
    alone (a partial last group included)."""
    from quantkit.solve.grid import group_qparams, quantize_codes, rtn_quantize

    torch.manual_seed(0)
    w = torch.randn(*shape) * torch.rand(shape[0], 1)
    codes, scales, zeros = rtn_quantize(w, 4, group_size, sym, clip_search=True)
    g = shape[1] if group_size == -1 else group_size
    for j, start in enumerate(range(0, shape[1], g)):
        block = w[:, start:start + g].contiguous()
        scale, zero = group_qparams(block, 4, sym, clip_search=True)
        assert torch.equal(scales[:, j], scale) and torch.equal(zeros[:, j], zero.to(torch.int32))
        assert torch.equal(codes[:, start:start + g], quantize_codes(block, scale, zero, 4).to(torch.int32))
