"""Reading what other people and tools wrote: every file quantkit reads is untrusted input.

One rule for paths (a name taken from a file is resolved and must stay inside the folder it belongs to; nothing
that deletes follows a symlink), one reader for JSON (bounded, UTF-8, of the expected shape), and one error type
for everything refused here: QuantkitError, whose message names the file. No module reads JSON, a revision or a
path from disk without going through these.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from .errors import QuantkitError

MAX_JSON_BYTES = 256 << 20  # a config, index, manifest or state file larger than this is not one
_REVISION = re.compile(r"[0-9a-f]{40}")  # a git commit id: what huggingface_hub and quantkit write in refs/


def read_json(path: Path, what: str, expect: type = dict, max_bytes: int = MAX_JSON_BYTES):
    """The JSON value of `path`, which must be of type `expect`; a one-line QuantkitError naming the file (as
    `what`) when it is missing, too large, not UTF-8, not JSON, or of another shape."""
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise QuantkitError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if len(raw) > max_bytes:
        raise QuantkitError(f"{what} {path} is larger than {max_bytes >> 20} MiB; it is not a {what}")
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise QuantkitError(f"{what} {path} is not UTF-8 text") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise QuantkitError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(value, expect):
        raise QuantkitError(f"{what} {path} holds a JSON {_json_kind(value)}, expected a JSON {_json_kind(expect())}")
    return value


def _json_kind(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def field(mapping: dict, key: str, expect: type | tuple[type, ...], where: str):
    """mapping[key], which must be of type `expect` (bools are not ints); one line naming `where` otherwise."""
    value = mapping.get(key)
    kinds = expect if isinstance(expect, tuple) else (expect,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(_json_kind(k()) if k is not type(None) else "null" for k in kinds)
        raise QuantkitError(f"{where}: {key!r} is {json.dumps(value)[:60] if value is not None else 'missing'}, "
                            f"expected a {names}")
    return value


def relative_name(name: object, what: str) -> str:
    """A file name taken from a manifest or index: relative, no '..', no empty or hidden tricks."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise QuantkitError(f"{what}: file name {name!r} is not a plain relative path")
    parts = Path(name).parts
    if Path(name).is_absolute() or any(p in ("..", ".") for p in parts) or name.startswith("/"):
        raise QuantkitError(f"{what}: file name {name!r} points outside its folder")
    return name


def confined(root: Path, name: str, what: str) -> Path:
    """root/name, resolved through every symlink, which must still lie inside root (resolved); else one line."""
    path = Path(root) / relative_name(name, what)
    real, real_root = path.resolve(), Path(root).resolve()
    if real != real_root and real_root not in real.parents:
        raise QuantkitError(f"{what}: {name!r} leads outside {root} (to {real})")
    return path


def inside(path: Path, root: Path) -> bool:
    """Whether `path` (resolved) is root or lies under it (resolved)."""
    real, real_root = Path(path).resolve(), Path(root).resolve()
    return real == real_root or real_root in real.parents


def revision(text: str, ref: Path) -> str:
    """The content of a refs/ file: a commit-like name (40 lowercase hex digits) and nothing else."""
    if not _REVISION.fullmatch(text):
        raise QuantkitError(f"{ref} does not hold a revision (40 hex digits): {text[:60]!r}")
    return text


def read_ref(ref: Path) -> str | None:
    """The revision a refs/ file names, or None when there is no such file; one line when it is not a revision."""
    if ref.is_symlink():
        raise QuantkitError(f"{ref} is a symbolic link; a refs/ file must be a plain file")
    if not ref.is_file():
        return None
    try:
        text = ref.read_bytes()[:4096].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise QuantkitError(f"{ref} is not UTF-8 text; it does not hold a revision") from None
    except OSError as e:
        raise QuantkitError(f"cannot read {ref}: {e.strerror or e}") from None
    return revision(text, ref)


def not_symlink(path: Path, what: str) -> Path:
    """path, refused when it (not its target) is a symbolic link: the caller is about to write or delete in it."""
    if Path(path).is_symlink():
        raise QuantkitError(f"{what} {path} is a symbolic link; quantkit does not write or delete through links")
    return path


def remove_tree(path: Path, root: Path, what: str) -> None:
    """Delete the directory `path`, which must be a real directory (not a link) inside `root`; links inside it are
    removed, never followed (shutil.rmtree's fd-based walk)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    not_symlink(path, what)
    if not inside(path, root) or Path(path).resolve() == Path(root).resolve():
        raise QuantkitError(f"{what} {path} is not inside {root}; refusing to delete it")
    shutil.rmtree(path)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (the directory's own entry list)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
