"""Replaying finished blocks (BlockMemo) is an optimisation only: it must not change a single output byte."""
import hashlib
from pathlib import Path

import pytest
import torch

import quantkit.run.layer as run_layer
from quantkit import CalibSpec, QuantSpec, quantize
from quantkit.calibrate import block_outputs, kept_inputs, probes
from quantkit.calibrate.memo import BlockMemo
from quantkit.calibrate.probes import foldable_blocks
from quantkit.calibrate.statistics import collect_hessians, propagate
from quantkit.memory.spill import ActivationsInMemory
from quantkit.source.skeleton import linear_modules


def _shard_hashes(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.glob("*.safetensors"))}


# reads: kept inputs read back from the scratch file, one batch each: o_proj's in every layer's gate/up stage and
# down_proj's in every propagation (not the last layer's). Gemma 2's eager attention also returns its weights, so
# it is run, not derived from o_proj's inputs. bfloat16: the forwards of a bfloat16 model on a CPU with native
# bfloat16 matmuls (--compute-dtype auto there), on any CPU.
@pytest.mark.parametrize("model_type,act_order,folds,reads,compute", [
    ("llama", True, {"self_attn"}, [0, 0, 0], "float32"), ("llama", False, {"self_attn"}, [0, 0, 0], "float32"),
    ("llama", True, {"self_attn"}, [0, 0, 0], "bfloat16"),
    ("gpt_neox", True, set(), [0, 0, 0], "float32"),  # parallel residual
    ("gemma2", True, set(), [0], "float32")])   # a norm after the attention
def test_replaying_finished_blocks_changes_no_output_byte(model_type, act_order, folds, reads, compute,
                                                          tiny_tokenizer, tmp_path, monkeypatch):
    from conftest import make_tiny_model

    model_dir = make_tiny_model(tmp_path / model_type, tiny_tokenizer, model_type=model_type,
                                **({"head_dim": 16} if model_type == "gemma2" else {}))
    spec = QuantSpec(bits=4, group_size=32, act_order=act_order)
    calib = CalibSpec(samples=8, seq_len=32)
    found, spilled = [], []
    monkeypatch.setattr(run_layer, "foldable_blocks", lambda *a: found.append(probes.foldable_blocks(*a)) or found[-1])

    class Spill(kept_inputs.KeptOnDisk):
        def take(self, i):
            spilled.append(i)
            return super().take(i)
    monkeypatch.setattr(kept_inputs, "KeptOnDisk", Spill)
    assert quantize(str(model_dir), spec, calib, out=tmp_path / "memo", compute_dtype=compute).compute_dtype == compute
    assert found == [folds]  # checked once: every layer is of one class
    assert spilled == reads
    replays = []
    monkeypatch.setattr(run_layer, "BlockMemo", lambda layer, **kw: replays.append(layer) or BlockMemo(layer, enabled=False, **kw))
    quantize(str(model_dir), spec, calib, out=tmp_path / "plain", compute_dtype=compute)
    assert replays, "the pipeline no longer builds its BlockMemo through run.layer.BlockMemo"
    assert _shard_hashes(tmp_path / "memo") == _shard_hashes(tmp_path / "plain")


def _llama_layer_and_batches():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaDecoderLayer,
        LlamaRotaryEmbedding,
    )

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    config._attn_implementation = "sdpa"  # as quantkit builds models: the attention returns no weights
    layer = LlamaDecoderLayer(config, 0).eval()
    batches = ActivationsInMemory(torch.randn(2, 8, 32) for _ in range(3))
    pos = torch.arange(8)[None]
    call = type("Call", (), {})()
    call.args, call.kwargs = (), {"position_embeddings": LlamaRotaryEmbedding(config)(batches[0], pos),
                                  "position_ids": pos, "attention_mask": None}
    return layer, batches, call


