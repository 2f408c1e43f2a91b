"""quantize(): the only module that knows the order of the steps, each a short function below."""
from __future__ import annotations

import contextlib
import errno
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quantkit import __version__
from quantkit.calibrate.batch import calibration_batch_size
from quantkit.calibrate.precision import compute_dtype as choose_compute_dtype
from quantkit.calibrate.precision import fast_float32_matmuls, float32_matmul_path
from quantkit.config import DEFAULT_SHARD_SIZE, CalibSpec, QuantSpec
from quantkit.errors import QuantkitError
from quantkit.faults import kill_point
from quantkit.memory.heap import release_large_frees_at_once, return_free_heap
from quantkit.memory.spill import ScratchFiles
from quantkit.run.assemble import check_output_tensors, side_files, write_shards, write_side_files
from quantkit.run.assemble_gguf import check_gguf_layer, check_gguf_model, write_gguf_output
from quantkit.run.first_inputs import calibration_tokens, first_inputs, load_tokenizer, storage_dtype
from quantkit.run.gguf_output import GGUFLayout
from quantkit.run.layer import LayerJob, Streams, quantize_layers
from quantkit.run.lm_head import head_step
from quantkit.run.model import Skeleton, Source, check_layer_tensors, layer_tensor_names, opened, skeleton_of
from quantkit.run.ranks import Ranks
from quantkit.run.resume import STATE, ResumeRefused, RunState, model_fingerprint, run_fingerprint
from quantkit.run.saves import BackgroundSaves
from quantkit.run.solves import check_packable
from quantkit.run.target import Target
from quantkit.run.telemetry import GpuPeaks, peak_rss_mb, progress_bar
from quantkit.source.checkpoint import torch_dtype_of
from quantkit.source.skeleton import linear_modules
from quantkit.write.gptq_format import checkpoint_format
from quantkit.write.shards import parse_size

log = logging.getLogger("quantkit")
DEFAULT_SPEC, DEFAULT_CALIB = QuantSpec(), CalibSpec()  # quantize()'s defaults (both frozen)


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
    gguf_type: str | None = None  # a GGUF output's llama.cpp file type (bits, group_size and sym do not apply)
    gguf_file: str | None = None  # a GGUF output's file (inside `path` when published into the hub cache)
    peak_gpu_mb: float | None = None  # torch's peak allocation on the GPU, for --device cuda
    phase_seconds: dict[str, float] = field(default_factory=dict)  # where `seconds` went, phase by phase (PHASES)
    processes: int = 1  # the torchrun processes that ran it (peak_rss_mb and peak_gpu_mb: the largest process's)
    rank: int = 0  # this process's (0 writes and publishes the output)
    layers: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# quantize()'s phases in order, as QuantizeResult.phase_seconds names them
PHASES = ("open",          # the base's config and headers opened, the output's target chosen
          "check",         # the tokenizer loaded, every tensor the run reads or copies checked
          "calibration",   # the calibration text read and tokenized into windows
          "first_inputs",  # the windows through the embeddings: the first layer's inputs
          "layers",        # the decoder layers (and the head), each step's own times in `layers`
          "assemble",      # the output's files written in staging
          "publish")       # staging renamed into place (hub cache or --out)


