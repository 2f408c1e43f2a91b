"""Peak memory must not grow with the model's depth: one decoder layer is in memory at a time."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import peak_rss_growth

from quantkit.tools.synthetic import shape_config, write_synthetic_checkpoint

# a Llama shape whose layers are big enough (50 MB each in float32) that holding several would show
SHAPE = dict(hidden_size=1024, intermediate_size=2752, num_attention_heads=8, num_key_value_heads=8, vocab_size=4096)


def _quantize_peak_rss_mb(model_dir, out, samples: int = 8, seq_len: int = 64) -> float:
    cmd = [sys.executable, "-m", "quantkit", "quantize", str(model_dir), "--out", str(out), "--json",
           "--samples", str(samples), "--seq-len", str(seq_len), "--group-size", "128", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)["peak_rss_mb"]


@pytest.mark.slow
def test_peak_rss_is_flat_in_depth(tmp_path):
    peaks = {}
    for layers in (2, 8):
        model = tmp_path / f"synthetic-{layers}"
        write_synthetic_checkpoint(model, shape_config("llama-2-7b", layers, **SHAPE), torch.bfloat16)
        peaks[layers] = _quantize_peak_rss_mb(model, tmp_path / f"q-{layers}")
    layer_mb = (4 * 1024 * 1024 + 3 * 1024 * 2752) * 4 / 2**20
    assert peaks[8] <= 1.15 * peaks[2], f"peak RSS grew with depth: {peaks} (one float32 layer is {layer_mb:.0f} MB)"


@pytest.mark.slow
def test_peak_rss_does_not_grow_with_the_calibration_set(tmp_path):
    """On a CPU the calibration activations wait in a scratch file between passes (the page cache holds them,
    not the process): 16 times the samples, one mini-batch in memory either way. Held in memory, the 120 extra
    samples alone would add 120 MB. (With glibc's heap serving a layer's temporaries, it grew with every
    mini-batch: heap.py.)"""
    model = tmp_path / "synthetic-2"
    write_synthetic_checkpoint(model, shape_config("llama-2-7b", 2, **SHAPE), torch.bfloat16)
    few = _quantize_peak_rss_mb(model, tmp_path / "q-few", samples=8, seq_len=512)
    many = _quantize_peak_rss_mb(model, tmp_path / "q-many", samples=128, seq_len=512)
    activations_mb = 128 * 512 * SHAPE["hidden_size"] * 2 / 2**20  # in the model's bfloat16: 128 MB
    assert many - few < activations_mb / 2, f"peak RSS {few:.0f} MB with 8 samples, {many:.0f} MB with 128"


def test_synthetic_checkpoint_has_the_shape_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    config = shape_config("llama-2-7b", 1, **SHAPE)
    size = write_synthetic_checkpoint(tmp_path / "m", config, torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    n_params = sum(p.numel() for p in model.parameters())
    assert size == n_params * 2 and model.config.num_hidden_layers == 1 and model.config.hidden_size == 1024
    assert model.model.layers[0].mlp.down_proj.weight.shape == (1024, 2752)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    with pytest.raises(Exception, match="not empty"):
        write_synthetic_checkpoint(tmp_path / "m", config)


def test_the_spent_hessian_and_float32_results_are_freed_before_packing(monkeypatch):
    """On a GPU, packing a 7B down_proj's codes while its spent Hessian (462 MB) and float32 result (172 MB) were
    still held set the layer's peak: 1171 MB against the 1158 MB of one layer's weights, Hessians and batch. The
    packing now sees neither; the modules hold the dequantized weights the packed tensors describe."""
    import weakref

    from quantkit.calibrate.statistics import Statistics
    from quantkit.config import QuantSpec
    from quantkit.run import solves
    from quantkit.run.ranks import Ranks
    from quantkit.write.gptq_format import dequantize_module

    torch.manual_seed(0)
    modules = {"a": torch.nn.Linear(128, 64, bias=False), "b": torch.nn.Linear(128, 32, bias=False)}
    x = torch.randn(512, 128)
    statistics = [Statistics(hessian=2 * x.T @ x / x.shape[0])]
    hessian_alive = weakref.ref(statistics[0].hessian)
    at_packing = []
    real_module_tensors = solves.module_tensors

    stacks = []  # the solver's float32 [N, K] stacks, which the results' weights are views of

    def spy(name, result, *args, **kwargs):
        at_packing.append((name, hessian_alive() is not None, result.weight is not None,
                           any(stack() is not None for stack in stacks)))
        return real_module_tensors(name, result, *args, **kwargs)

    def recorded(solver):
        def run(*args, **kwargs):
            results = solver(*args, **kwargs)
            first = results[0][0] if isinstance(results[0], list) else results[0]  # a batch's results share a stack
            stacks.append(weakref.ref(first.weight._base))
            return results
        return run

    monkeypatch.setattr(solves, "module_tensors", spy)
    monkeypatch.setattr(solves, "gptq_quantize_shared", recorded(solves.gptq_quantize_shared))
    monkeypatch.setattr(solves, "gptq_quantize_batched", recorded(solves.gptq_quantize_batched))
    spec = QuantSpec(bits=4, group_size=32)
    packed = solves.solve_stage(Ranks.single(), "model.layers.0.mlp", [["a", "b"]], statistics, modules, spec,
                                "gptq", lambda n: f"model.layers.0.mlp.{n}")
    assert at_packing == [("model.layers.0.mlp.a", False, False, False), ("model.layers.0.mlp.b", False, False, False)]
    experts = {f"{e}.{n}": torch.nn.Linear(128, 32, bias=False) for e in range(3) for n in ("gate", "up")}
    at_packing.clear()
    solves.solve_stage(Ranks.single(), "model.layers.0.mlp.experts", [[f"{e}.gate", f"{e}.up"] for e in range(3)],
                       [Statistics(2 * x.T @ x / x.shape[0], tokens=512) for _ in range(3)], experts, spec, "gptq",
                       lambda n: n, expert=True)
    assert len(stacks) == 2 and len(at_packing) == 6  # one batch of the three experts
    assert not any(any(seen[1:]) for seen in at_packing)
    for name, module in modules.items():
        t = {k.rsplit(".", 1)[1]: v for k, v in packed[name].tensors.items()}
        restored = dequantize_module(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, "gptq")
        torch.testing.assert_close(module.weight.data, restored, rtol=0, atol=1e-3)


def test_a_tensor_converted_for_the_output_is_read_a_block_of_rows_at_a_time(tmp_path):
    """The output's embeddings and norms are converted to float16 from the checkpoint's memory map a block of rows
    at a time, unmapped after each: get(name).to(float16) kept every page read through the mapping resident
    beside the copy (SmolLM2's 113 MB float32 embedding set a whole quantize run's peak as it was written out)."""
    from safetensors.torch import save_file

    from quantkit.source.checkpoint import SafetensorsCheckpoint

    emb = torch.randn(16384, 1024)  # 64 MB in float32
    save_file({"embed.weight": emb, "norm.weight": torch.ones(1024), "ids": torch.arange(7)},
              str(tmp_path / "model.safetensors"))
    checkpoint = SafetensorsCheckpoint(tmp_path)
    expected = emb.half()
    del emb
    assert torch.equal(checkpoint.get_as("norm.weight", torch.float16), torch.ones(1024, dtype=torch.float16))
    assert checkpoint.is_floating("embed.weight") and not checkpoint.is_floating("ids")
    got = []
    growth = peak_rss_growth(lambda: got.append(checkpoint.get_as("embed.weight", torch.float16)))
    assert torch.equal(got[0], expected)
    assert growth < 32 * 2**20 + 16 * 2**20, f"{growth / 2**20:.0f} MB for a 32 MB float16 result"


REUSE_WINDOW_PROBE = """
import json, resource, sys
import torch
from quantkit.memory import heap

