"""One decoder layer's quantization: its Linears solved (GPTQ, stage by stage, or RTN) and packed, its report,
the calibration activations carried on to the next layer, and the layer saved for a resume."""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from quantkit.calibrate.forward import LayerCall
from quantkit.calibrate.memo import BlockMemo
from quantkit.calibrate.probes import derivable_blocks, discover_groups, foldable_blocks
from quantkit.calibrate.statistics import Reference, collect_statistics, propagate
from quantkit.calibrate.transfer import wait_for_copies
from quantkit.config import QuantSpec
from quantkit.errors import QuantkitError
from quantkit.faults import kill_point
from quantkit.memory.heap import return_free_heap
from quantkit.memory.spill import Activations, ActivationsInMemory, ScratchFiles, disk_has_room
from quantkit.run.experts import ExpertChunks, Loader, loaded_per_chunk
from quantkit.run.gguf_output import GGUFLayout
from quantkit.run.model import Skeleton, Source
from quantkit.run.prefetch import LayerPrefetch, prefetch_wanted
from quantkit.run.ranks import Ranks
from quantkit.run.resume import RunState
from quantkit.run.saves import BackgroundSaves
from quantkit.run.solves import Solved, rtn_layer, solve_stage
from quantkit.run.stages import layer_stages
from quantkit.run.step_report import raised_damping, step_report
from quantkit.run.telemetry import GpuPeaks, StageClock, log_layer
from quantkit.source.experts import UnfusedExperts, expert_blocks, only_experts
from quantkit.source.skeleton import (
    in_features,
    linear_modules,
    materialize,
    read_now,
    release,
)

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger("quantkit")


@dataclass
class LayerJob:
    """What the quantization of every decoder layer (and of the head) shares: the settings, where it computes,
    where finished steps go, and the run's telemetry."""
    spec: QuantSpec
    fmt: str  # checkpoint format (gptq_format.checkpoint_format)
    device: torch.device
    compute_dtype: torch.dtype  # of the calibration forwards
    state: RunState  # finished steps, saved for a resume
    saves: BackgroundSaves
    gpu_peaks: GpuPeaks
    kept: ScratchFiles | None = None  # where a layer's exit Linears' inputs wait (gptq_layer's spill_dir)
    gguf: GGUFLayout | None = None  # a GGUF output: the Linears are solved onto llama.cpp's blocks
    ranks: Ranks = field(default_factory=Ranks.single)  # the run's processes (one, unless under torchrun)
    # per decoder-layer class and kind (dense, or with experts: DeepSeek's first layers are dense, of the same
    # class): (blocks folded into the inputs, derivable blocks), found once per kind
    class_checks: dict[tuple[type, bool], tuple[set[str], dict]] = field(default_factory=dict)


@dataclass
class Streams:
    """The calibration data carried from layer to layer (all None for RTN, which calibrates nothing)."""
    input_ids: Tensor | None = None  # the calibration tokens
    batches: Activations | None = None  # the quantized model's inputs to the next layer
    calls: list[LayerCall] | None = None  # each layer's call arguments besides the hidden states
    reference: Activations | None = None  # GPTAQ: the unquantized model's inputs to the next layer


def quantize_layers(job: LayerJob, source: Source, skeleton: Skeleton, streams: Streams, bar: tqdm) -> None:
    """Quantize the decoder layers not finished yet, one in memory at a time; streams.batches end as the last
    layer's outputs. Each finished layer is saved through job.saves; on failure the save in flight is awaited
    (the work directory must not change under the caller's clean-up)."""
    prefetch = LayerPrefetch(source.model_dir, source.reads, pin=job.device.type == "cuda") \
        if prefetch_wanted(job.device) else None
    try:
        for i in range(job.state.layers_done, len(skeleton.layers)):
            quantize_layer(job, source, skeleton, i, streams, prefetch)
            bar.update(1)
    except BaseException:
        job.saves.wait(raise_error=False)
        raise
    finally:
        if prefetch is not None:
            prefetch.close()
    job.saves.wait()


