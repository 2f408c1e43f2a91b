"""Kill a real quantize subprocess (SIGKILL) at several points, rerun the same command, and get the same bytes."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_model

from quantkit.source.hub import cache_id

pytestmark = pytest.mark.slow
REPO_ID = "test/tiny-resume"
ARGS = ["--samples", "8", "--seq-len", "32", "--group-size", "32"]


@pytest.fixture(scope="module")
def tiny4(tiny_tokenizer, tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny4"), tiny_tokenizer, layers=4)


def quantize(model_dir: Path, cache: Path, *extra: str, kill_at: str | None = None,
             prefetch: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    env.pop("QUANTKIT_KILL_AT", None)
    env.pop("QUANTKIT_PREFETCH", None)
    if kill_at:
        env["QUANTKIT_KILL_AT"] = kill_at
    if prefetch:  # the GPU's default, on the CPU
        env["QUANTKIT_PREFETCH"] = "1"
    cmd = [sys.executable, "-m", "quantkit", "quantize", str(model_dir), *ARGS, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def published(cache: Path) -> dict[str, str] | None:
    """sha256 of every file of the published revision, or None when nothing looks published."""
    folder = cache / ("models--" + REPO_ID.replace("/", "--"))
    ref = folder / "refs" / "main"
    if not ref.is_file():
        return None
    return _file_hashes(folder / "snapshots" / ref.read_text())


@pytest.fixture(scope="module")
def reference(tiny4, tmp_path_factory) -> dict[str, str]:
    """An uninterrupted run; a second one gives the same bytes (determinism)."""
    hashes = []
    for _ in range(2):
        cache = tmp_path_factory.mktemp("hub")
        r = quantize(tiny4, cache, "--repo-id", REPO_ID)
        assert r.returncode == 0, r.stderr[-2000:]
        hashes.append(published(cache))
    assert hashes[0] == hashes[1] and hashes[0] is not None
    return hashes[0]


@pytest.mark.parametrize("kill_at", ["layer:0:start", "layer:1:solved", "layer:2:saved", "layer:3:saved",
                                     "assembled", "publish:blobs", "publish:ref"])
def test_killed_run_resumes_to_identical_files(kill_at, tiny4, reference, tmp_path):
    cache = tmp_path / "hub"
    killed = quantize(tiny4, cache, "--repo-id", REPO_ID, kill_at=kill_at)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert published(cache) is None  # nothing looks complete

    work = tmp_path / "quantkit-work" / f".{REPO_ID.replace('/', '--')}.{cache_id(cache)}.quantkit-work"
    done = json.loads((work / "state" / "state.json").read_text())["layers"] if (work / "state" / "state.json").exists() else []
    expected_done = {"layer:0:start": 0, "layer:1:solved": 1, "layer:2:saved": 3}.get(kill_at, 4)
    assert len(done) == expected_done

    resumed = quantize(tiny4, cache, "--repo-id", REPO_ID)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    if expected_done:
        assert f"resuming after layer {expected_done}/4" in resumed.stderr
    assert published(cache) == reference
    assert not work.exists()  # finished: the work directory is gone


@pytest.mark.parametrize("kill_at", [None, "layer:2:saved"])
def test_layers_read_ahead_write_the_same_bytes_and_base_records(kill_at, tiny4, reference, tmp_path):
    """Each next layer's base tensors read and hashed on a background thread while the current layer computes (a
    GPU run's default, forced here): the same published files as reading each layer when it starts, through a
    kill and resume too, and the same record of which base tensors each finished layer came from."""
    def killed_state(prefetch: bool) -> list[dict]:
        cache = tmp_path / f"hub-{prefetch}"
        assert quantize(tiny4, cache, "--repo-id", REPO_ID, kill_at=kill_at, prefetch=prefetch).returncode == -9
        work = tmp_path / "quantkit-work" / f".{REPO_ID.replace('/', '--')}.{cache_id(cache)}.quantkit-work"
        return [step["base"] for step in json.loads((work / "state" / "state.json").read_text())["steps"]]

    cache = tmp_path / "hub"
    if kill_at:
        bases = killed_state(True)
        assert bases == killed_state(False) and len(bases) == 3 and all(bases)
        cache = tmp_path / "hub-True"
    r = quantize(tiny4, cache, "--repo-id", REPO_ID, prefetch=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert published(cache) == reference


def test_a_killed_gptaq_run_resumes_to_identical_files(tiny4, tmp_path):
    """GPTAQ carries the unquantized model's activations beside the quantized ones: both are saved with each
    layer, and a resumed run continues both streams where they were."""
    whole = quantize(tiny4, tmp_path / "whole", "--repo-id", REPO_ID, "--gptaq")
    assert whole.returncode == 0, whole.stderr[-2000:]
    cache = tmp_path / "hub"
    killed = quantize(tiny4, cache, "--repo-id", REPO_ID, "--gptaq", kill_at="layer:2:saved")
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = quantize(tiny4, cache, "--repo-id", REPO_ID, "--gptaq")
    assert resumed.returncode == 0 and "resuming after layer 3/4" in resumed.stderr, resumed.stderr[-2000:]
    assert published(cache) == published(tmp_path / "whole")


def test_resume_refuses_other_settings(tiny4, tmp_path):
    out = tmp_path / "q"
    killed = quantize(tiny4, tmp_path / "hub", "--out", str(out), kill_at="layer:2:saved")
    assert killed.returncode == -9
    other = quantize(tiny4, tmp_path / "hub", "--out", str(out), "--bits", "8")
    assert other.returncode == 1 and "holds an unfinished run of a different model, settings or calibration" in other.stderr
    assert not out.exists()
    again = quantize(tiny4, tmp_path / "hub", "--out", str(out))
    assert again.returncode == 0 and "resuming after layer 3/4" in again.stderr


def test_failed_run_says_where_its_work_is_kept(tiny4, tmp_path):
    out = tmp_path / "q"
    assert quantize(tiny4, tmp_path / "hub", "--out", str(out), kill_at="layer:1:saved").returncode == -9
    work = tmp_path / ".q.quantkit-work"
    assert (work / "state" / "state.json").is_file() and (work / "state" / "activations-00002.safetensors").is_file()
    assert sorted(p.name for p in (work / "state" / "layers").iterdir()) == ["layer-00000.safetensors",
                                                                             "layer-00001.safetensors"]


def test_out_of_space_stops_cleanly_keeps_work_and_resumes(tiny4, tmp_path, monkeypatch):
    import errno

    from click.testing import CliRunner

    import quantkit.run.resume as resume
    from quantkit.cli.app import cli

    real_write = resume.RunState.write_layer

    def full_disk_at_layer_2(self, index, *args, **kwargs):
        if index == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.layer_file(index)))
        return real_write(self, index, *args, **kwargs)

    monkeypatch.setattr(resume.RunState, "write_layer", full_disk_at_layer_2)
    out = tmp_path / "q"
    r = CliRunner().invoke(cli, ["quantize", str(tiny4), "--out", str(out), *ARGS])
    assert r.exit_code == 1 and "no space left on the device writing" in r.output and "GiB free now" in r.output
    assert "the same command continues" in r.output and not out.exists()
    work = tmp_path / ".q.quantkit-work"
    assert len(json.loads((work / "state" / "state.json").read_text())["layers"]) == 2

    monkeypatch.setattr(resume.RunState, "write_layer", real_write)
    r = CliRunner().invoke(cli, ["quantize", str(tiny4), "--out", str(out), *ARGS])
    assert r.exit_code == 0, r.output
    assert (out / "config.json").is_file() and not work.exists()


def test_second_run_on_the_same_target_is_refused(tiny4, tmp_path, monkeypatch):
    from filelock import FileLock

    from quantkit.write.publish import repo_lock

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with repo_lock(REPO_ID):  # as a running quantize of the same repo id holds it
        r = quantize(tiny4, cache, "--repo-id", REPO_ID)
    assert r.returncode == 1 and f"another quantkit run is writing {REPO_ID}" in r.stderr
    assert published(cache) is None

    work = tmp_path / ".q.quantkit-work"
    work.mkdir()
    with FileLock(str(work / ".lock")):
        r = quantize(tiny4, cache, "--out", str(tmp_path / "q"))
    assert r.returncode == 1 and "another quantkit run is writing" in r.stderr and not (tmp_path / "q").exists()


class _AlwaysInBackground:
    """pipeline.BackgroundSaves as a GPU run has it (saves on a worker thread, batches folded into new tensors)."""

    def __new__(cls, enabled):
        from quantkit.run.saves import BackgroundSaves

        return BackgroundSaves(enabled=True)


def test_background_saves_write_the_same_bytes(tiny4, tmp_path, monkeypatch):
    """A GPU run saves each layer while the next computes; a CPU run writes each layer's files at once and syncs
    them (its commit) while the next computes. Every saved file (the activations a resume starts from, too) and the
    output are those of a run whose saves end before the next layer starts, with the saves or commits held back
    so that the next layer is computing (and folding records into its inputs) meanwhile."""
    import time

    from quantkit.config import CalibSpec, QuantSpec
    from quantkit.run import pipeline
    from quantkit.run.resume import RunState

    write_layer = RunState.write_layer

    def run(out: Path, delay: float) -> tuple[dict, list[str]]:
        saved = []

        def recording_write(self, index, tensors, report, activations):
            commit = write_layer(self, index, tensors, report, activations)

            def recorded_commit():
                time.sleep(delay)
                commit()
                files = [self.layer_file(index), self.activations_file(index + 1)]
                saved.extend(hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file())
            return recorded_commit

        monkeypatch.setattr(RunState, "write_layer", recording_write)
        result = pipeline.quantize(str(tiny4), spec, calib, out=out)
        return _file_hashes(Path(result.path)), saved

    spec, calib = QuantSpec(bits=4, group_size=32), CalibSpec(samples=8, seq_len=32)
    immediate = run(tmp_path / "sync", delay=0)
    committed_behind = run(tmp_path / "behind", delay=0.5)  # the CPU's: the commit overlaps the next layer
    monkeypatch.setattr(pipeline, "BackgroundSaves", _AlwaysInBackground)
    background = run(tmp_path / "background", delay=0.5)  # the GPU's: the whole save overlaps the next layer
    assert len(immediate[1]) == 7  # 4 layers' tensors, the inputs of layers 1-3
    assert committed_behind == immediate and background == immediate


def test_state_on_disk_changes_only_when_a_layer_is_committed(tmp_path):
    """A layer written but not committed (a kill while its files sync) leaves the previous state on disk, which
    a resume continues from; its commit makes the files and state.json durable and deletes the used inputs."""
    import torch

    from quantkit.memory.spill import ActivationsInMemory
    from quantkit.run.resume import RunState

    work = tmp_path / "work"
    state = RunState(work, "fingerprint")

    def report(i: int) -> dict:
        return {"index": i, "seconds": 0.0, "losses": {}}

    state.save_layer(0, {"w": torch.ones(2)}, report(0), [ActivationsInMemory([torch.ones(2, 4)])])
    commit = state.write_layer(1, {"w": torch.zeros(2)}, report(1), [ActivationsInMemory([torch.zeros(2, 4)])])
    assert state.layers_done == 2
    before = RunState(work, "fingerprint")  # what a resume would find now
    assert before.layers_done == 1 and not state.layer_file(1).exists() and state.activations_file(1).is_file()
    commit()
    after = RunState(work, "fingerprint")
    assert after.layers_done == 2 and state.layer_file(1).is_file()
    assert state.activations_file(2).is_file() and not state.activations_file(1).exists()


@pytest.mark.parametrize("where", ["commit", "background save"])
def test_a_failed_background_save_fails_the_run_and_keeps_its_work(where, tiny4, tmp_path, monkeypatch):
    """A save that fails on the worker thread (a CPU run's commit, a GPU run's whole save) fails the run with
    its one-line reason at the next layer, and the layers committed before it stay for a resume."""
    from quantkit.config import CalibSpec, QuantSpec
    from quantkit.run import pipeline
    from quantkit.run.resume import RunState

    write_layer = RunState.write_layer

    def full_disk_at_layer_2(self, index, *args):
        commit = write_layer(self, index, *args)

        def failing_commit():
            if index == 2:
                raise OSError(28, "No space left on device", "activations-00003.safetensors")
            commit()
        return failing_commit

    if where == "background save":
        monkeypatch.setattr(pipeline, "BackgroundSaves", _AlwaysInBackground)
    monkeypatch.setattr(RunState, "write_layer", full_disk_at_layer_2)
    work = tmp_path / "work"
    with pytest.raises(pipeline.QuantkitError, match="no space left"):
        pipeline.quantize(str(tiny4), QuantSpec(bits=4, group_size=32), CalibSpec(samples=8, seq_len=32),
                          out=tmp_path / "out", work_dir=work)
    state = json.loads(next(work.rglob("state.json")).read_text())
    assert [layer["index"] for layer in state["layers"]] == [0, 1]  # finished layers kept for a resume
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kept", ["memory", "disk"])
def test_saved_activations_are_a_safetensors_file_and_load_back_exactly(kept, tmp_path):
    """The inputs a resume starts from: written batch by batch (from disk, never all in memory), readable by
    safetensors itself, and read back into as many streams as were saved (GPTAQ saves two)."""
    import torch
    from safetensors.torch import load_file

    from quantkit.errors import QuantkitError
    from quantkit.memory.spill import ActivationsInMemory, ActivationsOnDisk
    from quantkit.run.resume import RunState

    torch.manual_seed(0)
    quantized = [torch.randn(2, 8, 4), torch.randn(1, 8, 4)]
    unquantized = [torch.randn(2, 8, 4), torch.randn(1, 8, 4)]

    def stream(batches):
        if kept == "memory":
            return ActivationsInMemory(batches)
        store = ActivationsOnDisk(tmp_path)
        for b in batches:
            store.append(b)
        return store

    state = RunState(tmp_path / "work", "fingerprint")
    state.save_layer(0, {"w": torch.ones(2)}, {"index": 0}, [stream(quantized), stream(unquantized)])
    saved = load_file(str(state.activations_file(1)))
    assert sorted(saved) == ["batch.00000", "batch.00001", "batch.00002", "batch.00003"]
    assert all(torch.equal(saved[f"batch.{i:05d}"], t) for i, t in enumerate(quantized + unquantized))

    streams = [stream([]), stream([])]
    state.load_activations(streams)
    assert [len(s) for s in streams] == [2, 2]
    assert all(torch.equal(got, want) for s, batches in zip(streams, (quantized, unquantized))
               for got, want in zip(s, batches))

    state.activations_file(1).write_bytes(state.activations_file(1).read_bytes()[:-8])  # cut short
    with pytest.raises(QuantkitError, match="is damaged .* remove .* to start over"):
        state.load_activations([[]])


def test_a_used_inputs_file_is_written_over_by_a_later_layers_and_never_through_a_link(tmp_path):
    """Each committed layer's own inputs file becomes the spare that a later layer's inputs are written over in
    place (the same size: no new pages to allocate); a link planted as the spare is replaced, never followed."""
    import torch
    from safetensors.torch import load_file

    from quantkit.memory.spill import ActivationsInMemory
    from quantkit.run.resume import RunState

    state = RunState(tmp_path / "work", "fingerprint")

    def save(i: int) -> None:
        state.save_layer(i, {"w": torch.full((2,), float(i))}, {"index": i, "seconds": 0.0, "losses": {}},
                         [ActivationsInMemory([torch.full((2, 4), float(i))])])

    save(0)
    save(1)  # layer 1's inputs (saved by layer 0) are used: they become the spare
    assert state.spare_file.is_file() and not state.activations_file(1).exists()
    spare_inode = state.spare_file.stat().st_ino
    save(2)
    assert state.activations_file(3).stat().st_ino == spare_inode  # written over, not a new file
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    state.spare_file.unlink(missing_ok=True)
    state.spare_file.symlink_to(victim)
    save(3)
    assert victim.read_bytes() == b"keep" and not state.activations_file(4).is_symlink()
    assert torch.equal(load_file(str(state.activations_file(4)))["batch.00000"], torch.full((2, 4), 3.0))
