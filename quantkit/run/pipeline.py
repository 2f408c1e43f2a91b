"""quantize(): the only module that knows the order of the steps. Logs and progress live here."""
from __future__ import annotations

import contextlib
import copy
import errno
import functools
import logging
import math
import re
import resource
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from quantkit import __version__
from quantkit.calibrate.batch import calibration_batch_size
from quantkit.calibrate.capture import (
    BlockMemo,
    Reference,
    capture_layer_inputs,
    collect_statistics,
    derivable_blocks,
    discover_groups,
    foldable_blocks,
    propagate,
    wait_for_copies,
)
from quantkit.calibrate.precision import compute_dtype as choose_compute_dtype
from quantkit.calibrate.precision import fast_float32_matmuls, float32_matmul_path
from quantkit.config import CalibSpec, QuantSpec
from quantkit.errors import NumericalError, QuantkitError
from quantkit.faults import kill_point, wait_point
from quantkit.memory.heap import release_large_frees_at_once, return_free_heap
from quantkit.memory.spill import (
    ActivationsOnDisk,
    ScratchFiles,
    batch_meta,
    disk_has_room,
)
from quantkit.run.lm_head import quantize_head
from quantkit.run.resume import (
    STATE,
    BackgroundSaves,
    HashedReads,
    ResumeRefused,
    RunState,
    model_fingerprint,
    run_fingerprint,
)
from quantkit.solve.gptq import GPTQResult, gptq_quantize_shared, rtn_result
from quantkit.source.calibration import calibration_batch
from quantkit.source.checkpoint import (
    SafetensorsCheckpoint,
    read_config_dict,
    resolve_model_dir,
    torch_dtype_of,
)
from quantkit.source.hub import (
    cache_id,
    cached_snapshot,
    check_repo_folder,
    hub_cache_dir,
    validate_repo_id,
)
from quantkit.source.skeleton import (
    build_skeleton,
    check_tensors,
    decoder_layers,
    in_features,
    linear_modules,
    load_config,
    materialize,
    outer_modules_materialized,
    release,
    set_weight_matrix,
    weight_matrix,
)
from quantkit.untrusted import (
    fsync_dir,
    inside,
    not_symlink,
    private_directory,
    refuse_destructive_output,
    remove_tree,
    sha256_file,
)
from quantkit.write.gptq_format import (
    checkpoint_format,
    module_tensors,
    quantization_config,
)
from quantkit.write.manifest import MANIFEST_NAME
from quantkit.write.model_card import render_model_card
from quantkit.write.publish import publish_snapshot, repo_lock
from quantkit.write.shards import ShardWriter, parse_size, write_json

log = logging.getLogger("quantkit")

# tokenizer, chat template and generation files carried over from the base model as they are
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
              "generation_config.json")
OUTPUT_DTYPE = torch.float16  # dtype of unquantized tensors in GPTQ checkpoints (what the kernels expect)


@dataclass
class QuantizeResult:
    repo_id: str | None
    path: str
    bits: int
    group_size: int
    sym: bool
    method: str
    checkpoint_format: str
    seconds: float
    peak_rss_mb: float
    device: str
    compute_dtype: str | None = None  # the calibration forwards' dtype (--compute-dtype); None without them
    peak_gpu_mb: float | None = None  # torch's peak allocation on the GPU, for --device cuda
    layers: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise QuantkitError("--device cuda requested, but no CUDA device is available (torch "
                            f"{torch.__version__}); use --device cpu or install a CUDA build of torch")
    if device not in ("cpu", "cuda"):
        raise QuantkitError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def default_repo_id(model: str, model_dir: Path, spec: QuantSpec) -> str:
    name = model.rstrip("/").split("/")[-1] if not Path(model).is_dir() else model_dir.resolve().name
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
    name = re.sub(r"\.\.+", ".", re.sub(r"--+", "-", name)).strip(".-") or "model"  # no '--', '..' (validate_repo_id)
    if spec.is_bnb:
        return f"quantkit/{name}-{spec.method}"
    group = "row" if spec.group_size == -1 else str(spec.group_size)
    return f"quantkit/{name}-{spec.method}-{spec.bits}bit-g{group}{'' if spec.sym else '-asym'}"


def _storage_dtype(model_dtype: torch.dtype, compute_dtype: torch.dtype) -> torch.dtype:
    """Calibration activations between layers are kept in the model's own 16-bit dtype (half the memory of
    float32; a GPU run in that dtype rounds them the same way); float32 models keep float32."""
    return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else compute_dtype


