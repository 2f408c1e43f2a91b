"""quantkit/solve/ggml_grids.py: llama.cpp's block-parameter choice, codes and values, checked against gguf-py
(its quantize for the legacy types, its dequantize for all) and against a literal scalar transcription of
ggml-quants.c's C loops (llama.cpp @01243c5), run on a few rows."""
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from quantkit.solve.ggml_grids import GGML_TYPES, BlockGrid, choose_grid, dequantize, nearest_codes
from quantkit.write.ggml_blocks import pack

LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
KQUANTS = ("Q4_K", "Q5_K", "Q6_K")

# ---- the scalar reference: ggml-quants.c line by line in numpy float32 scalars (numpy 2 keeps Python numbers
# weak, so each operation rounds to float32 as the C float operation does) ----

F = np.float32
GROUP_MAX_EPS = F(1e-15)


def nearest_int(v):
    return int(np.rint(F(v)))


def fp16(v):
    return np.float16(F(v))


def make_qx_quants(n, nmax, x, qw):
    """rmse_type = 1; qw None means weights x*x. Returns (scale, L)."""
    amax, mx = F(0), F(0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax, mx = ax, x[i]
    if amax < GROUP_MAX_EPS:
        return F(0), [0] * n
    weight = (lambda i: qw[i]) if qw is not None else (lambda i: x[i] * x[i])

    def run(iscale):
        sumlx = suml2 = F(0)
        levels = []
        for i in range(n):
            q = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
            levels.append(q + nmax)
            w = weight(i)
            sumlx += w * x[i] * q
            suml2 += w * q * q
        return sumlx, suml2, levels

    sumlx, suml2, L = run(F(-nmax) / mx)
    scale = sumlx / suml2 if suml2 else F(0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        sumlx, suml2, levels = run(-(nmax + F(0.1) * step) / mx)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            L = levels
            scale = sumlx / suml2
            best = scale * sumlx
    return scale, L


def make_qkx(n, nmax, x, weights, rmin, rdelta, nstep, qkx3):
    """make_qkx2_quants (qkx3=False) / make_qkx3_quants (qkx3=True), use_mad=false. Returns (scale, the_min)."""
    mn = mx = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        mn = x[i] if x[i] < mn else mn
        mx = x[i] if x[i] > mx else mx
        sum_w += weights[i]
        sum_x += weights[i] * x[i]
    if mn > 0:
        mn = F(0)
    if (mx <= mn) if qkx3 else (mx == mn):
        return F(0), -mn
    iscale = F(nmax) / (mx - mn)
    scale = F(1) / iscale
    best = F(0)
    for i in range(n):
        q = max(0, min(nmax, nearest_int(iscale * (x[i] - mn))))
        diff = scale * q + mn - x[i]
        best += weights[i] * (diff * diff)
    for step in range(nstep + 1):
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = (F(rmin) + F(rdelta) * step + nmax) / (mx - mn)
            levels = []
            for i in range(n):
                v = iscale * (x[i] - mn)
                if qkx3:
                    levels.append(nearest_int(min(v, F(nmax))) if v > 0 else 0)
                else:
                    levels.append(max(0, min(nmax, nearest_int(v))))
        sum_l = sum_l2 = sum_xl = F(0)
        for i in range(n):
            w = weights[i]
            sum_l += w * levels[i]
            sum_l2 += w * levels[i] * levels[i]
            sum_xl += w * levels[i] * x[i]
        det = sum_w * sum_l2 - sum_l * sum_l
        if det > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            if this_min > 0:
                this_min = F(0)
                this_scale = sum_xl / sum_l2
            err = F(0)
            for i in range(n):
                diff = this_scale * levels[i] + this_min - x[i]
                err += weights[i] * (diff * diff)
            if err < best:
                best, scale, mn = err, this_scale, this_min
    return scale, -mn


def make_qp_quants(n, nmax, x, qw):
    """Returns (scale, L)."""
    mx = F(0)
    for i in range(n):
        mx = max(mx, x[i])
    if mx < GROUP_MAX_EPS:
        return F(0), [0] * n
    iscale = F(nmax) / mx
    L = [nearest_int(iscale * x[i]) for i in range(n)]
    scale = F(1) / iscale
    best = F(0)
    for i in range(n):
        diff = x[i] - scale * L[i]
        best += qw[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (F(0.1) * step + nmax) / mx
        scale_is = F(1) / iscale_is
        mse = F(0)
        for i in range(n):
            q = min(nmax, nearest_int(iscale_is * x[i]))
            diff = x[i] - scale_is * q
            mse += qw[i] * diff * diff
        if mse < best:
            best, iscale = mse, iscale_is
    sumlx = suml2 = F(0)
    for i in range(n):
        L[i] = min(nmax, nearest_int(iscale * x[i]))
        sumlx += qw[i] * x[i] * L[i]
        suml2 += qw[i] * L[i] * L[i]
    for _ in range(5):
        changed = 0
        for i in range(n):
            w = qw[i]
            slx = sumlx - w * x[i] * L[i]
            sl2 = suml2 - w * L[i] * L[i]
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    slx += w * x[i] * new_l
                    sl2 += w * new_l * new_l
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i], sumlx, suml2 = new_l, slx, sl2
                        changed += 1
        if not changed:
            break
    return (sumlx / suml2 if suml2 > 0 else F(0)), L


def kquant_affine_row(x, nmax, qw=None):
    """quantize_row_q4_K/q5_K (_ref if qw is None, else _impl) for one row of 256*k floats.

    Returns per super-block (d, dmin, sc[8], m[8], L[256]) with L re-quantized as C does (a sub-block whose
    d*sc is 0 keeps the search's codes; those codes are not compared)."""
    out = []
    for i in range(len(x) // 256):
        xb = x[256 * i:256 * i + 256]
        scales, mins, sw = [], [], []
        if qw is not None:
            sum_x2 = F(0)
            for v in xb:
                sum_x2 += v * v
            sigma2 = 2 * sum_x2 / 256
        for j in range(8):
            xs = xb[32 * j:32 * j + 32]
            if qw is None:
                sum_x2 = F(0)
                for v in xs:
                    sum_x2 += v * v
                av_x = np.sqrt(sum_x2 / 32)
                weights = [av_x + abs(v) for v in xs]
                search = (-1.0, 0.1, 20) if nmax == 15 else (-0.5, 0.1, 15)
                s, m = make_qkx(32, nmax, xs, weights, *search, qkx3=False)
            else:
                q = qw[256 * i + 32 * j:256 * i + 32 * j + 32]
                weights = [q[k] * np.sqrt(sigma2 + xs[k] * xs[k]) for k in range(32)]
                total = F(0)
                for v in weights:
                    total += v
                sw.append(total)
                s, m = make_qkx(32, nmax, xs, weights, -0.9, 0.05, 36, qkx3=True)
            scales.append(s)
            mins.append(m)
        if qw is None:
            max_scale = max_min = F(0)
            for s, m in zip(scales, mins):
                max_scale = s if s > max_scale else max_scale
                max_min = m if m > max_min else max_min
            inv_scale = F(63) / max_scale if max_scale > 0 else F(0)
            inv_min = F(63) / max_min if max_min > 0 else F(0)
            sc = [min(63, nearest_int(inv_scale * s) & 255) for s in scales]
            mm = [min(63, nearest_int(inv_min * m) & 255) for m in mins]
            d, dmin = fp16(max_scale / F(63)), fp16(max_min / F(63))
        else:
            d_block, sc = make_qp_quants(8, 63, scales, sw)
            m_block, mm = make_qp_quants(8, 63, mins, sw)
            d, dmin = fp16(d_block), fp16(m_block)
        L = []
        for j in range(8):
            dj = F(d) * sc[j]
            dm = F(dmin) * mm[j]
            for v in xb[32 * j:32 * j + 32]:
                L.append(max(0, min(nmax, nearest_int((v + dm) / dj))) if dj else None)
        out.append((d, dmin, sc, mm, L))
    return out


def q6_k_row(x, qw=None):
    """quantize_row_q6_K (_ref if qw is None, else _impl). Returns per super-block (d, sc[16], L[256])."""
    out = []
    for i in range(len(x) // 256):
        xb = x[256 * i:256 * i + 256]
        scales = []
        max_scale = max_abs = F(0)
        for j in range(16):
            q = None if qw is None else qw[256 * i + 16 * j:256 * i + 16 * j + 16]
            s, _ = make_qx_quants(16, 32, xb[16 * j:16 * j + 16], q)
            scales.append(s)
            if abs(s) > max_abs:
                max_abs, max_scale = abs(s), s
        if max_abs < GROUP_MAX_EPS:
            out.append((np.float16(0), [0] * 16, [0] * 256))
            continue
        iscale = F(-128) / max_scale
        d = fp16(F(1) / iscale)
        sc = [min(127, nearest_int(iscale * s)) for s in scales]
        L = []
        for j in range(16):
            dj = F(d) * sc[j]
            for v in xb[16 * j:16 * j + 16]:
                L.append(max(-32, min(31, nearest_int(v / dj))) + 32 if dj else None)
        out.append((d, sc, L))
    return out


def legacy_impl_row(name, x, qw):
    """quantize_row_q4_0/q4_1/q5_0/q5_1_impl's stored d (and m) per block of 32, for one row."""
    sum_x2 = F(0)
    for v in x:
        sum_x2 += v * v
    sigma2 = sum_x2 / len(x)
    out = []
    for b in range(len(x) // 32):
        xb = x[32 * b:32 * b + 32]
        weights = [qw[32 * b + j] * np.sqrt(sigma2 + xb[j] * xb[j]) for j in range(32)]
        if name in ("Q4_0", "Q5_0"):
            d, _ = make_qx_quants(32, 8 if name == "Q4_0" else 16, xb, weights)
            out.append((fp16(d),))
        else:
            d, the_min = make_qkx(32, 15 if name == "Q4_1" else 31, xb, weights, -0.9, 0.05, 36, qkx3=True)
            out.append((fp16(d), fp16(-the_min)))
    return out


# ---- helpers ----

def qtype(name):
    return GGMLQuantizationType[name]


KINDS = ("normal", "outliers", "zero_rows", "constant_blocks", "negative", "row_scales", "tiny", "huge")


def weights(kind, n=8, k=512, seed=0):
    """[n, k] float32 weights of one distribution."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    if kind == "outliers":  # heavy-tailed: 1% of the weights 50x larger
        w = torch.where(torch.rand(n, k, generator=g) < 0.01, w * 50, w)
    elif kind == "zero_rows":
        w[::2] = 0
        w[1, :40] = 0  # a zero block (and a zero sub-block) inside a non-zero row
    elif kind == "constant_blocks":
        w.view(n, -1, 32)[:, ::3] = torch.randn(n, k // 96 + 1, 1, generator=g)[:, :w.view(n, -1, 32)[:, ::3].shape[1]]
    elif kind == "negative":
        w = -torch.rand(n, k, generator=g) * 0.05
    elif kind == "row_scales":  # rows from 1e-6 to 1e3
        w = w * 10 ** torch.linspace(-6, 3, n).unsqueeze(1)
    elif kind == "tiny":  # float16 underflows d to 0 or a subnormal
        w = w * 1e-28
    elif kind == "huge":  # float16 would overflow d: clamped to 65504
        w = w * 1e8
    return w


def importance_for(k, seed=1, skew=2.5):
    g = torch.Generator().manual_seed(seed)
    return torch.exp(skew * torch.randn(k, generator=g))


def affine_values(codes, grid):
    scale, bias = grid.affine()
    n, k = grid.shape
    c = codes.reshape(n, -1, grid.type.group).float()
    return (scale.unsqueeze(-1) * c + bias.unsqueeze(-1)).reshape(n, k)


def bits(t):
    return np.ascontiguousarray(t.numpy() if isinstance(t, torch.Tensor) else t).view(np.int32)


def check_against_gguf(name, w, grid, codes):
    """dequantize == gguf's dequantize of pack, bit for bit, == scale*code + bias by value; all finite."""
    data = pack(codes, grid)
    ours = dequantize(codes, grid)
    theirs = gguf_dequantize(data, qtype(name))
    assert np.array_equal(bits(ours), bits(theirs)), name
    assert torch.equal(affine_values(codes, grid), ours), name
    assert bool(torch.isfinite(ours).all()), name
    return data


# ---- tests ----

def test_the_type_table_matches_gguf():
    assert set(GGML_TYPES) == set(LEGACY + KQUANTS)
    for name, t in GGML_TYPES.items():
        assert t.name == name
        assert t.type_id == qtype(name).value
        assert GGML_QUANT_SIZES[qtype(name)] == (t.block, t.block_bytes)
        assert t.block % t.group == 0


@pytest.mark.parametrize("with_importance", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", LEGACY + KQUANTS)
def test_chosen_grids_pack_to_what_gguf_reads_back(name, kind, with_importance):
    w = weights(kind)
    importance = importance_for(w.shape[1]) if with_importance else None
    grid = choose_grid(w, name, importance)
    codes = nearest_codes(w, grid)
    assert codes.dtype == torch.uint8 and tuple(codes.shape) == tuple(w.shape)
    assert int(codes.max()) <= grid.type.maxq
    data = check_against_gguf(name, w, grid, codes)
    if name in LEGACY and not with_importance and kind != "huge":  # gguf-py writes inf where float16 overflows
        assert np.array_equal(data, gguf_quantize(w.numpy(), qtype(name)))
    zero_blocks = (w.reshape(w.shape[0], -1, 32) == 0).all(-1)  # zero rows and blocks of 32 stay exactly 0
    assert not dequantize(codes, grid).reshape(w.shape[0], -1, 32)[zero_blocks].any()


@pytest.mark.parametrize("name", LEGACY)
def test_the_legacy_ref_path_writes_gguf_quantize_bytes(name):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(192, 2048, generator=g) * torch.exp(torch.randn(192, 1, generator=g))
    w[64:128] = torch.round(w[64:128] * 64) / 64  # values on a coarse lattice: many exact ties
    grid = choose_grid(w, name)
    assert np.array_equal(pack(nearest_codes(w, grid), grid), gguf_quantize(w.numpy(), qtype(name)))


def reference_rows(seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([
        torch.randn(512, generator=g),
        torch.randn(512, generator=g) / torch.rand(512, generator=g).clamp(min=0.05),  # heavy tails
        -torch.rand(512, generator=g),
        torch.cat([torch.zeros(32), torch.randn(224, generator=g) * 1e-3, torch.full((32,), 0.5),
                   torch.randn(224, generator=g)]),
        torch.round(torch.randn(512, generator=g) * 8) / 16,  # a coarse lattice: exact ties between candidates
        torch.rand(512, generator=g) * 0.01,
        torch.randn(512, generator=g) * 0.02 * torch.exp(torch.randn(512, generator=g)),
        torch.cat([torch.full((32,), -0.25), torch.randn(480, generator=g) * 3e-3 + 0.01]),
        torch.minimum(torch.randn(512, generator=g), torch.zeros(512)),  # half the weights 0, the rest < 0
    ])


@pytest.mark.parametrize("with_importance", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("name", KQUANTS)
def test_kquant_choice_equals_the_c_loops(name, with_importance):
    w = reference_rows()
    importance = importance_for(512, seed=4) if with_importance else None
    grid = choose_grid(w, name, importance)
    codes = nearest_codes(w, grid)
    f = grid.fields
    for r in range(w.shape[0]):
        qw = None if importance is None else importance.numpy()
        if name == "Q6_K":
            expected = q6_k_row(w[r].numpy(), qw)
        else:
            expected = kquant_affine_row(w[r].numpy(), GGML_TYPES[name].maxq, qw)
        for s, block in enumerate(expected):
            got = codes[r, 256 * s:256 * s + 256].tolist()
            if name == "Q6_K":
                d, sc, levels = block
                assert f["sc"][r, 16 * s:16 * s + 16].tolist() == list(sc), (r, s)
            else:
                d, dmin, sc, m, levels = block
                assert f["dmin"][r, s].item() == float(dmin), (r, s)
                assert f["sc"][r, 8 * s:8 * s + 8].tolist() == list(sc), (r, s)
                assert f["m"][r, 8 * s:8 * s + 8].tolist() == list(m), (r, s)
            assert f["d"][r, s].item() == float(d), (r, s)
            assert all(a == b for a, b in zip(got, levels) if b is not None), (r, s)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_legacy_imatrix_choice_equals_the_c_loops(name):
    w = reference_rows()
    importance = importance_for(512, seed=5)
    grid = choose_grid(w, name, importance)
    for r in range(w.shape[0]):
        for b, block in enumerate(legacy_impl_row(name, w[r].numpy(), importance.numpy())):
            assert grid.fields["d"][r, b].item() == float(block[0]), (r, b)
            if len(block) > 1:
                assert grid.fields["m"][r, b].item() == float(block[1]), (r, b)


def relative_rmse(name, w, importance=None):
    grid = choose_grid(w, name, importance)
    return float(((dequantize(nearest_codes(w, grid), grid) - w).pow(2).mean() / w.pow(2).mean()).sqrt())


def test_the_error_is_what_a_fair_scheme_gets_and_falls_with_the_bits():
    w = torch.randn(64, 2048, generator=torch.Generator().manual_seed(11))
    err = {name: relative_rmse(name, w) for name in GGML_TYPES}
    # Gaussian weights: 4-bit codes with a min per 32 have ~7-8% relative RMSE, each extra bit halves it
    assert err["Q4_K"] < 0.075 and err["Q4_K"] < err["Q4_1"] < 0.08
    assert err["Q5_K"] < 0.038 and err["Q5_K"] < err["Q5_1"]
    assert err["Q6_K"] < 0.019
    assert err["Q8_0"] < err["Q6_K"] < err["Q5_K"] < err["Q4_K"]
    flat = torch.ones(2048)  # a uniform imatrix: the imatrix path's own error stays close to the _ref path's
    for name in KQUANTS:
        assert relative_rmse(name, w, flat) < 1.2 * err[name], name


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"] + list(KQUANTS))
def test_a_skewed_importance_lowers_the_importance_weighted_error(name):
    w = torch.randn(32, 1024, generator=torch.Generator().manual_seed(12)) * 0.02
    importance = importance_for(1024, seed=13)

    def weighted_error(grid):
        return float(((dequantize(nearest_codes(w, grid), grid) - w).pow(2) * importance).sum())

    assert weighted_error(choose_grid(w, name, importance)) < 0.75 * weighted_error(choose_grid(w, name))


def test_q8_0_ignores_the_importance_as_llama_cpp_does():
    w = weights("normal")
    a, b = choose_grid(w, "Q8_0"), choose_grid(w, "Q8_0", importance_for(512))
    assert torch.equal(a.fields["d"], b.fields["d"]) and torch.equal(nearest_codes(w, a), nearest_codes(w, b))


@pytest.mark.parametrize("name", LEGACY + KQUANTS)
def test_zero_rows_give_zero_scales_and_exact_zeros(name):
    w = torch.zeros(4, 512)
    for importance in (None, importance_for(512)):
        grid = choose_grid(w, name, importance)
        for key, value in grid.fields.items():
            assert float(value.float().abs().max()) == 0.0, key
        values = dequantize(nearest_codes(w, grid), grid)
        assert torch.equal(values, torch.zeros_like(values))


@pytest.mark.parametrize("name", LEGACY + KQUANTS)
def test_float16_overflow_clamps_the_scales(name):
    w = weights("huge")
    grid = choose_grid(w, name)
    for key, value in grid.fields.items():
        if value.dtype == torch.float16:
            assert bool(torch.isfinite(value).all()), key
    values = dequantize(nearest_codes(w, grid), grid)
    assert bool(torch.isfinite(values).all())
    assert float(values.abs().max()) > 1e5  # saturated, not collapsed


@pytest.mark.parametrize("name", LEGACY + KQUANTS)
def test_every_code_has_its_affine_value(name):
    w = weights("outliers", n=4)
    grid = choose_grid(w, name, importance_for(512))
    n, k = grid.shape
    codes = (torch.arange(n * k) % (grid.type.maxq + 1)).to(torch.uint8).reshape(n, k)
    check_against_gguf(name, w, grid, codes)


@pytest.mark.parametrize("name", LEGACY + KQUANTS)
def test_codes_are_nearest_on_the_stored_grid(name):
    w = weights("outliers", n=4)
    chosen = choose_grid(w, name, importance_for(512))
    grid = BlockGrid(chosen.type, chosen.fields, chosen.shape)  # without `rounding`: codes from the stored fields
    values = dequantize(nearest_codes(w, grid), grid)
    scale, bias = grid.affine()
    all_codes = torch.arange(grid.type.maxq + 1, dtype=torch.float32)
    n, k = grid.shape
    every = scale.unsqueeze(-1) * all_codes + bias.unsqueeze(-1)                      # [n, k/group, codes]
    best = (every.unsqueeze(2) - w.reshape(n, -1, grid.type.group, 1)).abs().amin(-1).reshape(n, k)
    slack = 1e-6 * scale.abs().repeat_interleave(grid.type.group, dim=1) + 1e-12
    assert bool(((values - w).abs() <= best + slack).all())


def test_bad_inputs_raise_clear_errors():
    w = torch.randn(4, 512)
    with pytest.raises(ValueError, match="Q4_K needs a row length .* multiple of its block of 256 elements; got 300"):
        choose_grid(torch.randn(4, 300), "Q4_K")
    with pytest.raises(ValueError, match="Q8_0 .* block of 32 elements; got 48"):
        choose_grid(torch.randn(4, 48), "Q8_0")
    with pytest.raises(ValueError, match="unknown ggml type 'Q3_K'; known: Q4_0"):
        choose_grid(w, "Q3_K")
    with pytest.raises(ValueError, match="2-D floating-point"):
        choose_grid(torch.randn(512), "Q4_0")
    with pytest.raises(ValueError, match="2-D floating-point"):
        choose_grid(torch.ones(4, 512, dtype=torch.int32), "Q4_0")
    bad = w.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        choose_grid(bad, "Q4_K")
    with pytest.raises(ValueError, match=r"importance must be a floating-point tensor \[in_features\] = \[512\]"):
        choose_grid(w, "Q4_K", torch.ones(256))
    with pytest.raises(ValueError, match="finite, non-negative"):
        choose_grid(w, "Q6_K", -torch.ones(512))
    with pytest.raises(ValueError, match="finite, non-negative"):
        choose_grid(w, "Q4_0", torch.full((512,), float("inf")))
    grid = choose_grid(w, "Q4_0")
    with pytest.raises(ValueError, match=r"w has shape \(4, 256\) but the Q4_0 grid is for \(4, 512\)"):
        nearest_codes(w[:, :256], grid)
    with pytest.raises(ValueError, match="Q4_0 codes must lie in 0..15; got 16"):
        dequantize(torch.full((4, 512), 16, dtype=torch.uint8), grid)
    with pytest.raises(ValueError, match="Q4_0 codes must be a uint8 tensor of shape"):
        dequantize(torch.zeros(4, 512, dtype=torch.int64), grid)
    with pytest.raises(ValueError, match=r"Q4_K field 'sc' must be torch.uint8 of shape \(4, 16\)"):
        BlockGrid(GGML_TYPES["Q4_K"], {"d": torch.zeros(4, 2).half(), "dmin": torch.zeros(4, 2).half(),
                                       "sc": torch.zeros(4, 8, dtype=torch.uint8),
                                       "m": torch.zeros(4, 16, dtype=torch.uint8)}, (4, 512))
    with pytest.raises(ValueError, match=r"Q4_K field 'm' holds 6-bit values \(0..63\); got 64"):
        BlockGrid(GGML_TYPES["Q4_K"], {"d": torch.zeros(4, 2).half(), "dmin": torch.zeros(4, 2).half(),
                                       "sc": torch.zeros(4, 16, dtype=torch.uint8),
                                       "m": torch.full((4, 16), 64, dtype=torch.uint8)}, (4, 512))
    with pytest.raises(ValueError, match=r"a Q6_K grid has the fields \['d', 'sc'\]"):
        BlockGrid(GGML_TYPES["Q6_K"], {"d": torch.zeros(4, 2).half()}, (4, 512))
