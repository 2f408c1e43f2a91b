"""The hub cache and --out are untrusted: nothing quantkit deletes or reads lies outside its own folders, damaged
entries give one `Error:` line (`cache list` lists the intact ones first), and two real runs on one target never mix."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantkit.cli.app import cli
from quantkit.source import hub
from quantkit.write import publish as publishing

REV = "0123456789abcdef0123456789abcdef01234567"
FAST = ["--method", "rtn", "--group-size", "32"]
QCONFIG = {"model_type": "llama", "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32,
                                                          "sym": True}}


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def error_lines(r) -> list[str]:
    return [line for line in r.output.splitlines() if line.startswith("Error:")]


def tree(path: Path) -> dict[str, str]:
    """Every entry under path (links not followed): file sha256, link target or 'dir' (a decoy's fingerprint)."""
    state = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = Path(root) / name
            rel = str(p.relative_to(path))
            state[rel] = ("link:" + os.readlink(p) if p.is_symlink() else "dir" if p.is_dir()
                          else hashlib.sha256(p.read_bytes()).hexdigest())
    return state


def victim(tmp_path: Path) -> Path:
    """A folder outside the cache that must survive every command below untouched."""
    v = tmp_path / "victim"
    (v / "refs").mkdir(parents=True)
    (v / "refs" / "main").write_text(REV)
    (v / "precious.txt").write_text("keep me")
    (v / "snapshots").mkdir()
    return v


def fake_repo(cache: Path, repo_id: str, files: dict[str, bytes], revision: str = REV) -> Path:
    """A repo folder laid out like huggingface_hub's: blobs, a snapshot of links to them, refs/main."""
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (folder / "blobs").mkdir()
    (folder / "refs").mkdir()
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (folder / "blobs" / digest).write_bytes(data)
        (snapshot / name).symlink_to(f"../../blobs/{digest}")
    (folder / "refs" / "main").write_text(revision)
    return folder


def quantized_repo(cache: Path, repo_id: str, revision: str = REV) -> Path:
    return fake_repo(cache, repo_id, {"config.json": json.dumps(QCONFIG).encode()}, revision)


# ---------------------------------------------------------------- 1. refs/main is a revision, never a path
@pytest.mark.parametrize("ref", ["absolute", "relative", b"\xff\xfe", "link"])
def test_a_refs_main_that_is_not_a_revision_is_refused_and_deletes_nothing(ref, tiny_llama_dir, hub_cache,
                                                                            tmp_path):
    v = victim(tmp_path)
    before = tree(v)
    folder = hub_cache / "models--test--t"
    (folder / "snapshots").mkdir(parents=True)
    (folder / "refs").mkdir()
    main = folder / "refs" / "main"
    if ref == "link":
        main.symlink_to(v / "refs" / "main")
    elif isinstance(ref, bytes):
        main.write_bytes(ref)
    else:
        main.write_text(str(v) if ref == "absolute" else "../../../victim")
    r = run("quantize", tiny_llama_dir, "--repo-id", "test/t", "--overwrite", *FAST)
    assert r.exit_code == 1
    [line] = error_lines(r)
    assert str(main) in line and "`quantkit cache rm` removes the damaged entry" in line
    assert any(phrase in line for phrase in ("does not hold a revision", "is not UTF-8", "is a symbolic link"))
    assert tree(v) == before


# ---------------------------------------------------------------- 2. the blob sweep never follows a link
def test_publishing_refuses_a_linked_blobs_folder_and_the_victim_keeps_its_files(tiny_llama_dir, hub_cache,
                                                                                  tmp_path):
    folder = quantized_repo(hub_cache, "test/t")
    v = victim(tmp_path)
    for blob in (folder / "blobs").iterdir():
        shutil.move(blob, v / blob.name)
    (folder / "blobs").rmdir()
    (folder / "blobs").symlink_to(v)
    before = tree(v)
    r = run("quantize", tiny_llama_dir, "--repo-id", "test/t", "--overwrite", *FAST)
    assert r.exit_code == 1
    assert error_lines(r) == [f"Error: hub cache folder {folder / 'blobs'} is a symbolic link; quantkit does not "
                              "write or delete through links"]
    assert tree(v) == before and not (hub_cache.parent / "quantkit-work").exists()  # refused before any work


def test_the_sweep_deletes_only_unused_regular_files_directly_in_blobs(hub_cache, tmp_path):
    v = victim(tmp_path)
    before = tree(v)

    def publish(name: str, data: bytes) -> Path:
        staging = tmp_path / f"staging-{name}"
        staging.mkdir()
        (staging / name).write_bytes(data)
        return publishing.publish_snapshot(staging, "test/t", {name: hashlib.sha256(data).hexdigest()})

    first = publish("a.txt", b"first")
    blobs = hub_cache / "models--test--t" / "blobs"
    (blobs / "planted-link").symlink_to(v / "precious.txt")
    (blobs / "planted-dir").mkdir()
    (blobs / "planted-dir" / "inside").write_text("x")
    second = publish("b.txt", b"second")
    assert first != second and not first.exists() and (second / "b.txt").read_bytes() == b"second"
    assert sorted(p.name for p in blobs.iterdir()) == sorted(
        [hashlib.sha256(b"second").hexdigest(), "planted-link", "planted-dir"])
    assert (blobs / "planted-dir" / "inside").is_file() and tree(v) == before


def test_a_republished_revision_is_rebuilt_when_its_snapshot_was_altered(hub_cache, tmp_path):
    v = victim(tmp_path)

    def publish() -> Path:
        staging = tmp_path / "staging"
        staging.mkdir(exist_ok=True)
        (staging / "config.json").write_text("{}")
        return publishing.publish_snapshot(staging, "test/t", {"config.json": hashlib.sha256(b"{}").hexdigest()})

    snapshot = publish()
    (snapshot / "config.json").unlink()
    (snapshot / "config.json").symlink_to(v / "precious.txt")  # a file from elsewhere, under the same revision
    (snapshot / "extra.txt").write_text("planted")
    assert publish() == snapshot
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json"]
    assert (snapshot / "config.json").read_text() == "{}" and (v / "precious.txt").read_text() == "keep me"


# ---------------------------------------------------------------- 3. cache rm never deletes through a link
def test_cache_rm_refuses_a_linked_repo_folder(hub_cache, tmp_path):
    v = victim(tmp_path)
    before = tree(v)
    (hub_cache / "models--test--t").symlink_to(v)
    r = run("cache", "rm", "test/t", "--yes")
    assert r.exit_code == 1
    assert error_lines(r) == [f"Error: hub cache folder of test/t {hub_cache / 'models--test--t'} is a symbolic "
                              "link; quantkit does not write or delete through links"]
    assert tree(v) == before and (hub_cache / "models--test--t").is_symlink()


def test_cache_rm_removes_a_linked_refs_folder_as_a_link(hub_cache, tmp_path):
    v = victim(tmp_path)
    before = tree(v)
    folder = quantized_repo(hub_cache, "test/t")
    shutil.rmtree(folder / "refs")
    (folder / "refs").symlink_to(v / "refs")
    r = run("cache", "rm", "test/t", "--yes")
    assert r.exit_code == 0, r.output
    assert not folder.exists() and not folder.is_symlink() and tree(v) == before


# ---------------------------------------------------------------- 4. a cached model is read from its repo folder
@pytest.mark.parametrize("how", ["snapshot", "snapshots"])
def test_a_snapshot_leading_outside_its_repo_folder_is_refused(how, tiny_llama_dir, hub_cache, tmp_path):
    folder = hub_cache / "models--test--t"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(REV)
    if how == "snapshot":  # snapshots/<rev> is a link to a model elsewhere
        (folder / "snapshots").mkdir()
        (folder / "snapshots" / REV).symlink_to(tiny_llama_dir)
    else:                  # snapshots/ itself is a link to a folder holding one
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / REV).symlink_to(tiny_llama_dir)
        (folder / "snapshots").symlink_to(tmp_path / "elsewhere")
    r = run("inspect", "test/t")
    assert r.exit_code == 1
    [line] = error_lines(r)
    assert line.startswith(f"Error: refs/main of {folder}: 'snapshots/{REV}' leads outside {folder}")