class _Target:
    """Where the result goes: a repo id in the hub cache, or a plain directory. What can never be an output is
    refused at once; whether the target is free is checked again under its lock (lock()), before any work."""

    def __init__(self, model: str, model_dir: Path, spec: QuantSpec, repo_id: str | None, out: Path | None,
                 overwrite: bool, work_dir: Path | None):
        self.out = Path(out).expanduser() if out is not None else None
        self.overwrite = overwrite
        self.repo_id = None if self.out is not None else validate_repo_id(repo_id or default_repo_id(model, model_dir, spec))
        if self.out is not None:
            refuse_destructive_output(self.out, model_dir, "the base model's directory", f"--out {self.out}")
            base = self.out.resolve().parent
            label = self.out.name
        else:
            base = hub_cache_dir().resolve().parent / "quantkit-work"
            # keyed on the cache too: the repo lock lives in the cache, so it guards only that cache's work directory
            label = f"{self.repo_id.replace('/', '--')}.{cache_id()}"
        self.owns_work_root = work_dir is None and self.out is None
        # one fixed work directory per target: a rerun of a killed run finds its checkpoints there (resume.py)
        self.work = (Path(work_dir) if work_dir else base) / f".{label}.quantkit-work"
        self.staging = self.work / "output"

    def _refuse_taken(self) -> None:
        """An existing output is replaced only with --overwrite, and a directory only when quantkit wrote it."""
        if self.out is None:
            check_repo_folder(self.repo_id)
            existing = cached_snapshot(self.repo_id)
            if existing is not None and not self.overwrite:
                raise QuantkitError(f"{self.repo_id} already exists in the hub cache ({existing}); "
                                    "pass --overwrite to replace it")
            return
        not_symlink(self.out, "--out")
        if self.out.exists() and not self.out.is_dir():
            raise QuantkitError(f"--out {self.out} exists and is not a directory")
        if self.out.is_dir() and any(self.out.iterdir()):
            manifest = self.out / MANIFEST_NAME
            if not manifest.is_file() or manifest.is_symlink():
                raise QuantkitError(f"--out {self.out} is a non-empty directory that quantkit did not write (no "
                                    f"{MANIFEST_NAME} in it); choose a new or empty directory")
            if not self.overwrite:
                raise QuantkitError(f"{self.out} already exists and is not empty; pass --overwrite to replace it")

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
    def lock(self):
        """Exclusive use of the target and its work directory; a second run is refused with a clear message.
        The target is checked first, so a refused run creates nothing, and again under the lock, where no other
        run can publish it between the check and the work."""
        self._refuse_taken()
        wait_point("target:locking")
        if self.repo_id is not None:
            with repo_lock(self.repo_id):
                self._refuse_taken()
                self._work_directories()
                wait_point("target:locked")
                yield
            return
        from filelock import FileLock, Timeout

        self._work_directories()
        lock = FileLock(str(self.work / ".lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise QuantkitError(f"another quantkit run is writing {self.out} (work directory {self.work}); "
                                "wait for it to finish") from None
        try:
            self._refuse_taken()
            wait_point("target:locked")
            yield
        finally:
            lock.release()

    def publish(self, file_hashes: dict[str, str]) -> Path:
        """Atomically: the old output renamed aside, staging renamed in (both made durable), then the old one
        deleted; the old one is checked again first (still quantkit's, --overwrite given)."""
        if self.out is None:
            return publish_snapshot(self.staging, self.repo_id, file_hashes)
        self._refuse_taken()
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


def quantize(model: str, spec: QuantSpec = QuantSpec(), calib: CalibSpec = CalibSpec(), *, repo_id: str | None = None,
             out: str | Path | None = None, overwrite: bool = False, device: str = "auto",
             max_shard_size: str = "2GB", work_dir: str | Path | None = None, progress: bool = False,
             compute_dtype: str = "auto") -> QuantizeResult:
    """Quantize MODEL (a local directory or a repo id in the hub cache) layer by layer and publish the result.

    :param model: base checkpoint: a directory with config.json and safetensors weights, or a cached repo id.
    :param spec: quantization settings.
    :param calib: calibration text and sampling (unused for method "rtn").
    :param repo_id: hub-cache repo id to publish as (default derived from the model name and settings).
    :param out: publish into this plain directory instead of the hub cache.
    :param overwrite: replace an existing output.
    :param device: "auto", "cpu" or "cuda".
    :param compute_dtype: dtype of the calibration forwards: "auto" (the model's 16-bit dtype on a GPU, and a
        bfloat16 model's on a CPU with native bfloat16 matmuls; else float32), "float32", "bfloat16" or "float16".
    :param max_shard_size: largest safetensors shard, e.g. "2GB".
    :param progress: show a per-layer progress bar (on a terminal).
    """
    t0 = time.perf_counter()
    release_large_frees_at_once()  # else freed layers stay resident and peak memory creeps with depth
    model_dir = resolve_model_dir(model)
    config_dict = read_config_dict(model_dir)
    config = load_config(model_dir, config_dict)
    checkpoint = SafetensorsCheckpoint(model_dir)
    _side_files(model_dir)
    dev = resolve_device(device)
    forward_dtype = choose_compute_dtype(compute_dtype, torch_dtype_of(config_dict), dev)
    gpu_peaks = _GpuPeaks(dev)
    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError as e:
        raise QuantkitError(str(e)) from None
    target = _Target(model, model_dir, spec, repo_id, Path(out) if out else None, overwrite, work_dir)
    with target.lock():
        try:
            try:
                if spec.is_bnb:
                    layers, files = _run_bnb(model, model_dir, config, config_dict, spec, dev, target)
                else:
                    with fast_float32_matmuls(dev):
                        layers, files = _run(model, model_dir, config, config_dict, checkpoint, spec, calib, dev,
                                             target, shard_bytes, progress, forward_dtype, gpu_peaks)
                path = target.publish(files)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                raise QuantkitError(_no_space_message(e, model_dir, config.hidden_size, spec, calib, target)) from None
        except BaseException as e:  # killed or failed: keep finished layers for a resume, else leave nothing behind
            if isinstance(e, ResumeRefused):
                pass  # a state this run must not continue stays as it is; its message says what to do
            elif (target.work / "state" / STATE).is_file():
                log.error("work directory kept for resuming: %s (rerun the same command to continue)", target.work)
            else:
                _remove_work(target)
            raise
        _remove_work(target)
    peak_gpu = gpu_peaks.overall_mb()
    return QuantizeResult(repo_id=target.repo_id, path=str(path), bits=spec.bits, group_size=spec.group_size,
                          sym=spec.sym, method=spec.method, checkpoint_format=checkpoint_format(spec),
                          seconds=round(time.perf_counter() - t0, 2), peak_rss_mb=round(peak_rss_mb(), 1),
                          device=str(dev), layers=layers, peak_gpu_mb=peak_gpu,
                          compute_dtype=str(forward_dtype).removeprefix("torch.") if spec.method == "gptq" else None)


def _no_space_message(error: OSError, model_dir: Path, hidden: int, spec: QuantSpec, calib: CalibSpec,
                      target: _Target) -> str:
    """Out of disk space: where, how much a run like this needs, and that nothing finished is lost."""
    base_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    # output (at most the base at bits/16, plus scales) twice (layer files, then shards) + one layer's activations
    need = 2 * base_bytes * max(spec.bits, 4) / 16 + 2 * calib.samples * calib.seq_len * hidden * 4
    free = shutil.disk_usage(target.work if target.work.exists() else target.work.parent).free
    return (f"no space left on the device writing {error.filename or target.work}: a run like this needs about "
            f"{need / 2**30:.1f} GiB free there ({free / 2**30:.1f} GiB free now); finished layers are kept in "
            f"{target.work}, so the same command continues after freeing space")


def _remove_work(target: _Target) -> None:
    shutil.rmtree(target.work, ignore_errors=True)
    if target.owns_work_root:
        with contextlib.suppress(OSError):
            target.work.parent.rmdir()  # quantkit's shared work folder, when no other run uses it


def _run(model, model_dir, config, config_dict, checkpoint, spec, calib, dev, target, shard_bytes, progress,
         compute_dtype, gpu_peaks: _GpuPeaks):
    """Quantize every layer into target.staging and write the side files; returns (layer reports, file hashes)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as e:
        raise QuantkitError(f"cannot load the tokenizer from {model_dir}: {e}") from None
    skeleton = build_skeleton(config)
    prefix, layers = decoder_layers(skeleton, config.num_hidden_layers)
    # a missing, misplaced or misshapen tensor fails now, from the headers, not hours later at its layer
    checkpoint.check_index()
    for i, layer in enumerate(layers):
        check_tensors(layer, f"{prefix}.{i}", checkpoint)
    for name in checkpoint.names():  # copied into the output as they are: refused now, not after every layer ran
        if not name.startswith(prefix + "."):
            _check_output_tensor(checkpoint, name)
    checkpoint.close()
    _check_packable(spec, f"{prefix}.0", linear_modules(layers[0]))
    storage_dtype = _storage_dtype(torch_dtype_of(config_dict), compute_dtype)

    input_ids = calibration_batch(tokenizer, calib) if spec.method == "gptq" else None
    del tokenizer  # read once; it and tokenizing the text leave about 100 MB that no later step needs
    return_free_heap()
    positions = getattr(config, "max_position_embeddings", None)
    if input_ids is not None and positions and calib.seq_len > positions:
        raise QuantkitError(f"--seq-len {calib.seq_len} is longer than the model's {positions} positions "
                            f"(max_position_embeddings); use --seq-len {positions} or less")
    state = RunState(target.work / "state", run_fingerprint(
        model=model_fingerprint(model_dir), spec=spec.to_dict(), calibration=input_ids, quantkit=__version__,
        torch=torch.__version__, device=dev.type, compute_dtype=str(compute_dtype),
        float32_matmuls=float32_matmul_path(dev)))
    steps = len(layers) + spec.lm_head  # the head, when quantized, is one more step after the layers
    checkpoint = HashedReads(checkpoint)  # each base tensor read is hashed: what each saved step came from
    if state.layers_done:  # before any work: the finished steps' base tensors are the ones there now
        state.check_base(checkpoint, [[f"{prefix}.{i}.{name}" for name, _ in layer.named_parameters()]
                                      for i, layer in enumerate(layers)], steps)
        log.info("resuming after layer %d/%d from %s", state.layers_done, len(layers), target.work)
    dtype_name = str(compute_dtype).removeprefix("torch.")
    saves = BackgroundSaves(enabled=dev.type == "cuda")  # a GPU's layers are short: their saves overlap the next
    batches = calls = ref_batches = None
    with contextlib.ExitStack() as stores:
        if spec.method == "gptq" and state.layers_done < steps:
            log.info("calibration: %d x %d tokens from %s, forwards in %s on %s", calib.samples, calib.seq_len,
                     calib.source, dtype_name, dev)
            new_store = _activation_store(stores, target.work, not saves.enabled,
                                          (1 + spec.gptaq) * input_ids.numel() * config.hidden_size
                                          * storage_dtype.itemsize)
            batches, calls = layer_zero_inputs(skeleton, layers, prefix, checkpoint, input_ids, dev, compute_dtype,
                                                storage_dtype, new_store())
            return_free_heap()  # the small frees of the embedding lookup and the first forward
            if state.layers_done:  # saved as the quantized stream, then (GPTAQ) the unquantized one
                if isinstance(batches, ActivationsOnDisk):
                    batches.close()  # layer 0's inputs; the run continues from later ones
                streams = [new_store() for _ in range(1 + spec.gptaq)]
                state.load_activations(streams)
                batches, ref_batches = streams[0], (streams[1] if spec.gptaq else None)
            elif spec.gptaq:  # the unquantized model's own activations: the same as the quantized ones at layer 0,
                # pinned like the originals on a GPU run, so their copies to the device stay asynchronous
                ref_batches = new_store()
                for b in batches:
                    ref_batches.append(torch.empty(b.shape, dtype=b.dtype, pin_memory=b.is_pinned()).copy_(b))
        bar = _progress_bar(steps, progress)
        bar.update(state.layers_done)
        fmt = checkpoint_format(spec)
        class_checks: dict[type, tuple] = {}  # per decoder-layer class: (blocks folded into the inputs, derivable)
        # on a CPU, o_proj's and down_proj's inputs wait in scratch files that every layer rewrites in place
        kept = stores.enter_context(contextlib.closing(ScratchFiles(target.work))) if dev.type == "cpu" else None
        try:
            _quantize_layers(layers, prefix, checkpoint, spec, fmt, dev, compute_dtype, state, batches, calls, bar,
                             class_checks, saves, target, gpu_peaks, ref_batches, kept)
        except BaseException:
            saves.wait(raise_error=False)  # the work directory must not change under the caller's clean-up
            raise
        saves.wait()
        if spec.lm_head and state.layers_done == len(layers):
            t_head = time.perf_counter()
            kill_point("head:start")
            name, tensors, res = quantize_head(skeleton, layers, prefix, checkpoint, spec, fmt, dev, compute_dtype,
                                               input_ids, batches)
            report = {"index": len(layers), "module": name, "seconds": round(time.perf_counter() - t_head, 2),
                      "losses": {name: res.loss},
                      **({"damp_raised": {name: res.damp}} if res.damp != spec.damp else {})}
            state.note_base(len(layers), checkpoint.digests)
            state.save_layer(len(layers), tensors, report, None)
            log.info("%s  loss=%.4g  (%.1fs)", name, res.loss, report["seconds"])
            checkpoint.close()
            bar.update(1)
        bar.close()
        batches = ref_batches = None  # the last layer's inputs: not needed to assemble the output
    return_free_heap()

    # assemble the output from the finished layers, then everything else (streamed: one layer in memory)
    shutil.rmtree(target.staging, ignore_errors=True)  # left over from a run killed while assembling
    target.staging.mkdir(parents=True)
    writer = ShardWriter(target.staging, shard_bytes)
    quantized: set[str] = set()  # base tensors replaced by packed ones; everything else is copied as it is
    for i in range(steps):
        tensors = state.layer_tensors(i)
        writer.add(tensors)
        quantized |= {f"{n[: -len('.qweight')]}.{p}" for n in tensors if n.endswith(".qweight") for p in ("weight", "bias")}
    for name in checkpoint.names():  # embeddings, norms, lm_head, skipped Linears: in float16
        if name not in quantized:
            writer.add({name: _output_tensor(checkpoint, name)})
    checkpoint.close()
    writer.finish()
    kill_point("assembled")
    reports = state.reports
    in_block = [[n for n in reports[0]["losses"]]] if spec.skip else None  # the quantized Linears of every layer
    compute = {"device": dev.type, "dtype": dtype_name,
               "float32_matmuls": float32_matmul_path(dev)} if spec.method == "gptq" else None
    return reports, _write_side_files(model, model_dir, config_dict, spec, calib, target, reports, writer.total_bytes,
                                      in_block, compute)


def _output_tensor(checkpoint: SafetensorsCheckpoint, name: str) -> torch.Tensor:
    """Base tensor `name` as the output holds it unquantized: floats in OUTPUT_DTYPE, refused (one line) when they
    are not finite there, whether the base holds NaN/Inf or values beyond float16's range."""
    if not checkpoint.is_floating(name):
        return checkpoint.get(name)
    tensor = checkpoint.get_as(name, OUTPUT_DTYPE)
    flat, step = tensor.reshape(-1), 4 << 20  # checked a block at a time: a small boolean temporary
    if not all(bool(torch.isfinite(flat[i:i + step]).all()) for i in range(0, flat.numel(), step)):
        raise _not_finite(checkpoint, name)
    return tensor


def _check_output_tensor(checkpoint: SafetensorsCheckpoint, name: str) -> None:
    """What _output_tensor would refuse, found a block of rows at a time: neither the tensor nor its conversion is
    ever held whole (this runs before calibration, beside the tokenizer)."""
    if checkpoint.is_floating(name) and not all(bool(torch.isfinite(block).all())
                                                for _, block in checkpoint.blocks_as(name, OUTPUT_DTYPE)):
        raise _not_finite(checkpoint, name)


def _not_finite(checkpoint: SafetensorsCheckpoint, name: str) -> QuantkitError:
    """Why tensor `name` is not finite in OUTPUT_DTYPE: NaN/Inf in the base, or values beyond the dtype's range."""
    largest = 0.0
    for _, block in checkpoint.blocks_as(name, torch.float32):
        if not torch.isfinite(block).all():
            return QuantkitError(f"tensor {name} holds NaN or Inf values ({checkpoint.model_dir})")
        largest = max(largest, float(block.abs().max())) if block.numel() else largest
    return QuantkitError(f"tensor {name} holds values up to {largest:.4g}, beyond "
                         f"{str(OUTPUT_DTYPE).removeprefix('torch.')}'s range ({torch.finfo(OUTPUT_DTYPE).max:.0f}), "
                         "which GPTQ checkpoints store it in; rescale or skip this model")


def _side_files(model_dir: Path) -> list[Path]:
    """The tokenizer, chat template and generation files of the base that the output carries, each refused (one
    line) when it is a link leading outside the model: the base's folder, or for a hub-cache snapshot its repo
    folder (whose snapshot files are links to ../../blobs). A link to a file elsewhere would be published."""
    in_cache = model_dir.parent.name == "snapshots" and model_dir.parent.parent.name.startswith("models--")
    root = model_dir.parent.parent if in_cache else model_dir
    found = []
    for name in SIDE_FILES:
        path = model_dir / name
        if path.is_symlink() and not inside(path, root):
            raise QuantkitError(f"{path} is a link to {path.resolve()}, outside the model; quantkit copies "
                                "only files that belong to the model into its output")
        if path.is_file():
            found.append(path)
    return found


def _run_bnb(model, model_dir, config, config_dict, spec, dev, target):
    """bitsandbytes: transformers quantizes while loading; the serialized result plus quantkit's side files."""
    from quantkit.run.bnb import quantize_bnb

    shutil.rmtree(target.staging, ignore_errors=True)
    target.staging.mkdir(parents=True)
    log.info("quantizing with bitsandbytes (%s) on %s", spec.method, dev)
    weight_bytes = quantize_bnb(model_dir, config, spec, target.staging, dev)
    kill_point("assembled")
    return [], _write_side_files(model, model_dir, config_dict, spec, None, target, [], weight_bytes)


def _quantize_layers(layers, prefix, checkpoint, spec, fmt, dev, compute_dtype, state, batches, calls, bar,
                     class_checks, saves: BackgroundSaves, target, gpu_peaks: _GpuPeaks,
                     ref_batches: list | None = None, kept: ScratchFiles | None = None) -> None:
    """Quantize the decoder layers not finished yet, one in memory at a time; `batches` (the calibration
    activations) end as the last layer's outputs. Each finished layer is saved through `saves`. ref_batches (GPTAQ):
    the unquantized model's activations, carried along through unquantized copies of the layers and saved after
    the quantized ones. kept: where a layer's exit Linears' inputs wait (`_gptq_layer`'s spill_dir)."""
    for i, layer in enumerate(layers):
        if i < state.layers_done:
            continue
        t_layer = time.perf_counter()
        kill_point(f"layer:{i}:start")
        materialize(layer, f"{prefix}.{i}", checkpoint, dev, compute_dtype)
        stages = _StageClock(dev, load=t_layer, gpu_peaks=gpu_peaks)
        if i == 0:
            spec.check_skip_patterns(linear_modules(layer))
        last = i == len(layers) - 1 and not spec.lm_head  # no later step needs this layer's outputs
        if spec.method == "gptq":
            results = _gptq_layer(layer, f"{prefix}.{i}", batches, calls[i], spec, fmt, dev, compute_dtype, last,
                                  stages, class_checks, spill_dir=kept,
                                  fold_in_place=not saves.enabled, ref_batches=ref_batches)
        else:
            results = _rtn_layer(layer, f"{prefix}.{i}", spec, fmt)
        tensors = {k: v for res in results.values() for k, v in res.tensors.items()}
        losses = {name: res.loss for name, res in results.items()}
        damps = {name: res.damp for name, res in results.items() if res.damp != spec.damp}
        report = {"index": i, "seconds": round(time.perf_counter() - t_layer, 2), "stage_seconds": stages.seconds,
                  **({"stage_peak_gpu_mb": stages.gpu_mb} if stages.gpu_mb else {}),
                  "losses": losses, **({"damp_raised": damps} if damps else {})}
        for name, damp in damps.items():
            log.warning("%s.%d.%s: Hessian not positive definite; damping raised from %g to %g", prefix, i, name,
                        spec.damp, damp)
        kill_point(f"layer:{i}:solved")
        wait_for_copies(dev)  # the next layer's inputs, copied back from the GPU, are saved below
        # a list is copied (a background save reads its tensors while the next layer replaces them in it); batches
        # on disk are saved synchronously (_activation_store), so they are passed as they are
        streams = [list(s) if isinstance(s, list) else s for s in (batches, ref_batches) if s is not None]
        state.note_base(i, checkpoint.digests)  # the base tensors this layer (and, first, the calibration) read
        saves.submit(functools.partial(_save_layer, state, i, tensors, report,
                                       streams if spec.method == "gptq" and not last else None))
        log.info("layer %d/%d  %s  (%.1fs: %s)%s", i + 1, len(layers),
                 "  ".join(f"{n.split('.')[-1]}={v:.4g}" for n, v in losses.items()), report["seconds"],
                 " ".join(f"{k} {v:.1f}" for k, v in stages.seconds.items()),
                 f"  peak GPU {max(stages.gpu_mb.values()):.0f} MB" if stages.gpu_mb else "")
        release(layer)
        return_free_heap()  # else each layer's small frees stay resident: a creep of about 2 MB a layer
        bar.update(1)


def _save_layer(state: RunState, i: int, tensors: dict, report: dict, activations: list | None) -> None:
    state.save_layer(i, tensors, report, activations)
    kill_point(f"layer:{i}:saved")


def _check_packable(spec: QuantSpec, where: str, modules: dict) -> None:
    """qweight packs input channels and qzeros output channels 32/bits to a word (3-bit: 32 values in 3 words)."""
    step = 32 if spec.bits == 3 else 32 // spec.bits
    for name, module in modules.items():
        n_out, n_in = weight_matrix(module).shape
        if not spec.skips(name) and (n_in % step or n_out % step):
            raise QuantkitError(f"{spec.bits}-bit GPTQ needs every quantized Linear's input and output sizes divisible "
                                f"by {step}; {where}.{name} is {n_in} -> {n_out}. Use --bits 4 or 8, or --skip {name}")


def _activation_store(stores: contextlib.ExitStack, work: Path, on_disk: bool, nbytes: int):
    """A factory of containers for calibration activations: in a scratch file in `work` (spill.ActivationsOnDisk,
    closed with `stores`) when on_disk and there is room for nbytes, else plain lists (a GPU run's pinned batches:
    its background saves read them while the next layer computes)."""
    if not (on_disk and disk_has_room(work, nbytes)):
        return list

    def new():
        return stores.enter_context(contextlib.closing(ActivationsOnDisk(work)))
    return new


def layer_zero_inputs(skeleton, layers, prefix, checkpoint, input_ids, dev, compute_dtype, storage_dtype,
                       store=None):
    """Materialise the modules outside the decoder layers (not lm_head), run the calibration batch up to layer 0;
    its inputs are appended to `store` (a new list by default)."""
    with outer_modules_materialized(skeleton, prefix, checkpoint, dev, compute_dtype):
        return capture_layer_inputs(skeleton, layers, input_ids, calibration_batch_size(input_ids, dev), dev, storage_dtype,
                                    store)


class _GpuPeaks:
    """torch's peak GPU allocation per stage of a layer, its counter reset as each stage ends, and over the whole
    run: where a run's GPU memory goes. Inert on a CPU."""

    def __init__(self, dev: torch.device):
        self.dev, self.overall = dev, 0
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)

    def take(self) -> float | None:
        """MB at the peak since the last call (or the start), then a fresh count; None on a CPU."""
        if self.dev.type != "cuda":
            return None
        peak = torch.cuda.max_memory_allocated(self.dev)
        torch.cuda.reset_peak_memory_stats(self.dev)
        self.overall = max(self.overall, peak)
        return round(peak / 2**20, 1)

    def overall_mb(self) -> float | None:
        if self.dev.type != "cuda":
            return None
        return round(max(self.overall, torch.cuda.max_memory_allocated(self.dev)) / 2**20, 1)


