"""The local Hugging Face hub cache: where it is, how repo ids map to folders, and the snapshot `refs/main` names.

Layout (what huggingface_hub writes and reads offline; write/publish.py adds snapshots to it):
  <HF_HUB_CACHE>/models--{ns}--{name}/blobs/<sha256>
                                     /snapshots/<revision>/<file> -> ../../blobs/<sha256>
                                     /refs/main                   (contains <revision>)
The cache is untrusted input (untrusted.py): `refs/main` must hold a revision (40 hex digits), a snapshot read
must lie inside its repo folder, and the repo folder, `blobs/`, `snapshots/` and `refs/` must be real
directories, not links, before anything is written or deleted in them.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.untrusted import (
    confined,
    not_symlink,
    read_ref,
)

log = logging.getLogger("quantkit")

_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_-])?")


def model_root(model_dir: Path) -> Path:
    """The folder a model's files may link into: the model's own, or for a hub-cache snapshot its repo folder
    (snapshot files are links to ../../blobs)."""
    in_cache = model_dir.parent.name == "snapshots" and model_dir.parent.parent.name.startswith("models--")
    return model_dir.parent.parent if in_cache else model_dir


def hub_cache_dir() -> Path:
    """HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub (read at call time, like huggingface_hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(hf_home).expanduser() / "hub"


def cache_id(cache: Path | None = None) -> str:
    """A short name for a hub cache (default: this one): the start of the sha256 of its resolved path. Keys what
    quantkit keeps outside the cache (the work directories) to the cache whose lock guards it."""
    return hashlib.sha256(str(Path(cache or hub_cache_dir()).resolve()).encode()).hexdigest()[:12]


def _is_repo_id(text: str) -> bool:
    """NAMESPACE/NAME of safe characters, with no '..' (a path step) and no '--' (the cache folder joins the parts
    with '--', so 'a/b--c' and 'a--b/c' would share one folder; huggingface_hub refuses both as well)."""
    parts = text.split("/")
    return len(parts) == 2 and all(_REPO_PART.fullmatch(p) and ".." not in p and "--" not in p for p in parts)


def validate_repo_id(repo_id: str) -> str:
    """Accept only 'namespace/name' made of safe characters, so a repo id can never escape the cache or share
    its folder with another repo id."""
    if not _is_repo_id(repo_id):
        raise QuantkitError(f"invalid repo id {repo_id!r}: use NAMESPACE/NAME with letters, digits, '-', '_' and '.' "
                            "(no '--' or '..')")
    return repo_id


def repo_folder(repo_id: str) -> Path:
    return hub_cache_dir() / ("models--" + validate_repo_id(repo_id).replace("/", "--"))


def looks_like_repo_id(text: str) -> bool:
    return _is_repo_id(text)


def main_revision(folder: Path) -> str | None:
    """The revision `refs/main` of a repo folder names, or None when it has none; one line naming the file when
    it is a link, not UTF-8 or not a revision."""
    try:
        return read_ref(folder / "refs" / "main")
    except QuantkitError as e:
        raise QuantkitError(f"{e}; `quantkit cache rm` removes the damaged entry") from None


def snapshot_of(folder: Path, revision: str) -> Path:
    """snapshots/<revision> of a repo folder, refused with one line when it (through any link) leads outside it."""
    return confined(folder, f"snapshots/{revision}", f"refs/main of {folder}")


def current_snapshot(folder: Path) -> tuple[Path, str] | None:
    """The snapshot `refs/main` of a repo folder names, and its revision; None when there is none (no refs/main,
    or no such snapshot); one line when refs/main is damaged or the snapshot leads outside the folder."""
    revision = main_revision(folder)
    if revision is None:
        return None
    snapshot = snapshot_of(folder, revision)
    return (snapshot, revision) if snapshot.is_dir() else None


def cached_snapshot(repo_id: str) -> Path | None:
    """The snapshot `refs/main` points to, or None when the repo is not (completely) in the cache."""
    found = current_snapshot(repo_folder(repo_id))
    return found[0] if found else None


REPO_DIRS = ("blobs", "snapshots", "refs")


def check_repo_folder(repo_id: str) -> Path:
    """The repo folder of repo_id, refused with one line when it or one of its blobs/, snapshots/ and refs/ is a
    link or not a directory: publishing writes and deletes in them. What is missing is fine (created then)."""
    folder = repo_folder(repo_id)
    for path in (folder, *(folder / d for d in REPO_DIRS)):
        not_symlink(path, "hub cache folder")
        if path.exists() and not path.is_dir():
            raise QuantkitError(f"hub cache folder {path} is not a directory; `quantkit cache rm {repo_id}` removes "
                                "the damaged entry")
    return folder


