"""GPTAQ (asymmetric calibration): each Linear solved against the unquantized model's outputs on its own inputs."""
import copy
import hashlib
from pathlib import Path

import pytest
import torch
from test_capture import _llama_layer_and_batches

import quantkit.run.layer as run_layer
from quantkit import CalibSpec, QuantSpec, quantize
from quantkit.calibrate.memo import BlockMemo
from quantkit.calibrate.probes import derivable_blocks
from quantkit.calibrate.statistics import Reference, collect_statistics, propagate
from quantkit.errors import NumericalError
from quantkit.memory.spill import ActivationsInMemory
from quantkit.solve.gptq import gptq_quantize
from quantkit.solve.hessian import accumulate_cross, accumulate_hessian
from quantkit.solve.inverse_factor import reversed_inverse_factor as _reversed_inverse_factor
from quantkit.solve.prepare import shift_to_asymmetric_target_
from quantkit.source.skeleton import linear_modules


def _drifted(n_out=48, n_in=96, tokens=2048, drift=0.3, seed=0):
    """Weights, the unquantized model's inputs X̃ and the quantized model's X = X̃ + correlated drift."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n_out, n_in, generator=g)
    X_ref = torch.randn(tokens, n_in, generator=g) @ torch.randn(n_in, n_in, generator=g)
    X = X_ref + drift * torch.randn(tokens, n_in, generator=g) @ torch.randn(n_in, n_in, generator=g)
    return W, X_ref, X


def _statistics(X_ref, X, chunk=300):
    k = X.shape[1]
    H, C, n = torch.zeros(k, k), torch.zeros(k, k), 0
    for x_ref, x in zip(X_ref.split(chunk), X.split(chunk)):
        accumulate_cross(C, n, x_ref, x)  # before the Hessian's update, which advances the shared count
        H, n = accumulate_hessian(H, n, x)
    return H, C


@pytest.mark.parametrize("act_order", [False, True])
def test_the_shifted_weights_are_the_least_squares_fit_to_the_unquantized_outputs(act_order):
    """W + W·C·H⁻¹, through the solve's own permuted, reversed factor of H, is lstsq's fit of W·X̃ from X."""
    W, X_ref, X = _drifted()
    H, C = _statistics(X_ref, X)
    torch.testing.assert_close(C, 2 * (X_ref - X).T @ X / X.shape[0], rtol=1e-4, atol=1e-3)
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(H.shape[0])
    order = perm.flip(0)
    factor, _ = _reversed_inverse_factor(H[order][:, order].clone(), damp=1e-7)
    shifted = W.clone()
    shift_to_asymmetric_target_(shifted, C, factor, order)
    fit = torch.linalg.lstsq(X.double(), (X_ref.double() @ W.double().T)).solution.T
    torch.testing.assert_close(shifted.double(), fit, rtol=1e-3, atol=1e-3)


def test_without_drift_gptaq_is_plain_gptq_bit_for_bit():
    W, X_ref, _ = _drifted()
    H, C = _statistics(X_ref, X_ref)
    assert torch.count_nonzero(C) == 0
    spec = QuantSpec(bits=4, group_size=32)
    plain, gptaq = gptq_quantize(W, H, spec), gptq_quantize(W, H, spec, cross=C)
    assert torch.equal(plain.codes, gptaq.codes) and torch.equal(plain.scales, gptaq.scales)


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, group_size=32), QuantSpec(bits=3, group_size=-1, sym=False,
                                                                              act_order=False),
                                  QuantSpec(bits=4, group_size=32, static_groups=True)], ids=["4b", "3b-row", "static"])
def test_gptaq_reproduces_the_unquantized_outputs_better_than_gptq(spec):
    W, X_ref, X = _drifted()
    H, C = _statistics(X_ref, X)
    wanted = X_ref @ W.T  # what the unquantized model computes

    def error(weight):
        return float((X @ weight.T - wanted).pow(2).sum())
    plain = gptq_quantize(W, H, spec).weight
    gptaq = gptq_quantize(W, H, spec, cross=C).weight
    assert error(gptaq) < 0.75 * error(plain), (error(gptaq), error(plain))


def test_gptaq_raises_the_damping_as_the_solve_does_and_refuses_a_non_finite_cross_term():
    W, X_ref, X = _drifted(n_in=32)
    X[:, 5] = X[:, 6]  # two identical inputs: H is singular
    H, C = _statistics(X_ref, X)
    res = gptq_quantize(W[:, :32], H, QuantSpec(bits=4, group_size=16, damp=1e-9), cross=C)
    assert res.damp > 1e-9 and torch.isfinite(res.weight).all()
    C[3, 4] = float("nan")
    with pytest.raises(NumericalError, match="cross term"):
        gptq_quantize(W[:, :32], H, QuantSpec(bits=4, group_size=16), cross=C)


def test_the_cross_term_pairs_each_linears_unquantized_and_quantized_inputs():
    """Every group's H and C equal the formulas on the inputs the two layers really receive."""
    layer, batches, call = _llama_layer_and_batches()
    reference = copy.deepcopy(layer)
    with torch.no_grad():
        for module in linear_modules(layer).values():  # "quantized": other weights, so other inputs downstream
            module.weight.add_(0.05 * torch.randn_like(module.weight))
    ref_batches = ActivationsInMemory(b + 0.1 * torch.randn_like(b) for b in batches)
    groups = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    seen = {id(layer): {}, id(reference): {}}
    for model in (layer, reference):
        sink = seen[id(model)]
        for g in groups:
            linear_modules(model)[g[0]].register_forward_pre_hook(
                lambda mod, inp, name=g[0], sink=sink: sink.setdefault(name, []).append(inp[0].reshape(-1, inp[0].shape[-1])))
    stats = collect_statistics(layer, groups, batches, call, torch.device("cpu"), torch.float32,
                               reference=Reference(reference, ref_batches))
    for g, s in zip(groups, stats):
        x = torch.cat(seen[id(layer)][g[0]])
        x_ref = torch.cat(seen[id(reference)][g[0]])
        torch.testing.assert_close(s.hessian, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(s.cross, 2 * (x_ref - x).T @ x / x.shape[0], rtol=1e-4, atol=1e-4)


def test_the_reference_memo_gives_the_statistics_and_outputs_of_plain_forwards():
    """Stage by stage, as the pipeline runs it: the unquantized copy's replays, kept inputs and folds change no
    statistic and no propagated activation, and its attention runs once per batch instead of once per stage."""
    layer, batches, call = _llama_layer_and_batches()
    stages = [[["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]], [["self_attn.o_proj"]],
              [["mlp.gate_proj", "mlp.up_proj"]], [["mlp.down_proj"]]]
    groups = [g for s in stages for g in s]
    cpu = torch.device("cpu")
    derivable = derivable_blocks(layer, groups, batches[0][:1], call, cpu, torch.float32)  # as the pipeline finds

    def run(memo_on: bool):
        ref_layer = copy.deepcopy(layer)
        ref_layer.self_attn.q_proj.register_forward_hook(lambda *a: attention_runs.append(memo_on))
        ref_batches = ActivationsInMemory(b.clone() * 1.1 for b in batches)
        quant = copy.deepcopy(layer)
        options = dict(enabled=memo_on, storage_dtype=torch.float32, groups=groups, hidden_size=32,
                       fold={"self_attn"} if memo_on else set(), derivable=derivable)
        memo = BlockMemo(quant, **options)
        reference = Reference(ref_layer, ref_batches, BlockMemo(ref_layer, **options))
        q_batches = ActivationsInMemory(b.clone() for b in batches)
        done, out = set(), []
        for stage in stages:
            out += collect_statistics(quant, stage, q_batches, call, cpu, torch.float32, memo, done, reference)
            done |= set(stage[0])
        propagate(quant, q_batches, call, cpu, torch.float32, memo)
        propagate(ref_layer, ref_batches, call, cpu, torch.float32, reference.memo)
        return out, ref_batches

    attention_runs = []
    (with_memo, ref_memo), (plain, ref_plain) = run(True), run(False)
    # the o_proj, gate/up, down and propagation passes each run it without the memo; with it, only the first
    assert attention_runs.count(True) == len(batches) and attention_runs.count(False) == 4 * len(batches)
    for a, b in zip(with_memo, plain):
        torch.testing.assert_close(a.hessian, b.hessian)
        torch.testing.assert_close(a.cross, b.cross)
    for a, b in zip(ref_memo, ref_plain):
        torch.testing.assert_close(a, b)


def _hashes(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.glob("*.safetensors"))}


# llama: the attention folded into the input; gpt_neox: a parallel residual; gemma2: a norm after the attention
@pytest.mark.parametrize("model_type", ["llama", "gpt_neox", "gemma2"])
def test_a_gptaq_run_replays_to_the_bytes_of_plain_forwards(model_type, tiny_tokenizer, tmp_path, monkeypatch):
    """Both streams' replays, kept inputs and folds are optimisations only, whatever the layer's wiring."""
    from conftest import make_tiny_model

    model_dir = make_tiny_model(tmp_path / model_type, tiny_tokenizer, model_type=model_type,
                                **({"head_dim": 16} if model_type == "gemma2" else {}))
    spec = QuantSpec(bits=4, group_size=32, gptaq=True)
    calib = CalibSpec(samples=8, seq_len=32)
    memos = []
    real = run_layer.BlockMemo
    quantize(str(model_dir), spec, calib, out=tmp_path / "memo")
    monkeypatch.setattr(run_layer, "BlockMemo", lambda layer, **kw: memos.append(layer) or real(layer, enabled=False, **kw))
    quantize(str(model_dir), spec, calib, out=tmp_path / "plain")
    assert len(memos) == 4  # two layers, each with its quantized and its unquantized memo
    assert _hashes(tmp_path / "memo") == _hashes(tmp_path / "plain")
    monkeypatch.setattr(run_layer, "BlockMemo", real)
    plain = quantize(str(model_dir), QuantSpec(bits=4, group_size=32), calib, out=tmp_path / "gptq")
    assert _hashes(tmp_path / "memo") != _hashes(Path(plain.path))


def test_gptaq_applies_to_gptq_only():
    with pytest.raises(ValueError, match="GPTAQ"):
        QuantSpec(method="rtn", gptaq=True)