def quantize_layer(job: LayerJob, source: Source, skeleton: Skeleton, i: int, streams: Streams,
                   prefetch: LayerPrefetch | None = None) -> None:
    """Load layer i (read ahead by `prefetch`, which then starts on layer i + 1), solve and pack its Linears,
    carry the calibration batches through it, save it."""
    spec, layer, where = job.spec, skeleton.layers[i], f"{skeleton.prefix}.{i}"
    t_layer = time.perf_counter()
    kill_point(f"layer:{i}:start")
    later = loaded_per_chunk(layer, spec)  # experts whose weights load a chunk at a time
    reader = prefetch.reader(i) if prefetch is not None else source.checkpoint
    materialize(layer, where, reader, job.device, job.compute_dtype, skeleton.names, later=later)
    if prefetch is not None and i + 1 < len(skeleton.layers):
        ahead, ahead_name = skeleton.layers[i + 1], f"{skeleton.prefix}.{i + 1}"
        prefetch.start(i + 1, [full for _, full, _, _ in read_now(ahead, ahead_name, source.checkpoint, skeleton.names,
                                                                   loaded_per_chunk(ahead, spec))])
    stages = StageClock(job.device, load=t_layer, gpu_peaks=job.gpu_peaks)
    if i == 0:
        spec.check_skip_patterns(dict.fromkeys(n for lay in skeleton.layers for n in linear_modules(lay)))
    last = i == len(skeleton.layers) - 1 and not spec.lm_head  # no later step needs this layer's outputs
    out_name = functools.partial(skeleton.output_name, i)
    if spec.method == "gptq":
        def load(module: nn.Module, path: str) -> None:
            materialize(module, f"{where}.{path}", source.checkpoint, job.device, job.compute_dtype, skeleton.names)
        results = gptq_layer(job, layer, where, streams, i, last, stages, out_name, (later, load))
    else:
        results = rtn_layer(layer, spec, job.fmt, out_name, job.gguf)
    in_layer = functools.partial(skeleton.name_in_layer, i)
    experts = expert_report(results, expert_blocks(layer), spec, in_layer)
    results = {in_layer(name): res for name, res in results.items()}  # reports use the checkpoint's names
    report = step_report(i, round(time.perf_counter() - t_layer, 2), results, spec, stages=stages, experts=experts)
    for name, damp in raised_damping(results, spec).items():
        log.warning("%s.%s: Hessian not positive definite; damping raised from %g to %g", where, name, spec.damp, damp)
    kill_point(f"layer:{i}:solved")
    wait_for_copies(job.device)  # the next layer's inputs, copied back from the GPU, are saved below
    save_layer(job, i, {k: v for res in results.values() for k, v in res.tensors.items()}, report, streams,
               source, with_inputs=spec.method == "gptq" and not last)
    log_layer(i, len(skeleton.layers), report, stages)
    release(layer)
    return_free_heap()  # else each layer's small frees stay resident and memory creeps with depth


def save_layer(job: LayerJob, i: int, tensors: dict[str, Tensor], report: dict, streams: Streams, source: Source,
               with_inputs: bool) -> None:
    """Hand step i to job.saves, with the next layer's inputs (both streams under GPTAQ) when with_inputs. A
    background save (a GPU's) reads the batches while the next layer replaces them in the store, so it gets a
    copy of the list. Otherwise the files are written now, before anything changes, and only their commit
    (syncing them to disk, then state.json) overlaps the next layer; in a run of several processes the commit
    holds collectives, so it runs here, before the next layer."""
    stores = [s for s in (streams.batches, streams.reference) if s is not None]
    inputs = [ActivationsInMemory(s) if job.saves.enabled else s for s in stores] if with_inputs else None
    job.state.note_base(i, source.reads.digests)  # the base tensors this layer (and, first, the calibration) read
    if job.saves.enabled:
        job.saves.submit(functools.partial(_save_step, job.state, i, tensors, report, inputs))
        return
    job.saves.wait()  # one commit in flight at most: this layer's write follows the previous layer's commit
    commit = job.state.write_layer(i, tensors, report, inputs)
    # the commit of a run of several processes holds collectives: it runs here, in order with the others
    job.saves.submit(functools.partial(_commit_step, commit, i), background=not job.ranks.distributed)


def _save_step(state: RunState, i: int, tensors: dict[str, Tensor], report: dict,
               activations: list[Activations] | None) -> None:
    state.save_layer(i, tensors, report, activations)
    kill_point(f"layer:{i}:saved")