class _StageClock:
    """Seconds per step of a layer (load, forward + Hessians, solve, propagate): where a run's time goes; on a GPU
    also each step's peak allocation (gpu_mb; the load's includes whatever ran since the last layer)."""

    def __init__(self, dev: torch.device, load: float, gpu_peaks: _GpuPeaks):
        self.dev, self.seconds, self.t = dev, {}, load
        self.gpu_peaks, self.gpu_mb = gpu_peaks, {}
        self.lap("load")

    def lap(self, stage: str) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)  # else the GPU's queued work is billed to a later stage
        now = time.perf_counter()
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + now - self.t, 3)
        self.t = now
        peak = self.gpu_peaks.take()
        if peak is not None:
            self.gpu_mb[stage] = max(self.gpu_mb.get(stage, 0.0), peak)


@dataclass
class _Solved:
    tensors: dict[str, torch.Tensor]  # one Linear's checkpoint tensors (qweight, qzeros, scales, ...), on the CPU
    loss: float
    damp: float


def _packed(where: str, name: str, res: GPTQResult, module, spec: QuantSpec, fmt: str) -> _Solved:
    """Pack where the solve ran (on a GPU, in a small fraction of the CPU's time), then keep only the packed
    tensors: a layer's int32 codes are never all held at once."""
    tensors = module_tensors(f"{where}.{name}", res, spec.bits, fmt, module.bias)
    return _Solved({k: v.cpu() for k, v in tensors.items()}, res.loss, res.damp)


