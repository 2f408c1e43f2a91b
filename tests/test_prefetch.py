"""The next decoder layer read ahead on a background thread (run.prefetch, a GPU run's default) through its CPU
twin: the same tensors and base records as reading each layer when it starts, its errors where a direct read
raises them, and the pipeline reading every layer but the first ahead."""
import shutil
import threading

import pytest
import torch

from quantkit.config import CalibSpec, QuantSpec
from quantkit.errors import QuantkitError
from quantkit.run import layer as layer_module
from quantkit.run import pipeline
from quantkit.run.prefetch import LayerPrefetch, prefetch_wanted
from quantkit.run.resume import HashedReads
from quantkit.source.checkpoint import SafetensorsCheckpoint

NAMES = ["model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
         "model.layers.1.input_layernorm.weight"]


def test_tensors_read_ahead_equal_direct_reads_and_record_the_same_digests(tiny_llama_dir, monkeypatch):
    direct = HashedReads(SafetensorsCheckpoint(tiny_llama_dir))
    expected = {n: direct.get(n) for n in NAMES + ["model.norm.weight"]}
    threads = []
    get = SafetensorsCheckpoint.get
    monkeypatch.setattr(SafetensorsCheckpoint, "get",
                        lambda self, name: threads.append(threading.current_thread().name) or get(self, name))
    reads = HashedReads(SafetensorsCheckpoint(tiny_llama_dir))
    prefetch = LayerPrefetch(tiny_llama_dir, reads, pin=False)
    try:
        prefetch.start(1, NAMES)
        assert prefetch.reader(0) is reads  # nothing read ahead for layer 0: read directly
        reader = prefetch.reader(1)
        got = {n: reader.get(n) for n in NAMES + ["model.norm.weight"]}  # the last one was not read ahead
    finally:
        prefetch.close()
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert reads.digests == direct.digests
    assert threads[:len(NAMES)] == ["quantkit-prefetch_0"] * len(NAMES)  # read on the background thread
    assert threads[len(NAMES):] == [threading.current_thread().name]


def test_a_damaged_tensor_read_ahead_fails_where_and_as_the_direct_read_would(tiny_llama_dir, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_llama_dir, damaged)
    reads = HashedReads(SafetensorsCheckpoint(damaged))
    names = [n for n in reads.names() if n.startswith("model.layers.1.")]
    prefetch = LayerPrefetch(damaged, reads, pin=False)
    shard = damaged / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4096])  # cut short once both readers are open
    try:
        prefetch.start(1, names)  # no error yet: it surfaces when layer 1 starts
        with pytest.raises(QuantkitError) as ahead:
            prefetch.reader(1)
    finally:
        prefetch.close()
    with pytest.raises(QuantkitError) as direct:  # the run's own reader, opened before the damage as well
        for name in names:
            reads.get(name)
    assert str(ahead.value) == str(direct.value) and str(direct.value)


def test_the_setting_and_the_device_decide(monkeypatch):
    monkeypatch.delenv("QUANTKIT_PREFETCH", raising=False)
    assert prefetch_wanted(torch.device("cuda")) and not prefetch_wanted(torch.device("cpu"))


@pytest.mark.parametrize("setting,expected", [("1", True), ("0", False)])
def test_the_environment_overrides_the_device(monkeypatch, setting, expected):
    monkeypatch.setenv("QUANTKIT_PREFETCH", setting)
    assert prefetch_wanted(torch.device("cpu")) is expected and prefetch_wanted(torch.device("cuda")) is expected


def test_the_pipeline_reads_every_layer_after_the_first_ahead(tiny_tokenizer, tmp_path, monkeypatch):
    from conftest import make_tiny_model

    base = make_tiny_model(tmp_path / "base", tiny_tokenizer, layers=3)
    monkeypatch.setenv("QUANTKIT_PREFETCH", "1")
    started = []
    start = LayerPrefetch.start
    monkeypatch.setattr(LayerPrefetch, "start", lambda self, i, names: started.append((i, len(names))) or
                        start(self, i, names))
    assert layer_module.LayerPrefetch is LayerPrefetch
    pipeline.quantize(str(base), QuantSpec(bits=4, group_size=32), CalibSpec(samples=4, seq_len=32),
                      out=tmp_path / "out")
    assert [i for i, _ in started] == [1, 2]
    assert all(count == 9 for _, count in started)  # 7 Linears' weights and 2 norms per Llama layer