# ---------------------------------------------------------------- 5. one repo id, one cache folder
@pytest.mark.parametrize("repo_id", ["a/b--c", "a--b/c"])
def test_repo_ids_with_a_double_dash_are_refused(repo_id, tiny_llama_dir, hub_cache):
    for args in (["quantize", tiny_llama_dir, "--repo-id", repo_id, *FAST], ["cache", "rm", repo_id, "--yes"]):
        r = run(*args)
        assert r.exit_code == 1
        [line] = error_lines(r)
        assert line.startswith(f"Error: invalid repo id {repo_id!r}: use NAMESPACE/NAME") and "no '--'" in line
    assert sorted(p.name for p in hub_cache.iterdir() if p.name != ".locks") == []


# ---------------------------------------------------------------- 6. races: real concurrent runs
def _start(model: Path, cache: Path, *extra: str, wait_at: str | None = None,
           wait_file: Path | None = None) -> subprocess.Popen:
    """A real `python -m quantkit quantize` run, held at wait_at (faults.wait_point) until wait_file is deleted."""
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    for key in ("QUANTKIT_KILL_AT", "QUANTKIT_WAIT_AT", "QUANTKIT_WAIT_FILE"):
        env.pop(key, None)
    if wait_at:
        env.update(QUANTKIT_WAIT_AT=wait_at, QUANTKIT_WAIT_FILE=str(wait_file))
    cmd = [sys.executable, "-m", "quantkit", "quantize", str(model), *FAST, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


def _held(proc: subprocess.Popen, wait_file: Path) -> None:
    """Until the run has reached its wait point (it created wait_file); fails at once if it ends instead."""
    deadline = time.monotonic() + 120
    while not wait_file.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before its wait point: {proc.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, "the run never reached its wait point"
        time.sleep(0.05)


def _finish(proc: subprocess.Popen, wait_file: Path) -> tuple[int, str]:
    wait_file.unlink()
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def test_two_real_runs_on_one_target(tiny_llama_dir, tmp_path):
    """A holds the target; B on the same target is refused without touching A's work; C, checked before A
    published, is refused under the lock once A has; D, the same repo id in another cache under the same parent,
    has its own work directory and lock and runs beside A."""
    cache, other_cache = tmp_path / "hub", tmp_path / "hub2"
    work_root = tmp_path / "quantkit-work"
    a_wait, c_wait = tmp_path / "a.wait", tmp_path / "c.wait"
    a = _start(tiny_llama_dir, cache, "--repo-id", "test/race", wait_at="target:locked", wait_file=a_wait)
    procs = [a]
    try:
        _held(a, a_wait)
        [a_work] = work_root.iterdir()
        assert a_work.name == f".test--race.{hub.cache_id(cache)}.quantkit-work"
        assert (work_root.stat().st_mode & 0o777, a_work.stat().st_mode & 0o777) == (0o700, 0o700)
        (a_work / "marker").write_text("A's")
        before = tree(a_work)

        b = _start(tiny_llama_dir, cache, "--repo-id", "test/race")
        procs.append(b)
        _, b_err = b.communicate(timeout=300)
        assert b.returncode == 1
        lock = cache / ".locks" / "quantkit" / "models--test--race.lock"
        assert _errors(b_err) == [f"Error: another quantkit run is writing test/race (lock {lock}); wait for it to "
                                  "finish"]
        assert tree(a_work) == before and not (cache / "models--test--race" / "refs").exists()

        d = _start(tiny_llama_dir, other_cache, "--repo-id", "test/race")
        procs.append(d)
        _, d_err = d.communicate(timeout=300)
        assert d.returncode == 0, d_err[-2000:]
        assert _snapshot(other_cache, "test/race").is_dir()
        assert tree(a_work) == before and not (cache / "models--test--race" / "refs").exists()

        c = _start(tiny_llama_dir, cache, "--repo-id", "test/race", wait_at="target:locking", wait_file=c_wait)
        procs.append(c)
        _held(c, c_wait)
        a_rc, a_err = _finish(a, a_wait)
        assert a_rc == 0, a_err[-2000:]
        c_rc, c_err = _finish(c, c_wait)
        assert c_rc == 1
        assert _errors(c_err) == [f"Error: test/race already exists in the hub cache "
                                  f"({_snapshot(cache, 'test/race')}); pass --overwrite to replace it"]
        assert not work_root.exists()  # every run finished: no work left behind
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def _snapshot(cache: Path, repo_id: str) -> Path:
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    return folder / "snapshots" / (folder / "refs" / "main").read_text()


def test_work_directories_are_keyed_on_the_cache(tiny_llama_dir, tmp_path, monkeypatch):
    from quantkit.config import QuantSpec
    from quantkit.run.target import Target as _Target

    works = []
    for name in ("hub", "hub2"):
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / name))
        works.append(_Target("m", tiny_llama_dir, QuantSpec(), "test/t", None, False, None).work)
    assert works[0].parent == works[1].parent == tmp_path / "quantkit-work" and works[0] != works[1]