def _commit_step(commit: Callable[[], None], i: int) -> None:
    commit()
    kill_point(f"layer:{i}:saved")


def gptq_layer(job: LayerJob, layer: nn.Module, where: str, streams: Streams, i: int, last: bool,
               clock: StageClock, out_name: Callable[[str], str],
               experts: tuple[set[str], Loader]) -> dict[str, Solved]:
    """GPTQ every Linear of layer `where` (stage by stage when true-sequential), then propagate the batches.

    On a CPU (job.kept), o_proj's and down_proj's inputs may wait for their later use in a scratch file (the page
    cache holds them, not the process; the propagation applies down_proj to its kept inputs instead of rerunning
    gate/up); without, o_proj's are kept in memory and down_proj's not. While saves run in the background, the
    batches are not folded in place (calibrate.memo.BlockMemo). GPTAQ (streams.reference): a copy of the layer keeps
    its original weights and carries the unquantized model's inputs (calibrate.statistics.Reference); each group's
    solve then targets the unquantized model's outputs (gptq_quantize_shared's `cross`), except an expert's: the
    two models route different tokens to it, so experts are solved as plain GPTQ on the quantized model's routing.
    Mixture-of-Experts blocks go a chunk of experts per pass (run.stages); an expert routed fewer than
    spec.expert_min_tokens tokens is rounded to nearest. out_name: a Linear's name in the output. experts: the
    experts left on the meta device, loaded a chunk at a time (run.experts), and how to load one."""
    spec, dev, dtype = job.spec, job.device, job.compute_dtype
    batches, calls = streams.batches, streams.calls
    if batches is None or calls is None:
        raise QuantkitError(f"internal error: GPTQ of {where} without calibration batches")
    call = calls[i]
    # GPTAQ: the copy is taken before any weight is quantized
    reference = Reference(copy.deepcopy(layer), streams.reference) if streams.reference is not None else None
    sample = batches[0][:1].clone()  # one sequence (a read from disk where the batches are kept there)
    later, load = experts
    modules = linear_modules(layer)
    skipped = {n for n in modules if spec.skips(n)}  # final from the start: they keep their float weights
    with only_experts(layer, frozenset()):  # the experts' weights wait for their chunk; their groups are known
        groups = discover_groups(layer, sample.to(dev, dtype), call)
        groups = [kept for kept in ([n for n in g if n not in skipped] for g in groups) if kept]
        stages = layer_stages(layer, groups, spec)
        groups = [g for stage in stages for g in stage.groups]
        memo, ref_memo = _memos(job, layer, groups, sample, call, batches, modules, last, reference)
    chunks = ExpertChunks(layer, later, load, batches, call, dev, dtype, memo, not last, reference, job.kept)
    results: dict[str, Solved] = {}
    replayed: set[str] = set()  # blocks whose weights were dropped: every later pass replays them
    try:
        for k, stage in enumerate(stages):
            chunks.enter(stage)
            with only_experts(layer, stage.experts), (contextlib.nullcontext() if reference is None else
                                                      only_experts(reference.layer, stage.experts_of_reference)):
                statistics = collect_statistics(layer, stage.groups, batches, call, dev, dtype, memo,
                                                done=set(results) | skipped, reference=reference,
                                                paired=not stage.is_expert_stage(), exact=spec.exact_sums)
            for block in set(memo.replayed_from_now_on(len(batches))) - replayed:  # the attention, once the MLP
                release(layer.get_submodule(block))  # stages begin: its weights leave memory
                replayed.add(block)
                if reference is not None and ref_memo is not None and \
                        block in ref_memo.replayed_from_now_on(len(batches)):
                    release(reference.layer.get_submodule(block))
            clock.lap("hessians")
            results.update(solve_stage(job.ranks, where, stage.groups, statistics, modules, spec, job.fmt,
                                       out_name, stage.is_expert_stage(), job.gguf))
            clock.lap("solve")
            chunks.leave(stage, stages[k + 1] if k + 1 < len(stages) else None, set(results) | skipped)
            kill_point(f"layer:{i}:stage:{k}")
        if not last:  # the final layer's outputs are never used
            with chunks.replayed():
                propagate(layer, batches, call, dev, dtype, memo)
                if reference is not None:
                    propagate(reference.layer, reference.batches, call, dev, dtype, ref_memo)
            clock.lap("propagate")
    finally:
        chunks.close()
        memo.close()
        if ref_memo is not None:
            ref_memo.close()
    return {name: results[name] for name in modules if name in results}