def _gptq_layer(layer, where: str, batches, call, spec: QuantSpec, fmt: str, dev, compute_dtype,
                last: bool, clock: _StageClock, class_checks: dict[type, tuple],
                spill_dir: Path | ScratchFiles | None = None, fold_in_place: bool = True,
                ref_batches: list | None = None) -> dict[str, _Solved]:
    """GPTQ every Linear of layer `where` (stage by stage when true-sequential), then propagate the batches.
    class_checks: per layer class, the blocks found foldable and derivable (capture.foldable_blocks and
    derivable_blocks; filled on first use, one check per class).
    spill_dir: where o_proj's and down_proj's inputs may wait for their later use, in a scratch file (on a CPU:
    the page cache holds them, not the process; the propagation applies down_proj to its kept inputs, where
    rerunning gate/up took a sixth of a SmolLM2 layer's time); None keeps o_proj's in memory, down_proj's not.
    fold_in_place: False while the batches are being saved in the background (BlockMemo).
    ref_batches (GPTAQ): the unquantized model's inputs to this layer. A copy of the layer keeps its original
    weights and carries them (capture.Reference); each group's solve then targets the unquantized model's outputs
    (gptq_quantize_shared's `cross`), and ref_batches are propagated through the copy."""
    # GPTAQ: the copy is taken before any weight is quantized
    reference = Reference(copy.deepcopy(layer), ref_batches) if ref_batches is not None else None
    sample = batches[0][:1].clone()  # one sequence (a read from disk where the batches are kept there)
    groups = discover_groups(layer, sample.to(dev, compute_dtype), call)
    groups = [kept for kept in ([n for n in g if not spec.skips(n)] for g in groups) if kept]
    modules = linear_modules(layer)
    skipped = {n for n in modules if spec.skips(n)}  # final from the start: they keep their float weights
    stages = [[g] for g in groups] if spec.true_sequential else [groups]
    results: dict[str, _Solved] = {}
    if spec.true_sequential and type(layer) not in class_checks:  # else nothing is recorded or kept
        class_checks[type(layer)] = (foldable_blocks(layer, groups, sample, call, dev, compute_dtype),
                                     derivable_blocks(layer, groups, sample, call, dev, compute_dtype))
    fold, derivable = class_checks.get(type(layer), (set(), {}))
    hidden = sample.shape[-1]
    streams = 1 if reference is None else 2  # GPTAQ keeps the unquantized copy's inputs too
    if spill_dir is not None and not (spec.true_sequential  # else nothing is kept
                                      and disk_has_room(spill_dir, streams * _kept_inputs_bytes(
                                          batches, modules, hidden, compute_dtype, last))):
        spill_dir = None
    memo_options = dict(storage_dtype=sample.dtype, groups=groups, hidden_size=hidden, fold=fold,
                        spill_dir=spill_dir, propagates=not last, derivable=derivable, fold_in_place=fold_in_place)
    memo = BlockMemo(layer, **memo_options)
    if reference is not None:  # the same bookkeeping for the unquantized copy (capture.Reference)
        reference.memo = BlockMemo(reference.layer, **memo_options)
    replayed: set[str] = set()  # blocks whose weights were dropped: every later pass replays them
    try:
        for stage in stages:
            statistics = collect_statistics(layer, stage, batches, call, dev, compute_dtype, memo,
                                            done=set(results) | skipped, reference=reference)
            for block in set(memo.replayed_from_now_on(len(batches))) - replayed:  # the attention, once the MLP
                release(layer.get_submodule(block))  # stages begin: its weights (128 MB of a 7B layer in bf16) go
                replayed.add(block)
                if reference is not None and block in reference.memo.replayed_from_now_on(len(batches)):
                    release(reference.layer.get_submodule(block))
            clock.lap("hessians")
            for group in stage:
                results.update(_solve_group(where, group, statistics.pop(0), modules, spec, fmt))
            clock.lap("solve")
        if not last:  # the final layer's outputs are never used
            propagate(layer, batches, call, dev, compute_dtype, memo)
            if reference is not None:
                propagate(reference.layer, reference.batches, call, dev, compute_dtype, reference.memo)
            clock.lap("propagate")
    finally:
        memo.close()
        if reference is not None:
            reference.memo.close()
    return {name: results[name] for name in modules if name in results}