@pytest.mark.parametrize("damage", ["group-writable", "other-user", "link"])
def test_a_work_root_another_user_could_control_is_refused(damage, tiny_llama_dir, hub_cache, tmp_path):
    root = tmp_path / "quantkit-work"
    if damage == "link":
        (tmp_path / "elsewhere").mkdir()
        root.symlink_to(tmp_path / "elsewhere")
    else:
        root.mkdir()
        if damage == "group-writable":
            root.chmod(0o777)
        else:
            if os.getuid() != 0:
                pytest.skip("needs root to make a folder owned by another user")
            os.chown(root, 65534, 65534)
    r = run("quantize", tiny_llama_dir, "--repo-id", "test/t", *FAST)
    assert r.exit_code == 1
    [line] = error_lines(r)
    assert line.startswith(f"Error: quantkit's work folder {root} ")
    assert {"group-writable": "is writable by other users", "other-user": "belongs to another user",
            "link": "is a symbolic link"}[damage] in line
    assert not (hub_cache / "models--test--t").exists()


def test_an_out_work_directory_another_user_owns_is_refused(tiny_llama_dir, tmp_path):
    if os.getuid() != 0:
        pytest.skip("needs root to make a folder owned by another user")
    work = tmp_path / ".q.quantkit-work"
    work.mkdir()
    os.chown(work, 65534, 65534)
    r = run("quantize", tiny_llama_dir, "--out", tmp_path / "q", *FAST)
    assert r.exit_code == 1
    assert error_lines(r) == [f"Error: work directory {work} belongs to another user (uid 65534); remove it or use "
                              "another location"]
    assert not (tmp_path / "q").exists()


