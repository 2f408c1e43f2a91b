"""Publishing a finished directory into the local hub cache atomically, as a new revision of a repo id.

A snapshot is assembled beside `snapshots/` and renamed into place; `refs/main` is written last, so a crash never
leaves a revision that `from_pretrained` would pick up half-made. Blobs, `refs/main` and the renamed directories are
fsynced before the old revision goes. The layout is described in source/hub.py.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.faults import kill_point
from quantkit.source.hub import (
    REPO_DIRS,
    check_repo_folder,
    hub_cache_dir,
    main_revision,
    repo_folder,
)
from quantkit.untrusted import (
    fsync_dir,
    fsync_file,
    not_symlink,
    real_directory,
    remove_tree,
    sha256_file,
)

log = logging.getLogger("quantkit")


@contextmanager
def exclusive(lock_path: Path, what: str) -> Iterator[None]:
    """Hold the lock file at lock_path, or refuse at once: another quantkit run is writing `what`."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise QuantkitError(f"another quantkit run is writing {what}; wait for it to finish") from None
    try:
        yield
    finally:
        lock.release()


@contextmanager
def repo_lock(repo_id: str) -> Iterator[None]:
    """Hold an exclusive lock on a repo id so two runs never write the same snapshot."""
    lock_path = hub_cache_dir() / ".locks" / "quantkit" / (repo_folder(repo_id).name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(lock_path, f"{repo_id} (lock {lock_path})"):
        yield


def _move_into(src: Path, dst: Path) -> None:
    """Rename src to dst (replacing the entry dst, never following it); across filesystems, copy to a temporary
    name first so dst appears whole."""
    try:
        os.replace(src, dst)
    except OSError:
        tmp = dst.with_name(dst.name + ".incomplete")
        tmp.unlink(missing_ok=True)  # copying onto a leftover link would write through it
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        src.unlink()


def _blob_intact(blob: Path, digest: str) -> bool:
    """Whether blobs/<digest> is a regular file (not a link) that holds what its name says."""
    return blob.is_file() and not blob.is_symlink() and sha256_file(blob) == digest


def _blob_link(name: str, digest: str) -> str:
    """The relative link target of snapshots/<revision>/<name>: up to the repo folder, then blobs/<digest>."""
    return os.path.join(*([".."] * (len(Path(name).parts) + 1)), "blobs", digest)


def _snapshot_intact(snapshot: Path, file_hashes: dict[str, str]) -> bool:
    """Whether snapshots/<revision> is a real directory of exactly the links to blobs that publishing makes."""
    if not snapshot.is_dir() or snapshot.is_symlink():
        return False
    found = {os.path.relpath(os.path.join(root, n), snapshot) for root, dirs, files in os.walk(snapshot)
             for n in dirs + files if os.path.islink(os.path.join(root, n)) or n in files}
    return found == set(file_hashes) and all(
        os.path.islink(snapshot / name) and os.readlink(snapshot / name) == _blob_link(name, digest)
        for name, digest in file_hashes.items())


def publish_snapshot(staging: Path, repo_id: str, file_hashes: dict[str, str]) -> Path:
    """Move the files of `staging` into the cache as a new revision of repo_id; returns the snapshot path.

    file_hashes maps each relative file name to its sha256 (the blob name). The revision is derived from
    them, so identical outputs publish to the same revision. The caller holds repo_lock(repo_id).
    """
    folder = real_directory(check_repo_folder(repo_id), "hub cache folder")
    blobs, snapshots, refs = (real_directory(folder / d, "hub cache folder") for d in REPO_DIRS)
    fsync_dir(folder)
    revision = hashlib.sha1(json.dumps(sorted(file_hashes.items())).encode()).hexdigest()
    old_revision = main_revision(folder)

    for name, digest in file_hashes.items():
        blob = blobs / digest
        if _blob_intact(blob, digest):
            (staging / name).unlink()
            continue
        if blob.is_dir() and not blob.is_symlink():
            raise QuantkitError(f"{blob} is a directory, not a blob; `quantkit cache rm {repo_id}` removes the "
                                "damaged entry")
        _move_into(staging / name, blob)  # replaces a damaged blob or a link in its place
        fsync_file(blob)
    fsync_dir(blobs)

    kill_point("publish:blobs")
    snapshot = snapshots / revision
    if not _snapshot_intact(snapshot, file_hashes):
        # assembled one level below the repo folder, like snapshots/<rev>, so relative links resolve there too
        incoming = real_directory(folder / ".quantkit-incoming", "hub cache folder")
        tmp = incoming / revision
        remove_tree(tmp, incoming, "unfinished snapshot")
        if snapshot.is_symlink() or not snapshot.is_dir():
            snapshot.unlink(missing_ok=True)  # a link or file there goes itself, never what a link points to
        else:
            remove_tree(snapshot, snapshots, "damaged snapshot")
        for name, digest in file_hashes.items():
            link = tmp / name
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(_blob_link(name, digest), link)
        for d in {(tmp / name).parent for name in file_hashes}:
            fsync_dir(d)
        os.rename(tmp, snapshot)
        fsync_dir(snapshots)
        remove_tree(incoming, folder, "unfinished snapshots")

    kill_point("publish:ref")
    old_ref, ref_tmp = refs / "main", refs / ".main.incoming"
    ref_tmp.unlink(missing_ok=True)  # a leftover goes first: writing would follow a link planted there
    ref_tmp.write_text(revision)
    fsync_file(ref_tmp)
    os.replace(ref_tmp, old_ref)
    fsync_dir(refs)

    if old_revision and old_revision != revision:
        _drop_revision(folder, old_revision)
    return snapshot


def _drop_revision(folder: Path, revision: str) -> None:
    """Remove a superseded snapshot (a real directory inside snapshots/; anything else there is left alone) and
    the regular files directly in blobs/ that no remaining snapshot links to. Nothing here follows a link."""
    snapshots, blobs = folder / "snapshots", folder / "blobs"
    old = snapshots / revision
    if old.is_dir() and not old.is_symlink():
        remove_tree(old, snapshots, "superseded snapshot")
    elif old.exists() or old.is_symlink():
        log.warning("left %s in place: a superseded snapshot should be a directory", old)
    not_symlink(snapshots, "hub cache folder")
    not_symlink(blobs, "hub cache folder")
    live = set()
    for root, dirs, files in os.walk(snapshots):  # links to directories are listed in dirs, never entered
        for name in dirs + files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                live.add(os.path.basename(os.readlink(path)))
    with os.scandir(blobs) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False) and entry.name not in live:
                os.unlink(entry.path)
