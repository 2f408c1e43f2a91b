"""Where a run's output goes: a repo id in the hub cache or an --out directory, held under a lock with its private
work directory, and published there atomically at the end."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from quantkit.config import CalibSpec, QuantSpec
from quantkit.errors import QuantkitError
from quantkit.faults import wait_point
from quantkit.source.gguf_header import GGUF_MAGIC, GGUF_SUFFIX
from quantkit.source.hub import cache_id, cached_snapshot, check_repo_folder, hub_cache_dir, validate_repo_id
from quantkit.untrusted import fsync_dir, not_symlink, private_directory, refuse_destructive_output, remove_tree
from quantkit.write.manifest import MANIFEST_NAME
from quantkit.write.publish import exclusive, publish_snapshot, repo_lock

log = logging.getLogger("quantkit")


def default_repo_id(model: str, model_dir: Path, spec: QuantSpec) -> str:
    name = model.rstrip("/").split("/")[-1] if not Path(model).is_dir() else model_dir.resolve().name
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
    name = re.sub(r"\.\.+", ".", re.sub(r"--+", "-", name)).strip(".-") or "model"  # no '--', '..' (validate_repo_id)
    if spec.is_bnb:
        return f"quantkit/{name}-{spec.method}"
    if spec.gguf_type is not None:
        return f"quantkit/{name}-{spec.gguf_type}-gguf{'' if spec.method == 'gptq' else '-rtn'}"
    group = "row" if spec.group_size == -1 else str(spec.group_size)
    return f"quantkit/{name}-{spec.method}-{spec.bits}bit-g{group}{'' if spec.sym else '-asym'}"


def gguf_file_name(repo_id: str, spec: QuantSpec) -> str:
    """The .gguf file's name in a hub-cache repo: the repo's name, with the type, as llama.cpp's files are named."""
    name = repo_id.split("/")[-1]
    name = name.split("-gguf")[0]
    return f"{name}{GGUF_SUFFIX}" if name.endswith(str(spec.gguf_type)) else f"{name}-{spec.gguf_type}{GGUF_SUFFIX}"


