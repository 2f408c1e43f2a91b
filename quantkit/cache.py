"""The quantized models in the local Hugging Face hub cache: list them, remove one.

Reads the cache layout directly (hub.py documents it), at call time, so HF_HUB_CACHE set after import counts.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import QuantkitError
from .hub import hub_cache_dir, repo_folder, repo_lock, validate_repo_id


@dataclass
class CachedModel:
    repo_id: str
    method: str
    bits: int | None
    group_size: int | None
    sym: bool | None
    size_bytes: int          # everything under models--ns--name (what `cache rm` frees)
    path: str                # the snapshot refs/main points to
    revision: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def folder_size(folder: Path) -> int:
    """Bytes of the regular files under folder; symlinks (snapshot -> blob) are not counted twice."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if not os.path.islink(os.path.join(root, name)):
                total += st.st_size
    return total


def _repo_id(folder_name: str) -> str:
    return folder_name[len("models--"):].replace("--", "/", 1)


def _snapshot(folder: Path) -> tuple[Path, str] | None:
    ref = folder / "refs" / "main"
    if not ref.is_file():
        return None
    revision = ref.read_text().strip()
    snapshot = folder / "snapshots" / revision
    return (snapshot, revision) if revision and snapshot.is_dir() else None


def cache_list() -> list[CachedModel]:
    """Quantized models in the local hub cache (refs/main snapshot with a config.json quantization_config),
    sorted by repo id.

    >>> [(m.repo_id, m.method, m.bits, m.group_size) for m in cache_list()]   # doctest: +SKIP
    [('quantkit/SmolLM2-135M-Instruct-gptq-4bit-g64', 'gptq', 4, 64)]
    """
    cache = hub_cache_dir()
    if not cache.is_dir():
        return []
    out = []
    for folder in sorted(cache.iterdir()):
        if not folder.is_dir() or not folder.name.startswith("models--"):
            continue
        found = _snapshot(folder)
        if found is None:
            continue
        snapshot, revision = found
        try:
            config = json.loads((snapshot / "config.json").read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        qc = config.get("quantization_config") if isinstance(config, dict) else None
        if not isinstance(qc, dict) or not qc:
            continue
        out.append(CachedModel(repo_id=_repo_id(folder.name), method=str(qc.get("quant_method", "?")),
                               bits=qc.get("bits"), group_size=qc.get("group_size"), sym=qc.get("sym"),
                               size_bytes=folder_size(folder), path=str(snapshot), revision=revision))
    return out


def cached_repo_folder(repo_id: str) -> Path:
    """The models--ns--name folder of a repo in the cache; one-line errors for bad or absent ids."""
    folder = repo_folder(validate_repo_id(repo_id))
    if not folder.is_dir():
        raise QuantkitError(f"{repo_id} is not in the hub cache ({hub_cache_dir()}); `quantkit cache list` shows "
                            "what is")
    return folder


def cache_remove(repo_id: str) -> int:
    """Delete a repo's folder from the hub cache under its quantkit lock; returns the bytes freed.

    refs/main goes first, so a crash part-way leaves a folder that no longer resolves, never a snapshot that
    looks complete with blobs missing.
    """
    folder = cached_repo_folder(repo_id)
    with repo_lock(repo_id):
        size = folder_size(folder)
        ref = folder / "refs" / "main"
        if ref.is_file():
            ref.unlink()
        shutil.rmtree(folder)
    return size
