"""Reading what other people and tools wrote: every file quantkit reads is untrusted input.

One rule for paths (a name taken from a file is resolved and must stay inside the folder it belongs to; nothing
that deletes follows a symlink), one reader for JSON (bounded, UTF-8, of the expected shape), and one error type
for everything refused here: QuantkitError, whose message names the file. No module reads JSON, a revision or a
path from disk without going through these.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError, first_line

MAX_JSON_BYTES = 256 << 20  # a config, index, manifest or state file larger than this is not one
_REVISION = re.compile(r"[0-9a-f]{40}")  # a git commit id: what huggingface_hub and quantkit write in refs/
_SHA256 = re.compile(r"[0-9a-f]{64}")


def read_json(path: Path, what: str, expect: type = dict, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON value of `path`, which must be of type `expect`; a one-line QuantkitError naming the file (as
    `what`) when it is missing, too large, not UTF-8, not JSON, or of another shape."""
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise QuantkitError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if len(raw) > max_bytes:
        raise QuantkitError(f"{what} {path} is larger than {max_bytes >> 20} MiB; it is not a {what}")
    return parse_json(raw, f"{what} {path}", expect)


def _json_kind(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _with_article(kind: str) -> str:
    return kind if kind == "null" else f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def field(mapping: dict, key: str, expect: type | tuple[type, ...], where: str) -> Any:
    """mapping[key], which must be of type `expect` (bools are not ints); one line naming `where` otherwise."""
    value = mapping.get(key)
    kinds = expect if isinstance(expect, tuple) else (expect,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(_with_article(_json_kind(k()) if k is not type(None) else "null") for k in kinds)
        raise QuantkitError(f"{where}: {key!r} is {json.dumps(value)[:60] if value is not None else 'missing'}, "
                            f"expected {names}")
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
    if not inside(path, root):
        raise QuantkitError(f"{what}: {name!r} leads outside {root} (to {path.resolve()})")
    return path


def inside(path: Path, root: Path) -> bool:
    """Whether `path` (resolved) is root or lies under it (resolved)."""
    real, real_root = Path(path).resolve(), Path(root).resolve()
    return real == real_root or real_root in real.parents


def sha256_digest(value: object, where: str) -> str:
    """A sha256 as manifests and resume states record it: 64 lowercase hex digits."""
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise QuantkitError(f"{where}: {json.dumps(value)[:70]} is not a sha256 (64 hex digits)")
    return value


def file_record(record: dict, where: str, size_required: bool = True) -> dict:
    """A file's record, {"sha256": ..., "size": bytes}, as quantkit.json and state.json keep it; the size may be
    absent where size_required is False."""
    sha256_digest(record.get("sha256"), f"{where}: sha256")
    if size_required or "size" in record:
        if field(record, "size", int, where) < 0:
            raise QuantkitError(f"{where}: 'size' is {record['size']}, expected a size in bytes")
    return record


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


def real_directory(path: Path, what: str) -> Path:
    """path as a real directory, created with its parents when missing; one line when it is a symbolic link or
    not a directory (the caller is about to write or delete in it)."""
    path = Path(path)
    not_symlink(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise QuantkitError(f"{what} {path} is not a directory") from None
    except OSError as e:
        raise QuantkitError(f"cannot create {what} {path}: {e.strerror or e}") from None
    return path


def private_directory(path: Path, what: str) -> Path:
    """path as a directory only this user can write: created 0o700 when missing (its parent must exist); one line
    when it is a link, not a directory, owned by another user, or writable by group or others (someone else could
    then plant or swap files in it)."""
    path = Path(path)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise QuantkitError(f"cannot create {what} {path}: {e.strerror or e}") from None
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise QuantkitError(f"{what} {path} is a symbolic link; remove it (quantkit creates its own)")
    if not stat.S_ISDIR(st.st_mode):
        raise QuantkitError(f"{what} {path} is not a directory; remove it")
    if st.st_uid != os.getuid():
        raise QuantkitError(f"{what} {path} belongs to another user (uid {st.st_uid}); remove it or use another "
                            "location")
    if st.st_mode & 0o022:
        raise QuantkitError(f"{what} {path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}); "
                            f"`chmod go-w {path}` or remove it")
    return path


def parse_json(raw: bytes, what: str, expect: type = dict) -> Any:
    """The JSON value of the bytes `raw`, which must be of type `expect`; a one-line QuantkitError naming `what`
    (e.g. "config /m/config.json") when they are not UTF-8, not JSON, or of another shape."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise QuantkitError(f"{what} is not UTF-8 text") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, and numbers beyond Python's digit limit
        raise QuantkitError(f"{what} is not valid JSON: {first_line(e)}") from None
    if not isinstance(value, expect):
        raise QuantkitError(f"{what} holds a JSON {_json_kind(value)}, expected a JSON {_json_kind(expect())}")
    return value


def positive_int(mapping: dict, key: str, where: str) -> int:
    """mapping[key], which must be an integer > 0 (a size or a count); one line naming `where` otherwise."""
    value = mapping.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        shown = json.dumps(value)[:60] if value is not None else "missing"
        raise QuantkitError(f"{where}: {key!r} is {shown}, expected a positive integer")
    return value


def refuse_destructive_output(out: Path, source: Path, source_what: str, label: str) -> None:
    """An output directory that a command replaces whole is never the filesystem root, the directory its input
    comes from (`source`, described as `source_what`) or one holding it, or the current directory or one holding
    it; `label` names the output in the one-line refusal."""
    real = Path(out).resolve()
    if real == Path(real.anchor):
        raise QuantkitError(f"{label} is the filesystem root; choose a new directory for the output")
    if inside(source, real):
        raise QuantkitError(f"{label} is {source_what} or holds it ({source}); choose a new directory for the output")
    if inside(Path.cwd(), real):
        raise QuantkitError(f"{label} is the current directory or holds it; choose a new directory for the output")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