class Target:
    """Where the result goes: a repo id in the hub cache, a plain directory, or for a GGUF output a .gguf file.
    What can never be an output is refused at once; whether the target is free is checked again under its lock
    (lock()), before any work."""

    def __init__(self, model: str, model_dir: Path, spec: QuantSpec, repo_id: str | None, out: Path | None,
                 overwrite: bool, work_dir: str | Path | None) -> None:
        self.out = Path(out).expanduser() if out is not None else None
        self.overwrite = overwrite
        self.repo_id = None if self.out is not None else validate_repo_id(
            repo_id or default_repo_id(model, model_dir, spec))
        # a GGUF output is one file: --out names it, or it is named after the repo inside the snapshot
        self.gguf_name: str | None = None
        if spec.is_gguf:
            self.gguf_name = self.out.name if self.out is not None else gguf_file_name(self.hub_repo(), spec)
            if self.out is not None and self.out.suffix != GGUF_SUFFIX:
                raise QuantkitError(f"--out {self.out}: --format gguf writes one file, named *.gguf")
        if self.out is not None:
            refuse_destructive_output(self.out, model_dir, "the base model's directory", f"--out {self.out}")
            base = self.out.resolve().parent
            label = self.out.name
        else:
            base = hub_cache_dir().resolve().parent / "quantkit-work"
            # keyed on the cache too: the repo lock lives in the cache, so it guards only that cache's work directory
            label = f"{self.hub_repo().replace('/', '--')}.{cache_id()}"
        self.owns_work_root = work_dir is None and self.out is None
        # one fixed work directory per target: a rerun of a killed run finds its checkpoints there (resume.py)
        self.work = (Path(work_dir) if work_dir else base) / f".{label}.quantkit-work"
        self.staging = self.work / "output"  # the output, assembled before it is published
        self.state_dir = self.work / "state"  # the finished steps, kept for a resume (resume.RunState)

    def hub_repo(self) -> str:
        """The repo id of a hub-cache target (one with no --out)."""
        if self.repo_id is None:
            raise QuantkitError(f"internal error: --out {self.out} has no repo id")
        return self.repo_id

    def _refuse_taken(self) -> None:
        """An existing output is replaced only with --overwrite, and a directory only when quantkit wrote it."""
        if self.out is None:
            repo_id = self.hub_repo()
            check_repo_folder(repo_id)
            existing = cached_snapshot(repo_id)
            if existing is not None and not self.overwrite:
                raise QuantkitError(f"{repo_id} already exists in the hub cache ({existing}); "
                                    "pass --overwrite to replace it")
            return
        not_symlink(self.out, "--out")
        if self.gguf_name is not None:
            self._refuse_taken_file(self.out)
            return
        if self.out.exists() and not self.out.is_dir():
            raise QuantkitError(f"--out {self.out} exists and is not a directory")
        if self.out.is_dir() and any(self.out.iterdir()):
            manifest = self.out / MANIFEST_NAME
            if not manifest.is_file() or manifest.is_symlink():
                raise QuantkitError(f"--out {self.out} is a non-empty directory that quantkit did not write (no "
                                    f"{MANIFEST_NAME} in it); choose a new or empty directory")
            if not self.overwrite:
                raise QuantkitError(f"{self.out} already exists and is not empty; pass --overwrite to replace it")

    def _refuse_taken_file(self, out: Path) -> None:
        """A .gguf file is replaced only with --overwrite, and only a GGUF file (its first bytes say so)."""
        if out.is_dir():
            raise QuantkitError(f"--out {out} is a directory; --format gguf writes one file")
        if not out.exists():
            return
        if not self.overwrite:
            raise QuantkitError(f"{out} already exists; pass --overwrite to replace it")
        with out.open("rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise QuantkitError(f"--out {out} exists and is not a GGUF file; quantkit replaces only GGUF files")

    def staged_file(self) -> Path:
        """Where a GGUF output's file is assembled (in staging, beside nothing else for --out)."""
        if self.gguf_name is None:
            raise QuantkitError("internal error: a staged .gguf file for a run that writes no GGUF")
        return self.staging / self.gguf_name

    def _work_directories(self) -> None:
        """The work directory (and quantkit's own work root above it), private to this user: created 0o700,
        refused when a link, another user's, or writable by others (it sits at a predictable path)."""
        if self.owns_work_root:
            self.work.parent.parent.mkdir(parents=True, exist_ok=True)
            private_directory(self.work.parent, "quantkit's work folder")
        else:
            self.work.parent.mkdir(parents=True, exist_ok=True)
        private_directory(self.work, "work directory")

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive use of the target and its work directory; a second run is refused with a clear message.
        The target is checked first, so a refused run creates nothing, and again under the lock, where no other
        run can publish it between the check and the work."""
        self._refuse_taken()
        wait_point("target:locking")
        if self.out is None:
            with repo_lock(self.hub_repo()):
                self._refuse_taken()
                self._work_directories()
                wait_point("target:locked")
                yield
            return
        self._work_directories()
        with exclusive(self.work / ".lock", f"{self.out} (work directory {self.work})"):
            self._refuse_taken()
            wait_point("target:locked")
            yield

    def fresh_staging(self) -> Path:
        """An empty staging directory (whatever a run killed while assembling left there is removed)."""
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        return self.staging

    def publish(self, file_hashes: dict[str, str]) -> Path:
        """Atomically: the old output renamed aside, staging renamed in (both made durable), then the old one
        deleted; the old one is checked again first (still quantkit's, --overwrite given)."""
        if self.out is None:
            return publish_snapshot(self.staging, self.hub_repo(), file_hashes)
        self._refuse_taken()
        if self.gguf_name is not None:  # one file: renamed over the old one, which is atomic
            os.replace(self.staged_file(), self.out)
            fsync_dir(self.out.parent)
            return self.out
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.replaced-{uuid.uuid4().hex[:8]}")
            self.out.rename(old)
        self.staging.rename(self.out)
        fsync_dir(self.out)
        fsync_dir(self.out.parent)
        if old is not None:
            try:
                remove_tree(old, self.out.parent, "replaced output")
            except OSError as e:
                log.warning("could not delete the replaced output %s: %s", old, e.strerror or e)
        return self.out

    def remove_work(self) -> None:
        """The work directory, and quantkit's shared work folder above it when no other run uses it."""
        shutil.rmtree(self.work, ignore_errors=True)
        if self.owns_work_root:
            with contextlib.suppress(OSError):
                self.work.parent.rmdir()

    def no_space_message(self, error: OSError, model_dir: Path, hidden: int, spec: QuantSpec,
                         calib: CalibSpec) -> str:
        """Out of disk space: where, how much a run like this needs, and that nothing finished is lost."""
        base_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
        # output (at most the base at bits/16, plus scales) twice (layer files, then shards) + one layer's activations
        need = 2 * base_bytes * max(spec.bits, 4) / 16 + 2 * calib.samples * calib.seq_len * hidden * 4
        free = shutil.disk_usage(self.work if self.work.exists() else self.work.parent).free
        return (f"no space left on the device writing {error.filename or self.work}: a run like this needs about "
                f"{need / 2**30:.1f} GiB free there ({free / 2**30:.1f} GiB free now); finished layers are kept in "
                f"{self.work}, so the same command continues after freeing space")
