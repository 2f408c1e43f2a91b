"""Tensors kept on disk: exact round trips through memory or an unlinked scratch file, for inputs kept for a later
pass and for the calibration activations themselves."""
import sys

import pytest
import torch

from quantkit.memory.spill import (
    ActivationsOnDisk,
    KeptInMemory,
    KeptOnDisk,
    ScratchFiles,
    disk_has_room,
)


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_kept_tensors_come_back_bit_for_bit_in_any_order(store, tmp_path):
    kept = KeptInMemory() if store == "memory" else KeptOnDisk(tmp_path)
    torch.manual_seed(0)
    originals = [torch.randn(3, 5, 7), torch.randn(2, 4).to(torch.bfloat16), torch.randn(6, 8).t(),  # not contiguous
                 torch.randint(-9, 9, (4,), dtype=torch.int64), torch.empty(0, 3)]
    for t in originals:
        kept.append(t if store == "disk" else t.clone())
    assert len(kept) == len(originals)
    for i in [2, 0, 4, 1, 3]:
        got = kept.take(i)
        assert got.dtype == originals[i].dtype and got.shape == originals[i].shape
        assert torch.equal(got, originals[i])
    with pytest.raises(RuntimeError, match="already taken"):
        kept.take(0)
    kept.close()


@pytest.mark.skipif(sys.platform != "linux", reason="O_TMPFILE: the file never has a name")
def test_the_scratch_file_has_no_name_and_is_gone_after_close(tmp_path):
    kept = KeptOnDisk(tmp_path)
    kept.append(torch.ones(1024))
    assert list(tmp_path.iterdir()) == []  # unlinked at once: a crash leaves nothing behind
    kept.close()


def test_activations_on_disk_behave_like_a_list_of_batches(tmp_path):
    torch.manual_seed(0)
    batches = [torch.randn(4, 16, 8), torch.randn(4, 16, 8), torch.randn(2, 16, 8)]  # a short last batch
    store = ActivationsOnDisk(tmp_path)
    for b in batches:
        store.append(b)
    assert len(store) == 3 and list(tmp_path.iterdir()) == []
    assert all(torch.equal(got, want) for got, want in zip(store, batches))
    assert [store.meta(i) for i in range(3)] == [(b.shape, b.dtype) for b in batches]

    read = store[1]
    read.add_(1.0)  # a read is a copy: changing it changes nothing on disk
    assert torch.equal(store[1], batches[1])
    store[1] = read  # until it is written back, in place: the other batches stay as they were
    assert torch.equal(store[1], batches[1] + 1.0)
    assert torch.equal(store[0], batches[0]) and torch.equal(store[2], batches[2])

    with pytest.raises(ValueError, match=r"batch 2 is \(2, 16, 8\) torch.float32 on disk"):
        store[2] = torch.zeros(4, 16, 8)
    with pytest.raises(ValueError, match="torch.bfloat16"):
        store[0] = batches[0].to(torch.bfloat16)
    store.close()


def test_activations_on_disk_keep_16_bit_batches_exactly(tmp_path):
    store = ActivationsOnDisk(tmp_path)
    batch = torch.randn(3, 5, 7).to(torch.bfloat16)
    store.append(batch)
    store[0] = batch * 2
    assert store[0].dtype == torch.bfloat16 and torch.equal(store[0], batch * 2)
    store.close()


def test_disk_room_keeps_as_much_free_for_the_output(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 40, 60))
    assert disk_has_room(tmp_path, 30)
    assert not disk_has_room(tmp_path, 31)
    monkeypatch.undo()
    assert not disk_has_room(tmp_path / "missing", 1)


def test_a_layer_after_another_rewrites_the_same_scratch_file_in_place(tmp_path):
    """Each layer's kept inputs go to files the previous layer handed back: no new file per layer (a new file's
    pages are allocated by the file system, about 15 times slower to write here than overwriting cached ones),
    and what each layer reads back is its own."""
    import os

    pool = ScratchFiles(tmp_path)
    seen = []
    for layer in range(3):
        kept = [KeptOnDisk(pool), KeptOnDisk(pool)]  # o_proj's and down_proj's inputs
        seen.append({os.fstat(k._file.fileno()).st_ino for k in kept})
        batches = [[torch.randn(4, 8) + layer for _ in range(3)] for _ in kept]
        for k, bs in zip(kept, batches):
            for b in bs:
                k.append(b)
        for k, bs in zip(kept, batches):
            assert all(torch.equal(k.take(i), b) for i, b in reversed(list(enumerate(bs))))
            k.close()
    assert seen[0] == seen[1] == seen[2] and len(seen[0]) == 2
    assert pool.held_bytes() == 2 * 3 * 4 * 8 * 4
    assert os.listdir(tmp_path) == []  # unlinked: nothing is left behind, even by a crash
    pool.close()


def test_a_pools_files_count_as_room_on_the_disk(tmp_path, monkeypatch):
    import shutil

    pool = ScratchFiles(tmp_path)
    kept = KeptOnDisk(pool)
    kept.append(torch.zeros(10, dtype=torch.uint8))
    kept.close()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 50, 50))
    assert disk_has_room(pool, 30) and not disk_has_room(tmp_path, 30)  # 50 free + 10 held >= 2 x 30
    assert not disk_has_room(pool, 31)
    pool.close()