def rss_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

if not heap.release_large_frees_at_once():  # as quantize() sets it
    print(json.dumps(None))
    sys.exit()
x = torch.ones(1024, 1536)  # a SmolLM2 MLP activation of a 1024-token mini-batch: 6 MiB

def faults_of_forty_temporaries():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(40):
        torch.mul(x, 2)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

torch.mul(x, 2)  # torch's one-time set-up of the operation (thread pool, dispatch) is not the window's
resident = rss_kb()
with heap.reusing_freed_memory(x.nbytes):
    torch.mul(x, 2)  # the first one is paid for
    inside = faults_of_forty_temporaries()
print(json.dumps({"inside": inside, "kept_after": rss_kb() - resident,
                  "fresh": 40 * x.nbytes // resource.getpagesize()}))  # forty fresh mappings fault once per page
"""


def test_the_reuse_window_keeps_freed_temporaries_for_the_next_batch_and_returns_them_after():
    """Within heap.reusing_freed_memory, a mini-batch's temporaries reuse the last one's memory (few page faults
    against one fault per page for fresh mappings), and what the window kept is handed back to the system after it.
    (After the window, whether a temporary is a fresh mapping or a free heap block whose pages were handed back
    depends on the heap's layout, which the rest of the process decides; either way nothing stays resident.)
    Measured in a fresh process: the test runner's own heap and threads, which earlier tests shape, would count."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's malloc only")
    found = json.loads(subprocess.run([sys.executable, "-c", REUSE_WINDOW_PROBE], capture_output=True, text=True,
                                      check=True).stdout)
    if found is None:
        pytest.skip("glibc's malloc only")
    inside, kept_after, fresh = found["inside"], found["kept_after"], found["fresh"]
    # the heap may grow a few times first, then serves every temporary from memory already faulted in
    assert inside < fresh / 4, f"{inside} page faults for 40 temporaries inside the window; fresh mappings: {fresh}"
    assert kept_after < 2 * 1024, f"{kept_after} kB still resident after the window"


def test_the_peak_rss_reported_is_the_process_own_not_the_parent_it_was_forked_from():
    """getrusage's ru_maxrss keeps the parent's size at fork through exec: quantize started from a large process
    (a test runner, a notebook) would report that process's memory as its own peak."""
    import subprocess
    import sys

    ballast = torch.ones(1536 * 2**20 // 4)  # 1.5 GiB resident in this process
    ballast += 1
    probe = "from quantkit.run.telemetry import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)
    del ballast
    assert child < 1000, child