def test_attention_is_replayed_once_its_linears_are_done():
    layer, batches, call = _llama_layer_and_batches()
    attn = [n for n in linear_modules(layer) if n.startswith("self_attn.")]
    calls = []
    layer.self_attn.register_forward_hook(lambda *a: calls.append(1))

    memo = BlockMemo(layer)
    h_memo = collect_hessians(layer, [["mlp.gate_proj", "mlp.up_proj"]], batches, call, torch.device("cpu"),
                              torch.float32, memo, done=set(attn))
    assert len(calls) == 3 and set(memo.outputs) == {"self_attn"}  # recorded on its first complete run
    h_plain = collect_hessians(layer, [["mlp.gate_proj", "mlp.up_proj"]], batches, call, torch.device("cpu"),
                               torch.float32)
    torch.testing.assert_close(h_memo[0], h_plain[0], rtol=0, atol=0)

    expected = ActivationsInMemory(b.clone() for b in batches)
    propagate(layer, expected, call, torch.device("cpu"), torch.float32)
    layer.self_attn.o_proj.weight.data.zero_()  # a recomputed attention would now differ: only a replay matches
    replayed = ActivationsInMemory(b.clone() for b in batches)
    propagate(layer, replayed, call, torch.device("cpu"), torch.float32, memo)
    for a, b in zip(replayed, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the propagation is the records' last reader: each is freed once replayed, and the MLP (finished too, and
    # as large to record as the activations) is not recorded
    assert set(memo.outputs) == {"self_attn"} and memo.outputs["self_attn"] == [None] * 3


GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
          ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


@pytest.mark.parametrize("extra_after_exit,on_disk", [(False, False), (True, False), (False, True)])
def test_attention_output_comes_from_the_kept_o_proj_inputs(extra_after_exit, on_disk, tmp_path):
    """o_proj's inputs, kept while o_proj is calibrated (in memory, or in a scratch file), give the attention's
    output in the next stage: the real attention runs for the first batch only (to check that). A block doing
    more after o_proj runs for real."""
    from quantkit.memory.spill import KeptInMemory, KeptOnDisk

    layer, batches, call = _llama_layer_and_batches()
    cpu, qkv = torch.device("cpu"), set(GROUPS[0])
    if extra_after_exit:  # an architecture whose attention scales its output after o_proj
        forward = layer.self_attn.forward
        layer.self_attn.forward = lambda *a, **k: (forward(*a, **k)[0] * 2, None)
    expected = collect_hessians(layer, [GROUPS[2]], batches, call, cpu, torch.float32)[0]
    memo = BlockMemo(layer, groups=GROUPS, hidden_size=32, spill_dir=tmp_path if on_disk else None,
                     propagates=False)
    assert memo.exits == {"self_attn": "self_attn.o_proj"}  # down_proj's inputs: wider, and no propagation to use them
    collect_hessians(layer, [GROUPS[1]], batches, call, cpu, torch.float32, memo, done=qkv)
    assert len(memo.seeds["self_attn"]) == 3
    assert isinstance(memo.seeds["self_attn"], KeptOnDisk if on_disk else KeptInMemory)
    attention_runs = []
    layer.self_attn.q_proj.register_forward_hook(lambda *a: attention_runs.append(1))
    H = collect_hessians(layer, [GROUPS[2]], batches, call, cpu, torch.float32, memo,
                         done=qkv | {"self_attn.o_proj"})[0]
    assert len(attention_runs) == (3 if extra_after_exit else 1)
    torch.testing.assert_close(H, expected, rtol=0, atol=0)
    assert memo.seeds == {} and len(memo.outputs["self_attn"]) == 3  # kept inputs freed; outputs recorded


def test_a_folded_attention_gives_the_same_hessians_and_outputs():
    """The attention's records are added into the stored inputs (h = x + attention) as each batch finishes, and
    it replays zeros afterwards: the next stage's Hessian and the propagated outputs are those of the plain path
    bit for bit, and no record is kept (one copy of the activations less)."""
    layer, batches, call = _llama_layer_and_batches()
    cpu, attention, up = torch.device("cpu"), set(GROUPS[0]) | set(GROUPS[1]), set(GROUPS[2])
    assert foldable_blocks(layer, GROUPS, batches[0][:1], call, cpu, torch.float32) == {"self_attn"}
    expected_h = collect_hessians(layer, [GROUPS[3]], batches, call, cpu, torch.float32, done=attention | up)[0]
    expected = ActivationsInMemory(b.clone() for b in batches)
    propagate(layer, expected, call, cpu, torch.float32)

    memo = BlockMemo(layer, groups=GROUPS, hidden_size=32, fold={"self_attn"})
    folded = ActivationsInMemory(b.clone() for b in batches)
    collect_hessians(layer, [GROUPS[2]], folded, call, cpu, torch.float32, memo, done=attention)
    assert memo.outputs["self_attn"] == [None] * 3 and len(memo.folded["self_attn"]) == 3
    assert not torch.equal(folded[0], batches[0])  # now x + attention
    layer.self_attn.o_proj.weight.data.zero_()  # a recomputed attention would now differ: only the fold matches
    h = collect_hessians(layer, [GROUPS[3]], folded, call, cpu, torch.float32, memo, done=attention | up)[0]
    assert torch.equal(h, expected_h)
    propagate(layer, folded, call, cpu, torch.float32, memo)
    for a, b in zip(folded, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("residual", ["parallel", "scaled"])
def test_blocks_not_added_straight_onto_the_input_are_not_folded(residual):
    """A parallel-residual layer feeds its MLP from x, not x + attention; another scales the attention before
    adding it. Folding either would change the outputs, and the check finds that."""
    layer, batches, call = _llama_layer_and_batches()

    def forward(hidden_states, *args, **kwargs):
        attn = layer.self_attn(layer.input_layernorm(hidden_states), **kwargs)[0]
        if residual == "parallel":
            return hidden_states + attn + layer.mlp(layer.post_attention_layernorm(hidden_states))
        h = hidden_states + 0.5 * attn
        return h + layer.mlp(layer.post_attention_layernorm(h))

    layer.forward = forward
    assert foldable_blocks(layer, GROUPS, batches[0][:1], call, torch.device("cpu"), torch.float32) == set()


def test_blocks_with_unfinished_linears_are_never_recorded():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    layer = LlamaDecoderLayer(LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                          num_key_value_heads=2), 0)
    memo = BlockMemo(layer)
    with memo.replaying({"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}, 1, torch.device("cpu")):
        pass
    assert memo.outputs == {}


def test_head_hessian_equals_the_one_of_a_real_forward(tiny_llama_dir, tiny_tokenizer):
    """--lm-head calibration: the model's own tail (final norm) applied to the last layer's outputs gives exactly
    the head inputs of an ordinary forward."""
    from transformers import AutoModelForCausalLM

    from quantkit.calibrate.head import collect_head_hessian
    from quantkit.solve.hessian import accumulate_hessian
    from quantkit.source.calibration import evaluation_windows

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = evaluation_windows(tiny_tokenizer, "pydocs-eval", 32, 32 * 6)
    head_inputs, last_outputs = [], []
    hooks = [model.lm_head.register_forward_pre_hook(lambda m, inp: head_inputs.append(inp[0])),
             model.model.layers[-1].register_forward_hook(
                 lambda m, inp, out: last_outputs.append(out[0] if isinstance(out, tuple) else out))]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    reference, _ = accumulate_hessian(torch.zeros(64, 64), 0, head_inputs[0])
    final = last_outputs[0]
    H = collect_head_hessian(model, model.model.layers, model.lm_head, ids, [final[:4], final[4:]],
                             torch.device("cpu"), torch.float32)
    assert torch.allclose(H, reference, rtol=1e-5, atol=1e-7)
    assert all(type(layer).__name__ == "LlamaDecoderLayer" for layer in model.model.layers)  # restored


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_mlp_output_comes_from_down_projs_inputs_kept_on_disk(stored, tmp_path):
    """down_proj's inputs, kept in an unlinked scratch file while down_proj is calibrated, give the MLP's output in
    the propagation: gate/up run for the first batch only (the check), and the outputs are those of the same memo
    without the scratch file (which reruns gate/up) with down_proj's new (quantized) weights, bit for bit; in
    float32 also those of the plain layer. No file is left in the directory."""
    from quantkit.memory.spill import KeptOnDisk

    layer, batches, call = _llama_layer_and_batches()
    batches = ActivationsInMemory(b.to(stored) for b in batches)
    cpu, attention = torch.device("cpu"), set(GROUPS[0]) | set(GROUPS[1])
    plain = ActivationsInMemory(b.clone() for b in batches)
    results, gate_runs = {}, []
    for spill_dir in (None, tmp_path):
        memo = BlockMemo(layer, storage_dtype=stored, groups=GROUPS, hidden_size=32, spill_dir=spill_dir)
        assert set(memo.exits) == ({"self_attn", "mlp"} if spill_dir else {"self_attn"})
        got = ActivationsInMemory(b.clone() for b in batches)
        collect_hessians(layer, [GROUPS[2]], got, call, cpu, torch.float32, memo, done=attention)
        collect_hessians(layer, [GROUPS[3]], got, call, cpu, torch.float32, memo, done=attention | set(GROUPS[2]))
        if spill_dir:
            assert isinstance(memo.seeds["mlp"], KeptOnDisk) and len(memo.seeds["mlp"]) == 3
            assert list(tmp_path.iterdir()) == []
        down = layer.mlp.down_proj.weight
        down.data = (down.data * 16).round() / 16  # as its solve writes the dequantized weights back
        hook = layer.mlp.gate_proj.register_forward_hook(lambda *a, where=spill_dir: gate_runs.append(where))
        propagate(layer, got, call, cpu, torch.float32, memo)
        hook.remove()
        assert memo.seeds == {}
        results[spill_dir] = got
    assert gate_runs.count(tmp_path) == 1 and gate_runs.count(None) == 3
    for a, b in zip(results[tmp_path], results[None]):
        assert torch.equal(a, b)
    if stored == torch.float32:  # records replayed in bfloat16 round the attention's output; float32 ones do not
        propagate(layer, plain, call, cpu, torch.float32)
        for a, b in zip(results[tmp_path], plain):
            assert torch.equal(a, b)


@pytest.mark.parametrize("done", [set(), set(GROUPS[2])])
def test_kept_inputs_need_every_earlier_linear_quantized(done, tmp_path):
    """Kept inputs are reused only if nothing before them can still change: not without true-sequential stages,
    and not while the attention (before the MLP) is unquantized, even with gate/up done."""
    layer, batches, call = _llama_layer_and_batches()
    memo = BlockMemo(layer, groups=GROUPS, hidden_size=32, spill_dir=tmp_path)
    collect_hessians(layer, GROUPS, batches, call, torch.device("cpu"), torch.float32, memo, done=done)
    assert memo.seeds == {}


@pytest.mark.parametrize("failing", ["create", "append", "take"])
def test_a_failing_scratch_file_reruns_the_block(failing, tmp_path, monkeypatch, caplog):
    """A full or broken disk costs time (the MLP runs for real), never the run or its result."""
    from quantkit.memory import spill

    layer, batches, call = _llama_layer_and_batches()
    cpu, before_down = torch.device("cpu"), set(GROUPS[0]) | set(GROUPS[1]) | set(GROUPS[2])
    expected = ActivationsInMemory(b.clone() for b in batches)
    propagate(layer, expected, call, cpu, torch.float32)
    calls = []
    original = getattr(spill.KeptOnDisk, "__init__" if failing == "create" else failing)

    def fail_on_second(self, *args):
        calls.append(1)
        if len(calls) == (1 if failing == "create" else 2):
            raise OSError(28, "No space left on device")
        return original(self, *args)
    monkeypatch.setattr(spill.KeptOnDisk, "__init__" if failing == "create" else failing, fail_on_second)
    memo = BlockMemo(layer, groups=GROUPS, hidden_size=32, spill_dir=tmp_path)
    collect_hessians(layer, [GROUPS[3]], batches, call, cpu, torch.float32, memo, done=before_down)
    got = ActivationsInMemory(b.clone() for b in batches)
    propagate(layer, got, call, cpu, torch.float32, memo)
    assert "No space left on device" in caplog.text and memo.seeds == {}
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_the_exit_check_tolerates_sum_order_only():
    """A float32 kept input may round differently in the last bits (its sums run in another order), but a block
    that scales its exit Linear's output by even 1.001 is caught; 16-bit inputs are themselves rounded that much."""
    torch.manual_seed(0)
    kept = torch.randn(64, 4096)
    weight = torch.randn(64, 4096)
    derived = kept @ weight.t()
    reordered = (kept[:, :2048] @ weight[:, :2048].t()) + (kept[:, 2048:] @ weight[:, 2048:].t())
    assert not torch.equal(reordered, derived)
    assert block_outputs.is_exit_output(reordered, derived, kept)
    assert block_outputs.is_exit_output((derived, None), derived, kept)
    assert not block_outputs.is_exit_output(derived * 1.001, derived, kept)
    assert not block_outputs.is_exit_output((derived, torch.ones(1)), derived, kept)  # returns more than its output
    assert block_outputs.is_exit_output(derived * 1.001, derived, kept.to(torch.bfloat16))


@pytest.mark.parametrize("extra_after_exit", [False, True])
def test_blocks_checked_derivable_once_never_run_again(extra_after_exit, tmp_path):
    """`derivable_blocks` checks on one sample that the attention returns o_proj's output and the MLP
    down_proj's; with that, the real blocks do not run at all when their outputs come from kept inputs (not even
    for a first-batch comparison), and the outputs are the checked-per-batch memo's bit for bit. An attention
    that scales o_proj's output is not derivable and runs for real."""
    layer, batches, call = _llama_layer_and_batches()
    cpu, attention = torch.device("cpu"), set(GROUPS[0]) | set(GROUPS[1])
    if extra_after_exit:  # a hook, not a patched forward: the memo swaps the forward in and out
        layer.self_attn.register_forward_hook(lambda mod, inp, out: (out[0] * 2, None))
    derivable = probes.derivable_blocks(layer, GROUPS, batches[0][:1], call, cpu, torch.float32)
    assert derivable == ({"mlp": None} if extra_after_exit else {"self_attn": (None,), "mlp": None})
    results, runs = {}, []
    for checked in (None, derivable):
        memo = BlockMemo(layer, groups=GROUPS, hidden_size=32, spill_dir=tmp_path, derivable=checked)
        hooks = [layer.self_attn.q_proj.register_forward_hook(lambda *a, c=checked: runs.append((c is None, "attn"))),
                 layer.mlp.gate_proj.register_forward_hook(lambda *a, c=checked: runs.append((c is None, "mlp")))]
        got = ActivationsInMemory(b.clone() for b in batches)
        collect_hessians(layer, [GROUPS[1]], got, call, cpu, torch.float32, memo, done=set(GROUPS[0]))
        runs.clear()
        collect_hessians(layer, [GROUPS[2]], got, call, cpu, torch.float32, memo, done=attention)
        collect_hessians(layer, [GROUPS[3]], got, call, cpu, torch.float32, memo, done=attention | set(GROUPS[2]))
        propagate(layer, got, call, cpu, torch.float32, memo)
        for h in hooks:
            h.remove()
        results[checked is None] = (got, list(runs))
        runs.clear()
    per_batch, checked_once = results[True], results[False]
    for a, b in zip(per_batch[0], checked_once[0]):
        assert torch.equal(a, b)
    def count(runs, block):
        return sum(1 for _, b in runs if b == block)
    # gate/up stage: the per-batch memo runs the attention for batch 0's comparison (which a hook outside the
    # block's forward does not change); the checked one never, or on every batch if the check failed
    assert count(per_batch[1], "attn") == 1
    assert count(checked_once[1], "attn") == (3 if extra_after_exit else 0)
    # down_proj stage: gate/up run on every batch (they feed its Hessian); the propagation adds one for the check
    assert count(per_batch[1], "mlp") == 3 + 1
    assert count(checked_once[1], "mlp") == 3