# ---------------------------------------------------------------- 7. --out never replaces what quantkit did not write
@pytest.fixture()
def own_model(tiny_llama_dir, tmp_path) -> Path:
    """A copy of the tiny model that a run may be pointed at destructively."""
    model = tmp_path / "models" / "base"
    shutil.copytree(tiny_llama_dir, model)
    return model


@pytest.mark.parametrize("where, phrase", [
    ("model", "is the base model's directory or holds it"),
    ("model-parent", "is the base model's directory or holds it"),
    ("cwd", "is the current directory or holds it"),
    ("cwd-parent", "is the current directory or holds it"),
    ("root", "is the filesystem root"),
    ("home", "is a non-empty directory that quantkit did not write (no quantkit.json in it)"),
])
def test_out_that_would_destroy_something_else_is_refused_before_any_work(where, phrase, own_model, tmp_path,
                                                                          monkeypatch):
    home = tmp_path / "home"
    (home / "notes").mkdir(parents=True)
    (home / "notes" / "todo.txt").write_text("mine")
    cwd = tmp_path / "cwd" / "here"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    out = {"model": own_model, "model-parent": own_model.parent, "cwd": Path("."), "cwd-parent": Path(".."),
           "root": Path("/"), "home": home}[where]
    before = tree(tmp_path)
    r = run("quantize", own_model, "--out", out, "--overwrite")  # gptq: a calibration would start after the checks
    assert r.exit_code == 1
    [line] = error_lines(r)
    assert line.startswith(f"Error: --out {out} {phrase}")
    assert tree(tmp_path) == before  # nothing written: not even a work directory


