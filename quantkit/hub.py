"""The local Hugging Face hub cache: find models in it and publish snapshots into it atomically.

Layout (what huggingface_hub writes and reads offline):
  <HF_HUB_CACHE>/models--{ns}--{name}/blobs/<sha256>
                                     /snapshots/<revision>/<file> -> ../../blobs/<sha256>
                                     /refs/main                   (contains <revision>)
A snapshot is assembled beside `snapshots/` and renamed into place; `refs/main` is written last, so a crash
never leaves a revision that `from_pretrained` would pick up half-made.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from .errors import QuantkitError
from .faults import kill_point

_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_-])?")


def hub_cache_dir() -> Path:
    """HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub (read at call time, like huggingface_hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(hf_home).expanduser() / "hub"


def validate_repo_id(repo_id: str) -> str:
    """Accept only 'namespace/name' made of safe characters, so a repo id can never escape the cache."""
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(_REPO_PART.fullmatch(p) and ".." not in p for p in parts):
        raise QuantkitError(f"invalid repo id {repo_id!r}: use NAMESPACE/NAME with letters, digits, '-', '_' and '.'")
    return repo_id


def repo_folder(repo_id: str) -> Path:
    return hub_cache_dir() / ("models--" + validate_repo_id(repo_id).replace("/", "--"))


def looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(_REPO_PART.fullmatch(p) for p in parts)


def cached_snapshot(repo_id: str) -> Path | None:
    """The snapshot `refs/main` points to, or None when the repo is not (completely) in the cache."""
    folder = repo_folder(repo_id)
    ref = folder / "refs" / "main"
    if not ref.is_file():
        return None
    snapshot = folder / "snapshots" / ref.read_text().strip()
    return snapshot if snapshot.is_dir() else None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextmanager
def repo_lock(repo_id: str):
    """Hold an exclusive lock on a repo id so two runs never write the same snapshot."""
    from filelock import FileLock, Timeout

    lock_path = hub_cache_dir() / ".locks" / "quantkit" / (repo_folder(repo_id).name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise QuantkitError(f"another quantkit run is writing {repo_id} (lock {lock_path}); wait for it to finish") from None
    try:
        yield
    finally:
        lock.release()


def _move_into(src: Path, dst: Path) -> None:
    """Rename src to dst; across filesystems, copy to a temporary name first so dst appears whole."""
    try:
        os.replace(src, dst)
    except OSError:
        tmp = dst.with_name(dst.name + ".incomplete")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        src.unlink()


def publish_snapshot(staging: Path, repo_id: str, file_hashes: dict[str, str]) -> Path:
    """Move the files of `staging` into the cache as a new revision of repo_id; returns the snapshot path.

    file_hashes maps each relative file name to its sha256 (the blob name). The revision is derived from
    them, so identical outputs publish to the same revision.
    """
    folder = repo_folder(repo_id)
    blobs, snapshots, refs = folder / "blobs", folder / "snapshots", folder / "refs"
    for d in (blobs, snapshots, refs):
        d.mkdir(parents=True, exist_ok=True)
    revision = hashlib.sha1(json.dumps(sorted(file_hashes.items())).encode()).hexdigest()
    old_ref = refs / "main"
    old_revision = old_ref.read_text().strip() if old_ref.is_file() else None

    for name, digest in file_hashes.items():
        blob = blobs / digest
        if blob.exists():
            (staging / name).unlink()
        else:
            _move_into(staging / name, blob)

    kill_point("publish:blobs")
    snapshot = snapshots / revision
    if not snapshot.is_dir():
        # assembled one level below the repo folder, like snapshots/<rev>, so relative links resolve there too
        tmp = folder / ".quantkit-incoming" / revision
        shutil.rmtree(tmp, ignore_errors=True)
        for name, digest in file_hashes.items():
            link = tmp / name
            link.parent.mkdir(parents=True, exist_ok=True)
            depth = len(Path(name).parts) + 1
            os.symlink(os.path.join(*([".."] * depth), "blobs", digest), link)
        os.rename(tmp, snapshot)
        shutil.rmtree(tmp.parent, ignore_errors=True)

    kill_point("publish:ref")
    ref_tmp = refs / ".main.incoming"
    ref_tmp.write_text(revision)
    os.replace(ref_tmp, old_ref)

    if old_revision and old_revision != revision:
        _drop_revision(folder, old_revision)
    return snapshot


def _drop_revision(folder: Path, revision: str) -> None:
    """Remove a superseded snapshot and the blobs no remaining snapshot links to."""
    shutil.rmtree(folder / "snapshots" / revision, ignore_errors=True)
    live = {os.path.basename(os.readlink(p)) for p in (folder / "snapshots").rglob("*") if p.is_symlink()}
    for blob in (folder / "blobs").iterdir():
        if blob.name not in live:
            blob.unlink()
