"""The streaming shard writer: valid safetensors that every loader reads back exactly, split at the size limit."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from quantkit.errors import QuantkitError
from quantkit.write.shards import ShardWriter, parse_size


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "a.half": torch.randn(3, 3, generator=g).half(),
        "a.bf16": torch.randn(9, generator=g).bfloat16(),
        "a.qweight": torch.randint(-2**31, 2**31 - 1, (4, 6), dtype=torch.int32, generator=g),
        "a.bytes": torch.randint(0, 255, (5,), dtype=torch.uint8, generator=g),
        "a.scalar": torch.tensor(3.5),
        "a.empty": torch.zeros(0, 4),
        "a.strided": torch.randn(6, 4, generator=g).t(),  # non-contiguous input
    }


def test_round_trip_exact_and_aligned(tmp_path):
    tensors = _tensors()
    w = ShardWriter(tmp_path, parse_size("1GB"))
    w.add(tensors)
    assert w.finish() == ["model-00001-of-00001.safetensors"]
    path = tmp_path / "model-00001-of-00001.safetensors"
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + header_len])
    assert (8 + header_len) % 8 == 0
    for name, info in header.items():
        if name != "__metadata__":
            assert info["data_offsets"][0] % tensors[name].element_size() == 0, name
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert not list(tmp_path.glob("*.spool-*"))
    assert w.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())


def test_shards_split_at_the_limit_and_index_names_every_tensor(tmp_path):
    w = ShardWriter(tmp_path, 1000)
    for i in range(5):
        w.add({f"l{i}.w": torch.full((100,), float(i))})  # 400 bytes each: two per shard
    names = w.finish()
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 2000
    for i in range(5):
        shard = index["weight_map"][f"l{i}.w"]
        assert torch.equal(load_file(tmp_path / shard)[f"l{i}.w"], torch.full((100,), float(i)))


def test_a_tensor_written_twice_is_refused(tmp_path):
    w = ShardWriter(tmp_path, 1000)
    w.add({"x": torch.zeros(2)})
    with pytest.raises(QuantkitError, match="written twice"):
        w.add({"x": torch.zeros(2)})