def test_out_written_by_quantkit_is_replaced_atomically_with_overwrite(tiny_llama_dir, tmp_path, monkeypatch):
    import quantkit.run.target as target

    out = tmp_path / "q"
    assert run("quantize", tiny_llama_dir, "--out", out, *FAST).exit_code == 0
    r = run("quantize", tiny_llama_dir, "--out", out, *FAST)
    assert r.exit_code == 1 and "already exists and is not empty; pass --overwrite" in error_lines(r)[0]
    synced = []
    monkeypatch.setattr(target, "fsync_dir", lambda p: synced.append(Path(p)))
    r = run("quantize", tiny_llama_dir, "--out", out, "--overwrite", "--bits", "8", *FAST)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "quantkit.json").read_text())["quantization"]["bits"] == 8
    assert tmp_path in synced and out in synced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # the old one and the work directory are gone


# ---------------------------------------------------------------- 8. durability of a publish
def test_publish_fsyncs_blobs_ref_and_renamed_directories(hub_cache, tmp_path, monkeypatch):
    files, synced = [], []
    monkeypatch.setattr(publishing, "fsync_file", lambda p: files.append(Path(p)))
    monkeypatch.setattr(publishing, "fsync_dir", lambda p: synced.append(Path(p)))
    staging = tmp_path / "staging"
    (staging / "sub").mkdir(parents=True)
    (staging / "a.txt").write_text("a")
    (staging / "sub" / "b.txt").write_text("b")
    hashes = {name: hashlib.sha256((staging / name).read_bytes()).hexdigest() for name in ("a.txt", "sub/b.txt")}
    publishing.publish_snapshot(staging, "test/t", hashes)
    folder = hub_cache / "models--test--t"
    assert {folder / "blobs" / d for d in hashes.values()} <= set(files)
    assert folder / "refs" / ".main.incoming" in files  # written, synced, then renamed to refs/main
    assert {folder, folder / "blobs", folder / "snapshots", folder / "refs"} <= set(synced)


# ---------------------------------------------------------------- 9. cache list lists what is intact
def test_cache_list_lists_what_is_intact_and_fails_naming_the_damage(hub_cache, tmp_path):
    v = victim(tmp_path)
    quantized_repo(hub_cache, "good/model")
    quantized_repo(hub_cache, "bad/hex")
    (hub_cache / "models--bad--hex" / "refs" / "main").write_text("../../../victim")
    quantized_repo(hub_cache, "bad/utf8")
    (hub_cache / "models--bad--utf8" / "refs" / "main").write_bytes(b"\xff" * 40)
    fake_repo(hub_cache, "bad/list", {"config.json": b"[1, 2]"})
    fake_repo(hub_cache, "bad/bits", {"config.json": json.dumps(
        {"quantization_config": {"quant_method": "gptq", "bits": "four", "sym": [True]}}).encode()})
    fake_repo(hub_cache, "bad/json", {"config.json": b"{not json"})
    unreadable = quantized_repo(hub_cache, "bad/unreadable")
    (unreadable / "snapshots" / REV / "config.json").unlink()
    (unreadable / "snapshots" / REV / "config.json").mkdir()
    (hub_cache / "models--bad--linked").symlink_to(v)
    quantized_repo(hub_cache, "bad/escape")
    shutil.rmtree(hub_cache / "models--bad--escape" / "snapshots")
    (hub_cache / "models--bad--escape" / "snapshots").symlink_to(tmp_path)
    fake_repo(hub_cache, "plain/base", {"config.json": b'{"model_type": "llama"}'})  # unquantized: silently left out
    before = tree(v)

    damaged = sorted(f"skipped models--bad--{name}"
                     for name in ("hex", "utf8", "list", "bits", "json", "unreadable", "linked", "escape"))
    r = CliRunner().invoke(cli, ["cache", "list", "--json"])
    assert r.exit_code == 1, r.output  # the intact ones are listed, and the status says the cache needs a look
    listing = json.loads(r.stdout)
    assert [m["repo_id"] for m in listing["models"]] == ["good/model"]
    assert sorted(line.split(": ")[0] for line in listing["skipped"]) == damaged
    r = CliRunner().invoke(cli, ["cache", "list"])
    assert r.exit_code == 1 and "good/model" in r.stdout, r.output
    assert "Traceback" not in r.output and "internal error" not in r.output
    [line] = r.stderr.splitlines()
    assert line.startswith("Error: skipped models--bad--") and "(+7 more damaged entries; --json lists them)" in line
    assert tree(v) == before