@dataclass
class Run:
    """One quantize call's inputs, resolved: what every step reads."""
    source: Source
    spec: QuantSpec
    calib: CalibSpec
    device: torch.device
    compute_dtype: torch.dtype  # of the calibration forwards
    target: Target
    shard_bytes: int
    progress: bool
    gpu_peaks: GpuPeaks
    gguf: GGUFLayout | None = None  # a GGUF output's layout (spec.gguf_type)
    ranks: Ranks = field(default_factory=Ranks.single)  # the run's processes (one, unless under torchrun)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    peaks: list[tuple[float, float | None]] | None = None  # several processes: each one's peak RSS and GPU MB

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Adds the block's wall time to phase `name` (one of PHASES)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[name] = round(self.phase_seconds.get(name, 0.0) + time.perf_counter() - start, 3)

    @property
    def steps(self) -> int:
        """The decoder layers, and the head when it is quantized: one more step after them."""
        return self.source.config.num_hidden_layers + self.spec.lm_head


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise QuantkitError("--device cuda requested, but no CUDA device is available (torch "
                            f"{torch.__version__}); use --device cpu or install a CUDA build of torch")
    if device not in ("cpu", "cuda"):
        raise QuantkitError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def quantize(model: str, spec: QuantSpec = DEFAULT_SPEC, calib: CalibSpec = DEFAULT_CALIB, *,
             repo_id: str | None = None, out: str | Path | None = None, overwrite: bool = False, device: str = "auto",
             max_shard_size: str = DEFAULT_SHARD_SIZE, work_dir: str | Path | None = None, progress: bool = False,
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
    dev = resolve_device(device)
    ranks = Ranks.from_environment(dev)
    level = log.level
    if not ranks.is_main:
        log.setLevel(max(log.getEffectiveLevel(), logging.WARNING))  # process 0 tells the run's progress
    try:
        result = _quantize(t0, ranks, ranks.device or dev, model, spec, calib, repo_id, out, overwrite,
                           max_shard_size, work_dir, progress, compute_dtype)
    except BaseException:
        # the process group is left to the process's exit: tearing it down beside a process that stopped can
        # abort this one before its error is told
        ranks.failing()
        raise
    finally:
        ranks.close()
        log.setLevel(level)
    return result


def _quantize(t0: float, ranks: Ranks, dev: torch.device, model: str, spec: QuantSpec, calib: CalibSpec,
              repo_id: str | None, out: str | Path | None, overwrite: bool, max_shard_size: str,
              work_dir: str | Path | None, progress: bool, compute_dtype: str) -> QuantizeResult:
    """quantize() in this process, one of `ranks`, on `dev` (this process's GPU under torchrun)."""
    if ranks.distributed and spec.is_bnb:
        raise QuantkitError(f"--method {spec.method} quantizes in one process (transformers loads the model "
                            "whole); run it without torchrun")
    if ranks.distributed and spec.method == "gptq" and calib.samples < ranks.world:
        raise QuantkitError(f"--samples {calib.samples} gives fewer calibration windows than the run's "
                            f"{ranks.world} processes; use --samples {ranks.world} or more")
    if ranks.distributed and spec.method == "gptq" and spec.exact_sums:
        per_batch = calibration_batch_size(calib.seq_len, dev)
        batches = math.ceil(calib.samples / per_batch)
        if batches < ranks.world:
            raise QuantkitError(f"--exact-sums shares the calibration among processes in whole mini-batches of "
                                f"{per_batch} windows: --samples {calib.samples} makes {batches}, fewer than the "
                                f"run's {ranks.world} processes; use --samples {per_batch * (ranks.world - 1) + 1} or "
                                "more")
    with opened(model) as source:
        side_files(source.model_dir)  # a link leading outside the model is refused before any work
        forward_dtype = choose_compute_dtype(compute_dtype, torch_dtype_of(source.config_dict), dev)
        gpu_peaks = GpuPeaks(dev)
        try:
            shard_bytes = parse_size(max_shard_size)
        except ValueError as e:
            raise QuantkitError(str(e)) from None
        target = Target(model, source.model_dir, spec, repo_id, Path(out) if out else None, overwrite, work_dir)
        gguf = GGUFLayout.of(spec, source.config_dict) if spec.is_gguf else None
        run = Run(source, spec, calib, dev, forward_dtype, target, shard_bytes, progress and ranks.is_main,
                  gpu_peaks, gguf, ranks)
        run.phase_seconds["open"] = round(time.perf_counter() - t0, 3)
        with _held(target, ranks):
            layers, path = _quantize_and_publish(run)
    peaks = run.peaks or [(peak_rss_mb(), gpu_peaks.overall_mb())]
    gpu_mb = [p[1] for p in peaks if p[1] is not None]
    return QuantizeResult(repo_id=target.repo_id, path=str(path), bits=spec.bits, group_size=spec.group_size,
                          sym=spec.sym, method=spec.method, checkpoint_format=checkpoint_format(spec),
                          seconds=round(time.perf_counter() - t0, 2),
                          peak_rss_mb=round(max(p[0] for p in peaks), 1), processes=ranks.world, rank=ranks.rank,
                          device=str(dev), layers=layers, peak_gpu_mb=max(gpu_mb) if gpu_mb else None,
                          phase_seconds={p: run.phase_seconds[p] for p in PHASES if p in run.phase_seconds},
                          compute_dtype=_dtype_name(forward_dtype) if spec.method == "gptq" else None,
                          gguf_type=spec.gguf_type, gguf_file=str(path / target.gguf_name if path.is_dir() else path)
                          if target.gguf_name is not None else None)


@contextlib.contextmanager
def _held(target: Target, ranks: Ranks) -> Iterator[None]:
    """The target's lock, taken by process 0 for the whole run; the others start once it holds it (and its work
    directory exists)."""
    if not ranks.is_main:
        ranks.barrier("the start", after="nothing was written")
        yield
        return
    with target.lock():
        ranks.barrier("the start", after="nothing was written")
        yield


def _quantize_and_publish(run: Run) -> tuple[list[dict], Path]:
    """Under the target's lock: the output made in staging and published, then the work directory removed. A
    killed or failed run keeps its finished layers for a resume, else leaves nothing behind. Under several
    processes, process 0 assembles, publishes and removes; the others wait for its published path."""
    target, ranks = run.target, run.ranks
    try:
        try:
            layers, files = _bnb(run) if run.spec.is_bnb else _gptq(run)
            if ranks.distributed:  # each process's peaks, before the publish: nothing may fail after it
                run.peaks = ranks.gathered("the end of the run", (peak_rss_mb(), run.gpu_peaks.overall_mb()))
            published = None
            if ranks.is_main:
                with ranks.uninterrupted("the output was published"), run.phase("publish"):
                    published = target.publish(files)
            path = ranks.from_rank("the publish", 0, published, after="process 0 may have published the output: "
                                                                       "look before rerunning")
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise QuantkitError(target.no_space_message(e, run.source.model_dir, run.source.config.hidden_size,
                                                        run.spec, run.calib)) from None
    except BaseException as e:
        if isinstance(e, ResumeRefused):
            pass  # a state this run must not continue stays as it is; its message says what to do
        elif not ranks.is_main:
            pass  # process 0 keeps or removes the work directory, and says so
        elif (target.state_dir / STATE).is_file():
            log.error("work directory kept for resuming: %s (rerun the same command to continue)", target.work)
        else:
            target.remove_work()
        raise
    if ranks.is_main:
        with ranks.uninterrupted("the output was published"):
            target.remove_work()
    return layers, path


def _gptq(run: Run) -> tuple[list[dict], dict[str, str]]:
    """GPTQ and RTN, in order: check the base and calibrate, find or start the resumable state, quantize each
    layer (and the head), assemble the output; returns (the steps' reports, the output files' sha256s)."""
    with fast_float32_matmuls(run.device):
        skeleton, input_ids = _checked_and_tokenized(run)
        state = _resumable_state(run, skeleton, input_ids)
        _quantize_steps(run, skeleton, state, input_ids)
        return_free_heap()
        if not run.ranks.is_main:
            return state.reports, {}
        with run.phase("assemble"):
            return _assembled(run, state, skeleton)


def _checked_and_tokenized(run: Run) -> tuple[Skeleton, torch.Tensor | None]:
    """The tokenizer loaded, the base model checked from its headers (and the tensors copied into the output as
    they are, for finite values in float16), then the calibration tokens (GPTQ only): failures come before work."""
    source, spec = run.source, run.spec
    with run.phase("check"):
        tokenizer = load_tokenizer(source.model_dir)
        skeleton = skeleton_of(source)
        check_layer_tensors(source, skeleton)
        check_output_tensors(source, skeleton.prefix, skeleton.discarded)
        source.unmap()  # the small tensors the checks read through the mapping
        for i, layer in enumerate(skeleton.layers):  # MoE models: dense first layers, experts in the later ones
            if run.gguf is not None:
                check_gguf_layer(run.gguf, spec, f"{skeleton.prefix}.{i}", layer)
            else:
                check_packable(spec, f"{skeleton.prefix}.{i}", linear_modules(layer))
        if run.gguf is not None:
            check_gguf_model(source, skeleton, run.gguf, spec)
    with run.phase("calibration"):
        input_ids = calibration_tokens(tokenizer, run.calib, source.config) if spec.method == "gptq" else None
    del tokenizer  # read once; it and tokenizing the text leave memory that no later step needs
    return_free_heap()
    return skeleton, input_ids


def _resumable_state(run: Run, skeleton: Skeleton, input_ids: torch.Tensor | None) -> RunState:
    """The run's state in its work directory: a new one, or an unfinished run of the same command and base
    weights to continue (checked before any work)."""
    processes = {"processes": run.ranks.world} if run.ranks.distributed else {}  # each saved its windows' inputs
    state, refusal = None, None
    try:
        state = RunState(run.target.state_dir, run_fingerprint(
            model=model_fingerprint(run.source.model_dir), spec=run.spec.to_dict(), calibration=input_ids,
            quantkit=__version__, torch=torch.__version__, device=run.device.type,
            compute_dtype=str(run.compute_dtype), float32_matmuls=float32_matmul_path(run.device), **processes),
            run.ranks)
        if state.layers_done and run.ranks.is_main:  # before any work: the finished steps' base tensors unchanged
            state.check_base(run.source.reads, layer_tensor_names(run.source, skeleton), run.steps)
    except ResumeRefused as e:
        refusal = str(e)
    # every process refuses with the first refusal (one process's inputs file may be the damaged one)
    refusals = [r for r in run.ranks.gathered("the check of the work directory", refusal) if r is not None]
    if refusals or state is None:
        raise ResumeRefused(refusals[0] if refusals else "internal error: no resume state")
    if state.layers_done:
        log.info("resuming after layer %d/%d from %s", state.layers_done, len(skeleton.layers), run.target.work)
    return state


def _quantize_steps(run: Run, skeleton: Skeleton, state: RunState, input_ids: torch.Tensor | None) -> None:
    """Every step not finished yet: the calibration inputs of the first, each decoder layer, then the head."""
    spec, dev, ranks = run.spec, run.device, run.ranks
    # a GPU's layers are short: their saves overlap the next (a run of several processes saves together, in order)
    saves = BackgroundSaves(enabled=dev.type == "cuda" and not ranks.distributed)
    job = LayerJob(spec, checkpoint_format(spec), dev, run.compute_dtype, state, saves, run.gpu_peaks,
                   gguf=run.gguf, ranks=ranks)
    if input_ids is not None and ranks.distributed:  # each process calibrates on its own windows
        whole = calibration_batch_size(input_ids.shape[1], dev) if spec.exact_sums else None
        input_ids = input_ids[ranks.windows(len(input_ids), whole)]
    with contextlib.ExitStack() as stores:
        streams = Streams(input_ids)
        if input_ids is not None and state.layers_done < run.steps:
            with run.phase("first_inputs"):
                streams = first_inputs(job, run.source, skeleton, input_ids, run.calib, stores, run.target.work,
                                       storage_dtype(torch_dtype_of(run.source.config_dict), run.compute_dtype))
        bar = progress_bar(run.steps, run.progress)
        bar.update(state.layers_done)
        # on a CPU, o_proj's and down_proj's inputs wait in scratch files that every layer rewrites in place
        if dev.type == "cpu":
            job.kept = stores.enter_context(contextlib.closing(ScratchFiles(run.target.work)))
        with run.phase("layers"):
            quantize_layers(job, run.source, skeleton, streams, bar)
            if spec.lm_head and state.layers_done == len(skeleton.layers):
                head_step(job, run.source, skeleton, streams, bar)
        bar.close()


def _assembled(run: Run, state: RunState, skeleton: Skeleton) -> tuple[list[dict], dict[str, str]]:
    """The output in staging, from the finished steps, then everything else; returns (reports, file sha256s)."""
    spec = run.spec
    staging = run.target.fresh_staging()
    if run.gguf is not None:
        return state.reports, write_gguf_output(run.source, state, skeleton, run.gguf, run.target.staged_file(),
                                                run.target.out is None, run.calib, run.target.repo_id, spec)
    weight_bytes = write_shards(run.source, state, run.steps, staging, run.shard_bytes, skeleton.discarded)
    kill_point("assembled")
    reports = state.reports
    # the Linears quantized in any layer (the first may be dense where later ones hold experts)
    in_block = [list(dict.fromkeys(n for r in reports if "module" not in r
                                  for n in r["losses"]))] if spec.skip else None
    compute = {"device": run.device.type, "dtype": _dtype_name(run.compute_dtype),
               "float32_matmuls": float32_matmul_path(run.device)} if spec.method == "gptq" else None
    return reports, write_side_files(run.source, spec, run.calib, staging, run.target.repo_id, reports, weight_bytes,
                                     in_block, compute)


def _bnb(run: Run) -> tuple[list[dict], dict[str, str]]:
    """bitsandbytes: transformers quantizes while loading; the serialized result plus quantkit's side files."""
    from quantkit.run.bnb import quantize_bnb

    staging = run.target.fresh_staging()
    log.info("quantizing with bitsandbytes (%s) on %s", run.spec.method, run.device)
    with run.phase("layers"):
        weight_bytes = quantize_bnb(run.source.model_dir, run.source.config, run.spec, staging, run.device)
    kill_point("assembled")
    with run.phase("assemble"):
        return [], write_side_files(run.source, run.spec, None, staging, run.target.repo_id, [], weight_bytes)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