def _memos(job: LayerJob, layer: nn.Module, groups: list[list[str]], sample: Tensor, call: LayerCall,
           batches: Activations, modules: dict[str, nn.Module], last: bool,
           reference: Reference | None) -> tuple[BlockMemo, BlockMemo | None]:
    """The layer's calibrate.memo.BlockMemo, and the same bookkeeping for GPTAQ's unquantized copy (set as its
    reference.memo; its blocks never change, so it follows the quantized layer's schedule): which blocks are
    folded into the inputs or derived from their exit Linear's kept inputs (checked once per layer class, and
    only true-sequential runs record or keep anything), and where the kept inputs wait."""
    spec, dev, dtype = job.spec, job.device, job.compute_dtype
    kind = (type(layer), bool(expert_blocks(layer)))
    if spec.true_sequential and kind not in job.class_checks:
        job.class_checks[kind] = (foldable_blocks(layer, groups, sample, call, dev, dtype),
                                         derivable_blocks(layer, groups, sample, call, dev, dtype))
    fold, derivable = job.class_checks.get(kind, (set(), {}))
    hidden = sample.shape[-1]
    streams = 1 if reference is None else 2  # GPTAQ keeps the unquantized copy's inputs too
    spill_dir = job.kept
    if spill_dir is not None and not (spec.true_sequential  # else nothing is kept
                                      and disk_has_room(spill_dir, streams * kept_inputs_bytes(
                                          batches, modules, hidden, dtype, last))):
        spill_dir = None

    def memo(of: nn.Module) -> BlockMemo:
        return BlockMemo(of, storage_dtype=sample.dtype, groups=groups, hidden_size=hidden, fold=fold,
                         spill_dir=spill_dir, propagates=not last, derivable=derivable,
                         fold_in_place=not job.saves.enabled)

    quantized = memo(layer)
    if reference is not None:
        reference.memo = memo(reference.layer)
        return quantized, reference.memo
    return quantized, None


def kept_inputs_bytes(batches: Activations, modules: dict[str, nn.Module], hidden: int, dtype: torch.dtype,
                      last: bool) -> int:
    """Scratch for the largest set of kept inputs over every batch: the widest Linear's (down_proj's, for a Llama
    MLP), or in the last layer, which propagates nothing, the hidden-wide ones (o_proj's)."""
    tokens = sum(math.prod(batches.meta(i)[0][:-1]) for i in range(len(batches)))
    width = hidden if last else max(in_features(m) for m in modules.values())
    return tokens * width * dtype.itemsize


def expert_report(results: dict[str, Solved], blocks: dict[str, UnfusedExperts], spec: QuantSpec,
                  in_layer: Callable[[str], str]) -> dict:
    """Per MoE block (named as the checkpoint names it, through in_layer): the calibration tokens the router sent
    each expert, the experts rounded to nearest for having fewer than spec.expert_min_tokens, and those kept in
    float whole (--skip; their token count reads 0: nothing counted them). A GPTQ run's; RTN calibrates nothing."""
    report = {}
    for name, block in blocks.items():
        tokens: dict[int, int] = {}  # expert -> its tokens, for the experts with a Linear solved
        rounded: set[int] = set()
        for linear, res in results.items():
            if linear.startswith(f"{name}.") and res.tokens is not None:
                expert = int(linear[len(name) + 1:].split(".", 1)[0])
                tokens[expert] = res.tokens
                if res.rounded:
                    rounded.add(expert)
        if not tokens:
            continue
        first = f"0.{block.layout.gate}"  # the block's name in the checkpoint, read off its first Linear's
        report[in_layer(f"{name}.{first}").removesuffix(f".{first}")] = {
            "experts": block.num_experts, "tokens": [tokens.get(e, 0) for e in range(block.num_experts)],
            "rounded": sorted(rounded), "min_tokens": spec.expert_min_tokens,
            "skipped": sorted(e for e in range(block.num_experts) if e not in tokens)}
    return report