def _kept_inputs_bytes(batches, modules: dict, hidden: int, dtype: torch.dtype, last: bool) -> int:
    """Scratch for the largest set of kept inputs over every batch: the widest Linear's (down_proj's, for a Llama
    MLP), or in the last layer, which propagates nothing, the hidden-wide ones (o_proj's)."""
    tokens = sum(math.prod(batch_meta(batches, i)[0][:-1]) for i in range(len(batches)))
    width = hidden if last else max(in_features(m) for m in modules.values())
    return tokens * width * dtype.itemsize


def _solve_group(where: str, group: list[str], statistics, modules: dict, spec: QuantSpec,
                 fmt: str) -> dict[str, _Solved]:
    """GPTQ the Linears sharing a Hessian (consumed), write their dequantized weights back for later stages, and
    keep only their packed tensors: the solve's [N, K] codes and results are freed on return (a 7B layer's gate/up
    codes and results alone are 690 MB). With a GPTAQ cross term the solve targets the weights that reproduce the
    unquantized model's outputs. The caller hands over its only reference to `statistics`."""
    try:
        solved = gptq_quantize_shared([weight_matrix(modules[name]) for name in group], statistics.hessian, spec,
                                      consume_hessian=True, cross=statistics.cross)
    except NumericalError as e:
        raise NumericalError(f"{where}.{group[0]}: {e}") from None  # the group shares its Hessian
    # freed before packing, which was a 7B layer's GPU peak: down_proj's spent 462 MB Hessian and float32 result
    del statistics
    solved = _written_back(group, solved, modules)
    return {name: _packed(where, name, res, modules[name], spec, fmt) for name, res in zip(group, solved)}


