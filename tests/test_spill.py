"""Tensors kept for a later pass: exact round trips through memory or an unlinked scratch file."""
import sys

import pytest
import torch

from quantkit.spill import KeptInMemory, KeptOnDisk, disk_has_room


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


def test_disk_room_keeps_as_much_free_for_the_output(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 40, 60))
    assert disk_has_room(tmp_path, 30)
    assert not disk_has_room(tmp_path, 31)
    monkeypatch.undo()
    assert not disk_has_room(tmp_path / "missing", 1)
