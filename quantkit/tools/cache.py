"""The quantized models in the local Hugging Face hub cache: list them, remove one.

Reads the cache layout directly (hub.py documents it), at call time, so HF_HUB_CACHE set after import counts.
The cache is untrusted input: a damaged entry (a bad `refs/main`, a linked repo folder, a config.json of the
wrong shape, an unreadable file) is left out of the listing with one line saying why, and deleting never
follows a link.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from quantkit.errors import QuantkitError, first_line
from quantkit.source.hub import (
    current_snapshot,
    hub_cache_dir,
    repo_folder,
    validate_repo_id,
)
from quantkit.untrusted import confined, not_symlink, read_json, remove_tree
from quantkit.untrusted import field as json_field
from quantkit.write.publish import repo_lock


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


@dataclass
class CacheListing:
    models: list[CachedModel] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one line per damaged entry: its folder and what is wrong


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


def _cached_model(folder: Path) -> CachedModel | None:
    """The quantized model in a models--ns--name folder; None when it holds none (no refs/main, no config.json,
    no quantization_config); QuantkitError or OSError when it is damaged."""
    not_symlink(folder, "hub cache folder")
    found = current_snapshot(folder)
    if found is None:
        return None
    snapshot, revision = found
    if not (snapshot / "config.json").exists() and not (snapshot / "config.json").is_symlink():
        return None
    config_path = confined(folder, f"snapshots/{revision}/config.json", "config.json of a cached snapshot")
    config = read_json(config_path, "config")
    if config.get("quantization_config") in (None, {}):
        return None
    where = f"quantization_config in {config_path}"
    qc = json_field(config, "quantization_config", dict, str(config_path))
    return CachedModel(repo_id=_repo_id(folder.name),
                       method=json_field(qc, "quant_method", (str, type(None)), where) or "?",
                       bits=json_field(qc, "bits", (int, type(None)), where),
                       group_size=json_field(qc, "group_size", (int, type(None)), where),
                       sym=json_field(qc, "sym", (bool, type(None)), where),
                       size_bytes=folder_size(folder), path=str(snapshot), revision=revision)


def scan_cache() -> CacheListing:
    """Quantized models in the local hub cache (refs/main snapshot with a config.json quantization_config),
    sorted by repo id, and one line for each damaged entry left out."""
    cache = hub_cache_dir()
    listing = CacheListing()
    if not cache.is_dir():
        return listing
    try:
        folders = sorted(cache.iterdir())
    except OSError as e:
        raise QuantkitError(f"cannot read the hub cache {cache}: {e.strerror or e}") from None
    for folder in folders:
        if not folder.name.startswith("models--") or not (folder.is_dir() or folder.is_symlink()):
            continue
        try:
            model = _cached_model(folder)
        except (QuantkitError, OSError) as e:
            reason = first_line(e) if isinstance(e, QuantkitError) else f"cannot read {e.filename}: {e.strerror or e}"
            listing.skipped.append(f"skipped {folder.name}: {reason}")
            continue
        if model is not None:
            listing.models.append(model)
    return listing


def cache_list() -> list[CachedModel]:
    """Quantized models in the local hub cache (refs/main snapshot with a config.json quantization_config),
    sorted by repo id; damaged entries are left out (scan_cache says which).

    >>> [(m.repo_id, m.method, m.bits, m.group_size) for m in cache_list()]   # doctest: +SKIP
    [('quantkit/SmolLM2-135M-Instruct-gptq-4bit-g64', 'gptq', 4, 64)]
    """
    return scan_cache().models


def cached_repo_folder(repo_id: str) -> Path:
    """The models--ns--name folder of a repo in the cache; one-line errors for bad or absent ids and for a folder
    that is a link (deleting through it would delete outside the cache)."""
    folder = repo_folder(validate_repo_id(repo_id))
    not_symlink(folder, f"hub cache folder of {repo_id}")
    if not folder.is_dir():
        raise QuantkitError(f"{repo_id} is not in the hub cache ({hub_cache_dir()}); `quantkit cache list` shows "
                            "what is")
    return folder


def cache_remove(repo_id: str) -> int:
    """Delete a repo's folder from the hub cache under its quantkit lock; returns the bytes freed.

    refs/main goes first, so a crash part-way leaves a folder that no longer resolves, never a snapshot that
    looks complete with blobs missing. Nothing is followed through a link: a linked refs/ or refs/main is
    removed as the link it is.
    """
    folder = cached_repo_folder(repo_id)
    with repo_lock(repo_id):
        size = folder_size(folder)
        refs = folder / "refs"
        ref = refs / "main"
        if refs.is_dir() and not refs.is_symlink() and (ref.is_symlink() or ref.is_file()):
            ref.unlink()
        remove_tree(folder, hub_cache_dir(), f"hub cache folder of {repo_id}")
    return size