def _written_back(group: list[str], solved: list[GPTQResult], modules: dict) -> list[GPTQResult]:
    """Each Linear's weight set to its dequantized result (later stages see the quantized weights); the results
    are returned without that float32 copy."""
    for name, res in zip(group, solved):
        set_weight_matrix(modules[name], res.weight)
    return [replace(res, weight=None) for res in solved]


def _rtn_layer(layer, where: str, spec: QuantSpec, fmt: str) -> dict[str, _Solved]:
    return {name: _packed(where, name, rtn_result(weight_matrix(module), spec), module, spec, fmt)
            for name, module in linear_modules(layer).items() if not spec.skips(name)}


def _write_side_files(model, model_dir, config_dict, spec, calib, target, reports, weight_bytes,
                      modules_in_block=None, compute: dict | None = None) -> dict[str, str]:
    """config.json, quantize_config.json, tokenizer/generation files, model card and manifest; returns sha256s."""
    staging = target.staging
    if not spec.is_bnb:  # bitsandbytes: save_pretrained wrote config.json with its own quantization_config
        qcfg = quantization_config(spec, __version__, modules_in_block)
        config = {k: v for k, v in config_dict.items() if k not in ("torch_dtype",)}
        config.update(dtype="float16", use_cache=True, quantization_config=qcfg)
        if spec.lm_head:
            config["tie_word_embeddings"] = False  # the head is now its own packed tensor
        write_json(staging / "config.json", config)
        write_json(staging / "quantize_config.json", qcfg)
    for path in _side_files(model_dir):
        shutil.copyfile(path, staging / path.name)
    source = model if not Path(model).is_dir() else str(Path(model).resolve())
    (staging / "README.md").write_text(render_model_card(
        repo_id=target.repo_id, source=source, spec=spec, calib=calib, version=__version__,
        fmt=checkpoint_format(spec), layer_losses=[r for r in reports if r["losses"]], size_bytes=weight_bytes))
    hashes = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
    manifest = {
        "quantkit_version": __version__,
        "source": {"model": source, "model_type": config_dict.get("model_type")},
        "quantization": spec.to_dict(),
        "calibration": calib.__dict__ if spec.method == "gptq" else None,
        "compute": compute,  # where and in which dtype the calibration ran: the last bits depend on it
        "layers": [{k: v for k, v in r.items() if k not in ("seconds", "stage_seconds", "stage_peak_gpu_mb")}
                   for r in reports],
        "files": {name: {"sha256": digest, "size": (staging / name).stat().st_size} for name, digest in hashes.items()},
    }
    write_json(staging / MANIFEST_NAME, manifest)
    hashes[MANIFEST_NAME] = sha256_file(staging / MANIFEST_NAME)
    return hashes


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="GPTQ", unit="layer", disable=not (enabled and sys.stderr.isatty()))
