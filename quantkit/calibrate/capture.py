"""Running calibration activations through decoder layers: layer inputs, Hessians, propagation.

Hooks are always removed in `finally`. Layers are called exactly as the model's own forward calls them
(the keyword arguments are recorded from a real forward), so rotary embeddings, masks and GQA need no
per-architecture code.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from quantkit.memory.heap import reusing_freed_memory
from quantkit.memory.spill import (
    ActivationsOnDisk,
    KeptInMemory,
    KeptOnDisk,
    ScratchFiles,
    batch_meta,
)
from quantkit.solve.gptq import accumulate_cross, accumulate_hessian
from quantkit.source.skeleton import in_features, linear_modules

log = logging.getLogger("quantkit")


class _StopForward(Exception):
    """Raised from a hook once everything needed from a forward pass has been recorded."""


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records its call, then passes the input through or stops the forward."""

    def __init__(self, wrapped: nn.Module, sink: list, stop: bool):
        super().__init__()
        self.sink, self.stop = sink, stop
        object.__setattr__(self, "_wrapped", wrapped)  # not a submodule: keeps the layer out of state_dict

    def __getattr__(self, name):  # the model may read layer attributes such as `attention_type`
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_wrapped"), name)

    def forward(self, hidden_states, *args, **kwargs):
        self.sink.append((hidden_states, args, kwargs))
        if self.stop:
            raise _StopForward
        return hidden_states


@dataclass
class LayerCall:
    """Everything a decoder layer is called with besides the hidden states."""
    args: tuple
    kwargs: dict


def _to(obj, device, dtype: torch.dtype | None = None, copy: bool = False):
    """obj's tensors moved to device; floating ones also cast to dtype when given. copy: always new tensors."""
    if isinstance(obj, Tensor):
        return _move(obj, torch.device(device), dtype if dtype is not None and obj.is_floating_point() else obj.dtype,
                     copy)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device, dtype, copy) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype, copy) for k, v in obj.items()}
    return obj


def _move(t: Tensor, device: torch.device, dtype: torch.dtype, copy: bool = False) -> Tensor:
    """t on device in dtype. From a GPU to the CPU the copy lands in pinned memory (torch's caching host allocator
    reuses it: no page faults, DMA at full speed) and runs asynchronously, as do copies from pinned memory to the
    GPU. The GPU's stream orders its own readers; CPU readers call `wait_for_copies` first."""
    if device.type == "cpu" and t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=dtype, pin_memory=True)
        return host.copy_(t.to(dtype), non_blocking=True)
    return t.to(device, dtype, non_blocking=device.type == "cuda" and t.is_pinned(), copy=copy)


def wait_for_copies(device: torch.device) -> None:
    """Before the CPU reads activations copied from `device` (to save them, say)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, input_ids: Tensor, batch_size: int,
                         device: torch.device, storage_dtype: torch.dtype,
                         batches: list | ActivationsOnDisk | None = None) -> tuple[list | ActivationsOnDisk,
                                                                                  list[LayerCall]]:
    """Hidden states entering layer 0 (CPU mini-batches, appended to `batches`: a new list by default) and each
    layer's call arguments.

    Needs the model's non-layer input modules (embeddings, rotary tables) materialised on `device`.
    """
    batches = [] if batches is None else batches
    originals = list(layers)
    try:
        # one sample through pass-through recorders: each layer's own kwargs (masks can differ per layer)
        sink: list = []
        for i, layer in enumerate(originals):
            layers[i] = _Recorder(layer, sink, stop=i == len(originals) - 1)
        with contextlib.suppress(_StopForward):
            model(input_ids=input_ids[:1].to(device), use_cache=False)
        calls = [LayerCall(args, kwargs) for _, args, kwargs in sink]
        if len(calls) != len(originals):  # the model chained layers in a way pass-through broke: reuse layer 0's
            calls = [calls[0]] * len(originals)

        sink = []
        layers[0] = _Recorder(originals[0], sink, stop=True)
        for start in range(0, input_ids.shape[0], batch_size):
            with contextlib.suppress(_StopForward):
                model(input_ids=input_ids[start:start + batch_size].to(device), use_cache=False)
            batches.append(_move(sink.pop()[0], torch.device("cpu"), storage_dtype))
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    for call in calls:
        call.kwargs.pop("use_cache", None)
    return batches, calls


def run_layer(layer: nn.Module, hidden: Tensor, call: LayerCall) -> Tensor:
    out = layer(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def discover_groups(layer: nn.Module, hidden: Tensor, call: LayerCall) -> list[list[str]]:
    """The layer's Linear modules in execution order, grouped by shared input (q/k/v share one, gate/up one)."""
    order: list[tuple[str, Tensor]] = []
    handles = [m.register_forward_pre_hook(lambda mod, inp, name=name: order.append((name, inp[0])))
               for name, m in linear_modules(layer).items()]
    try:
        run_layer(layer, hidden, call)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    seen: set[str] = set()
    prev = None
    for name, x in order:
        if name in seen:
            continue
        seen.add(name)
        if prev is not None and x is prev:
            groups[-1].append(name)
        else:
            groups.append([name])
        prev = x
    return groups


@torch.no_grad()
def foldable_blocks(layer: nn.Module, groups: list[list[str]], sample: Tensor, call: LayerCall,
                    device: torch.device, dtype: torch.dtype) -> set[str]:
    """The child blocks whose output the layer adds straight onto its input (h = x + block(...)), found by trying:
    the layer run on x + the block's output, with the block returning zeros, must give its real output bit for
    bit. sample: a stored input (CPU, storage dtype) of full sequence length. A parallel-residual layer (MLP fed
    from x, not h), a norm applied to the block's output, or storage rounder than the compute dtype all fail
    the check, and those blocks are replayed from records as before. The block holding the last group is never
    replayed, so it is not tried."""
    found = set()
    last = groups[-1][0] if groups else None
    for name, child in layer.named_children():
        linears = {f"{name}.{sub}" for sub in linear_modules(child)}
        if not linears or last in linears:
            continue
        outputs = []
        handle = child.register_forward_hook(lambda mod, inp, out: outputs.append(out))
        try:
            reference = run_layer(layer, _move(sample, device, dtype), call)
        finally:
            handle.remove()
        if len(outputs) != 1:  # not run, or run more than once per forward
            continue
        first, tail = _first_tensor(outputs[0]), _tail(outputs[0])
        if first is None or first.shape != sample.shape or any(t is not None for t in tail or ()):
            continue
        first_stored = _move(first, sample.device, sample.dtype)
        wait_for_copies(device)
        folded = sample + first_stored  # as fold_into adds it
        zeros = torch.zeros_like(first)
        child.forward = lambda *args, **kwargs: zeros if tail is None else (zeros, *tail)
        try:
            again = run_layer(layer, _move(folded, device, dtype), call)
        finally:
            del child.forward
        if torch.equal(reference, again):
            found.add(name)
    return found


def exit_linears(layer: nn.Module, groups: list[list[str]]) -> dict[str, tuple[str, set[str]]]:
    """{block: (exit Linear, the Linears run before it)} for the layer's child blocks whose last-run group is one
    Linear (o_proj, down_proj): if the block returns that Linear's output, its kept inputs give the block's
    output without running the block. groups: in execution order (discover_groups)."""
    exits = {}
    for name, child in layer.named_children():
        linears = {f"{name}.{sub}" for sub in linear_modules(child)}
        mine = [i for i, g in enumerate(groups) if set(g) <= linears] if linears else []
        if mine and len(groups[mine[-1]]) == 1:
            exits[name] = (groups[mine[-1]][0], {n for g in groups[:mine[-1]] for n in g})
    return exits


@torch.no_grad()
def derivable_blocks(layer: nn.Module, groups: list[list[str]], sample: Tensor, call: LayerCall,
                     device: torch.device, dtype: torch.dtype) -> dict[str, tuple | None]:
    """The child blocks that return their exit Linear's output and nothing else (but None), found by trying on
    one stored sample: {block: what it returns after that output (None: a bare tensor)}. It is a property of
    the layer's class, so checked once per class; BlockMemo then derives such a block's output from the exit
    Linear's kept inputs without running the real block even once. A block that scales, normalizes or adds to
    its exit Linear's output, runs more than once per forward, or returns more, is not derivable."""
    modules = linear_modules(layer)
    found = {}
    for block, (exit_name, _) in exit_linears(layer, groups).items():
        inputs, outputs = [], []
        handles = [modules[exit_name].register_forward_pre_hook(lambda m, inp: inputs.append(inp[0].contiguous())),
                   layer.get_submodule(block).register_forward_hook(lambda m, inp, out: outputs.append(out))]
        try:
            run_layer(layer, _move(sample, device, dtype), call)
        finally:
            for h in handles:
                h.remove()
        if len(inputs) == 1 and len(outputs) == 1 and isinstance(_first_tensor(outputs[0]), Tensor):
            if _is_exit_output(outputs[0], modules[exit_name](inputs[0]), inputs[0]):
                found[block] = _tail(outputs[0])
    return found


class BlockMemo:
    """Per-batch outputs of a layer's child blocks whose Linear modules are all quantized already.

    True-sequential GPTQ reruns the layer once per stage. A block that can no longer change (the attention,
    once q/k/v/o are quantized) is recorded the first time it completes and replayed afterwards, which saves
    its matmuls in every later stage and in the propagation. Replays return clones, so in-place edits by
    the caller never reach the record; blocks called other than once per forward are never replayed.

    A block in `fold` (one the layer adds straight onto its input, checked by `foldable_blocks`) is not kept at
    all: each batch's record is added into the stored input the moment that batch's forward is done
    (`fold_into`), and the block replays zeros from then on. The sum is what the layer itself would compute,
    bit for bit, and one copy of the activations' size is saved.

    spill_dir: where exit Linears' inputs are kept, in an unlinked scratch file (spill.KeptOnDisk) instead of
    memory. Inputs wider than the hidden states (down_proj's) are kept only there, and only when a propagation
    follows (`propagates`): it then applies down_proj to them instead of rerunning gate/up. Call `close` when
    the layer is done.

    derivable: the blocks `derivable_blocks` found to return their exit Linear's output; only those keep inputs,
    and the real block never runs again. Without it (None) every block with an exit Linear keeps them, and the
    first batch runs the real block to compare.

    fold_in_place: False makes `fold_into` replace a batch by a new tensor instead of adding into it, for
    batches that a background save may still be reading. Batches kept on disk (spill.ActivationsOnDisk) are
    always read, added into and written back.
    """

    def __init__(self, layer: nn.Module, enabled: bool = True, storage_dtype: torch.dtype | None = None,
                 groups: list[list[str]] = (), hidden_size: int = 0, fold: set[str] = frozenset(),
                 spill_dir: Path | ScratchFiles | None = None, propagates: bool = True,
                 derivable: dict[str, tuple | None] | None = None, fold_in_place: bool = True):
        self.layer = layer
        self.storage_dtype = storage_dtype  # records are kept like the activations (the model's dtype)
        self.blocks = {name: {f"{name}.{sub}" for sub in linear_modules(child)}
                       for name, child in layer.named_children() if enabled and linear_modules(child)}
        self.outputs: dict[str, list] = {}
        self.dtypes: dict[str, torch.dtype | None] = {}  # what the block returned, restored on replay
        self.batch = 0  # index of the mini-batch being run
        self.hidden_size = hidden_size
        self.spill_dir = spill_dir
        self.derivable = derivable
        self.exit_after: dict[str, set[str]] = {}  # block -> the Linears run before its exit Linear
        self.exits = self._exit_linears(groups, keep_wide=spill_dir is not None and propagates)  # {block: exit}
        self.seeds: dict[str, KeptInMemory | KeptOnDisk] = {}  # block -> its exit Linear's inputs, one per batch
        self.done: set[str] = set()  # the Linears quantized already, in the pass being run
        self.fold = set(fold)  # blocks whose records are added into the stored inputs (foldable_blocks)
        self.folded: dict[str, list[torch.Size]] = {}  # folded block -> its output's shape, one per batch
        self.tails: dict[str, tuple | None] = {}  # what a block returned after its first tensor (None: a tensor)
        self.fold_in_place = fold_in_place

    def _exit_linears(self, groups: list[list[str]], keep_wide: bool) -> dict[str, str]:
        """{block: exit Linear} whose inputs are kept (`exit_linears`). Inputs wider than the hidden states
        (down_proj's) would cost more memory than the activations themselves: kept only if keep_wide."""
        modules = linear_modules(self.layer)
        exits = {}
        for block, (exit_linear, after) in exit_linears(self.layer, groups).items():
            if block not in self.blocks or (self.derivable is not None and block not in self.derivable):
                continue
            if keep_wide or in_features(modules[exit_linear]) <= self.hidden_size:
                exits[block] = exit_linear
                self.exit_after[block] = after
        return exits

    def keep_exit_input(self, linear: str, x: Tensor) -> None:
        """Called with each batch's input to `linear` while it is calibrated (a Hessian hook). Kept only when every
        Linear run before it is quantized already (true-sequential): else a later pass would see other inputs.
        In a scratch file they keep the compute dtype (exact on a CPU); in memory, the activations' dtype."""
        for block, exit_linear in self.exits.items():
            if exit_linear != linear or block in self.outputs or not self.exit_after[block] <= self.done:
                continue
            try:
                if self.spill_dir is None:
                    self.seeds.setdefault(block, KeptInMemory()).append(_to(x, "cpu", self.storage_dtype, copy=True))
                    continue
                if block not in self.seeds:
                    self.seeds[block] = KeptOnDisk(self.spill_dir)
                self.seeds[block].append(x)  # copied to the CPU there, synchronously
            except OSError as e:  # a full disk costs time (the block reruns), never the run
                log.warning("cannot keep %s's inputs in %s (%s); %s will be rerun instead", linear, self.spill_dir,
                            e, block)
                self._drop_seeds(block)
                del self.exits[block]
                return

    def _drop_seeds(self, block: str) -> None:
        seeds = self.seeds.pop(block, None)
        if seeds is not None:
            seeds.close()

    def replayed_from_now_on(self, n_batches: int) -> list[str]:
        """The blocks that every later pass of this layer replays (records complete for every batch, or folded
        into the inputs) instead of running: their weights are not read again."""
        return [name for name in self.blocks
                if len(self.folded.get(name, ())) == n_batches
                or (name not in self.folded and len(self.outputs.get(name, ())) == n_batches)]

    def close(self) -> None:
        """Free every kept input (and its scratch file)."""
        for block in list(self.seeds):
            self._drop_seeds(block)

    @contextlib.contextmanager
    def replaying(self, done: set[str], n_batches: int, device: torch.device, last_pass: bool = False):
        """Replay recorded final blocks; record final blocks not recorded yet (kept if complete for every batch).

        last_pass: no later pass reads the records (the propagation), so each is freed once replayed and nothing
        new is recorded: a record is as large as the activations themselves."""
        handles, replaced, recording = [], [], []
        seeded_before = set(self.seeds)  # kept by the previous stage: used now, or never
        self.done = set(done)
        for name, linears in self.blocks.items():
            if not linears <= done:
                continue
            child = self.layer.get_submodule(name)
            if name in self.outputs:
                child.forward = functools.partial(self._replay, name, device, last_pass)
                replaced.append(child)
                continue
            if not last_pass:
                self.outputs[name] = []
                recording.append(name)
                handles.append(child.register_forward_hook(functools.partial(self._record, name)))
            if len(self.seeds.get(name, ())) == n_batches:
                child.forward = functools.partial(self._from_exit_input, name, child.forward)
                replaced.append(child)
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for child in replaced:
                del child.forward
            for name in recording:
                if len(self.outputs[name]) != n_batches:  # stopped before it completed, or called twice
                    del self.outputs[name]
            for name in seeded_before:
                self._drop_seeds(name)

    def _replay(self, block: str, device: torch.device, last_use: bool, *args, **kwargs):
        """The block's recorded output for this batch: a copy (the caller may edit it in place), or on its last
        use the record itself, dropped from the memo."""
        if block in self.folded:  # already added into the layer's input
            zeros = torch.zeros(self.folded[block][self.batch], dtype=self.dtypes[block], device=device)
            return zeros if self.tails[block] is None else (zeros, *self.tails[block])
        records = self.outputs[block]
        if last_use:
            record, records[self.batch] = records[self.batch], None
            return _to(record, device, self.dtypes[block])
        return _to(records[self.batch], device, self.dtypes[block], copy=True)

    def _from_exit_input(self, block: str, forward, *args, **kwargs):
        """The block's output as its exit Linear applied to the kept input. Unless the block's class was checked
        (`derivable`), batch 0 runs the real block and is compared with that: a block that does more after its
        exit Linear (or returns more than one tensor) runs for real on every batch."""
        seeds = self.seeds.get(block)
        if seeds is None:  # dropped on batch 0: the block does more than its exit Linear
            return forward(*args, **kwargs)
        exit_linear = self.layer.get_submodule(self.exits[block])
        device = exit_linear.weight.device
        try:
            kept = seeds.take(self.batch)  # each kept input is freed once used
        except (OSError, RuntimeError) as e:  # unreadable, or the block runs twice per forward: run it for real
            if isinstance(e, OSError):
                log.warning("cannot read %s's kept inputs back (%s); it is rerun instead", block, e)
            self._drop_seeds(block)
            return forward(*args, **kwargs)
        if self.derivable is not None:
            out = exit_linear(_move(kept, device, exit_linear.weight.dtype))
            tail = self.derivable[block]
            return out if tail is None else (out, *tail)
        if self.batch == 0:
            real = forward(*args, **kwargs)
            first = _first_tensor(real)
            self.dtypes[block], self.tails[block] = first.dtype if first is not None else None, _tail(real)
            derived = exit_linear(_move(kept, device, first.dtype)) if first is not None else None
            if derived is None or not _is_exit_output(real, derived, kept):
                self._drop_seeds(block)
            return real
        out = exit_linear(_move(kept, device, self.dtypes[block]))
        return out if self.tails[block] is None else (out, *self.tails[block])

    def _record(self, name, module, inputs, output) -> None:
        """Forward hook: keep a copy of the block's output for this batch (on the CPU, in the storage dtype)."""
        first = _first_tensor(output)
        self.dtypes[name] = first.dtype if first is not None else None
        self.tails[name] = _tail(output)
        self.outputs[name].append(_to(output, "cpu", self.storage_dtype, copy=True))

    def fold_into(self, batches: list[Tensor], i: int, device: torch.device, read: Tensor | None = None) -> None:
        """After batch i's forward: add the records of `fold` blocks made in it into batches[i] (the layer's stored
        input) and drop them. The caller's forward is over, so the layer no longer reads the input it changes.
        read: batches[i] as the caller read it for that forward, so batches on disk are not read a second time."""
        pending = [name for name in self.fold if name in self.outputs and len(self.folded.get(name, ())) == i
                   and len(self.outputs[name]) > i]  # recorded in this batch and not folded yet
        if pending:
            wait_for_copies(device)  # records copied back from a GPU arrive asynchronously
        for name in pending:
            records = self.outputs[name]
            if len(records) != i + 1:
                raise RuntimeError(f"internal error: {name} ran {len(records) - i} times in batch {i}; it cannot "
                                   "be folded into the layer's input")
            record, records[i] = _first_tensor(records[i]), None
            if isinstance(batches, ActivationsOnDisk):  # a read is a copy: add into it, write it back
                folded = batches[i] if read is None else read
                folded.add_(record)
                batches[i] = folded
            elif self.fold_in_place:
                batches[i].add_(record)
            else:  # the old tensor may still be being saved (resume.BackgroundSaves): a new one, same sum,
                # pinned like the old (its later copies to the GPU then stay asynchronous)
                old = batches[i]
                batches[i] = torch.add(old, record, out=torch.empty(old.shape, dtype=old.dtype,
                                                                    pin_memory=old.is_pinned()))
            self.folded.setdefault(name, []).append(record.shape)

def _tail(output) -> tuple | None:
    """What a block returned after its first element (attention weights, ...); None when it returned a tensor."""
    return tuple(output[1:]) if isinstance(output, (tuple, list)) else None


def _first_tensor(output) -> Tensor | None:
    return next((t for t in (output if isinstance(output, (tuple, list)) else [output]) if isinstance(t, Tensor)), None)


def _is_exit_output(real, derived: Tensor, kept: Tensor) -> bool:
    """Whether a block returned its exit Linear's output and nothing else but None beside it: equal up to the
    rounding of a 16-bit kept input, or for a float32 one up to the order of the matmul's sums (the kept input
    is contiguous where the block's own may not be), which grows with sqrt(in_features). Anything the block
    does after its exit Linear (a scale, an added term, a norm) is far outside that."""
    first = real[0] if isinstance(real, (tuple, list)) else real
    rest = real[1:] if isinstance(real, (tuple, list)) else ()
    if not isinstance(first, Tensor) or any(r is not None for r in rest) or first.shape != derived.shape:
        return False
    tolerance = 4 * max(torch.finfo(kept.dtype).eps, torch.finfo(torch.float32).eps * math.sqrt(kept.shape[-1]))
    err = (first.float() - derived.float()).norm()
    return bool(err <= tolerance * first.float().norm())


@dataclass
class Reference:
    """The unquantized model's side of GPTAQ (asymmetric calibration): a copy of the layer with its original
    weights and that model's own activations entering it, one per mini-batch (CPU, like the quantized ones).

    Its memo follows the quantized layer's schedule (the same `done` sets): its blocks never change, so any
    schedule replays them correctly, and this one records, keeps and folds them exactly when the quantized
    layer's memo does: the attention runs once per batch, not once per stage."""
    layer: nn.Module
    batches: list[Tensor]
    memo: BlockMemo | None = None


@dataclass
class Statistics:
    """What one calibration pass gathers for a group of Linears sharing an input: the Hessian, and with a
    reference the cross term of GPTAQ (gptq.accumulate_cross)."""
    hessian: Tensor
    cross: Tensor | None = None


def collect_hessians(layer: nn.Module, groups: list[list[str]], batches: list[Tensor], call: LayerCall,
                     device: torch.device, dtype: torch.dtype, memo: BlockMemo | None = None,
                     done: set[str] = frozenset()) -> list[Tensor]:
    """One float32 Hessian per group, from inputs to the group's first member; the forward stops after the last.

    `done` names the Linear modules quantized already; `memo` replays blocks made only of those.
    """
    return [s.hessian for s in collect_statistics(layer, groups, batches, call, device, dtype, memo, done)]


@torch.no_grad()
def collect_statistics(layer: nn.Module, groups: list[list[str]], batches: list[Tensor], call: LayerCall,
                       device: torch.device, dtype: torch.dtype, memo: BlockMemo | None = None,
                       done: set[str] = frozenset(), reference: Reference | None = None) -> list[Statistics]:
    """`collect_hessians`, and with a `reference` each group's GPTAQ cross term too: each batch first runs through
    the unquantized copy of the layer, up to the last group, whose inputs to the groups are paired with the
    quantized layer's inputs for the same tokens."""
    modules = linear_modules(layer)
    memo = memo or BlockMemo(layer, enabled=False)
    ref_memo = ref_modules = None
    if reference is not None:
        ref_memo = reference.memo or BlockMemo(reference.layer, enabled=False)
        ref_modules = linear_modules(reference.layer)
    state = []
    handles = []
    ref_inputs: dict[str, Tensor] = {}  # this batch's unquantized inputs to each group's first Linear
    for gi, group in enumerate(groups):
        first = modules[group[0]]
        k = in_features(first)
        entry = {"H": torch.zeros(k, k, device=device), "n": 0,
                 "C": torch.zeros(k, k, device=device) if reference is not None else None}
        state.append(entry)

        def hook(mod, inp, entry=entry, name=group[0], last=gi == len(groups) - 1):
            if reference is not None:  # before the Hessian's update: both are running means over the same tokens
                if name not in ref_inputs:  # a Linear the layer calls twice per forward: no pairing of inputs
                    raise RuntimeError(f"GPTAQ: {name} ran more often in the quantized layer than in its unquantized "
                                       "copy; this layer cannot be calibrated with --gptaq")
                accumulate_cross(entry["C"], entry["n"], ref_inputs.pop(name), inp[0])
            entry["H"], entry["n"] = accumulate_hessian(entry["H"], entry["n"], inp[0])
            memo.keep_exit_input(name, inp[0])
            if last:
                raise _StopForward
        handles.append(first.register_forward_pre_hook(hook))
        if reference is not None:
            def ref_hook(mod, inp, name=group[0], last=gi == len(groups) - 1):
                ref_inputs[name] = inp[0]
                ref_memo.keep_exit_input(name, inp[0])
                if last:
                    raise _StopForward
            handles.append(ref_modules[group[0]].register_forward_pre_hook(ref_hook))
    try:
        with memo.replaying(set(done), len(batches), device), \
                (ref_memo.replaying(set(done), len(batches), device) if ref_memo else contextlib.nullcontext()), \
                _forward_temporaries_reused(layer, batches, device, dtype):
            for i, hidden in enumerate(batches):
                memo.batch = i
                if reference is not None:
                    ref_memo.batch = i
                    ref_hidden = reference.batches[i]
                    with contextlib.suppress(_StopForward):  # the hooks end each forward after the last group
                        run_layer(reference.layer, _move(ref_hidden, device, dtype), call)
                with contextlib.suppress(_StopForward):
                    run_layer(layer, _move(hidden, device, dtype), call)
                memo.fold_into(batches, i, device, read=hidden)
                if reference is not None:  # after both forwards: the inputs it paired may be views of the batch
                    ref_inputs.clear()
                    ref_memo.fold_into(reference.batches, i, device, read=ref_hidden)
    finally:
        for h in handles:
            h.remove()
    return [Statistics(entry["H"], entry["C"]) for entry in state]


@torch.no_grad()
def propagate(layer: nn.Module, batches: list[Tensor], call: LayerCall, device: torch.device,
              dtype: torch.dtype, memo: BlockMemo | None = None) -> None:
    """Replace each mini-batch in place by the layer's output on it (the next layer's input)."""
    memo = memo or BlockMemo(layer, enabled=False)
    with memo.replaying(set(linear_modules(layer)), len(batches), device, last_pass=True), \
            _forward_temporaries_reused(layer, batches, device, dtype):
        for i, hidden in enumerate(batches):
            memo.batch = i
            batches[i] = _move(run_layer(layer, _move(hidden, device, dtype), call), torch.device("cpu"), hidden.dtype)


def _forward_temporaries_reused(layer: nn.Module, batches, device: torch.device, dtype: torch.dtype):
    """On a CPU, the window in which a pass's forward temporaries are kept for the next mini-batch
    (heap.reusing_freed_memory), sized by the widest activation of a mini-batch: its tokens times the widest Linear.
    A GPU's temporaries come from torch's own caching allocator: nothing to do."""
    if device.type != "cpu" or not len(batches):
        return contextlib.nullcontext()
    shape, _ = batch_meta(batches, 0)
    widest = max([shape[-1], *(max(m.weight.shape) for m in linear_modules(layer).values())])
    return reusing_freed_memory(math.prod(shape[:-1]) * widest * max(dtype.itemsize, torch.float32.itemsize))


class _Stand(nn.Module):
    """Stands in for a decoder layer when only what follows the layers matters: passes its input through, or
    (the last layer) returns the recorded output of the real last layer."""

    def __init__(self, wrapped: nn.Module, output: dict | None):
        super().__init__()
        self.output = output
        object.__setattr__(self, "_wrapped", wrapped)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_wrapped"), name)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states if self.output is None else self.output["hidden"]


@torch.no_grad()
def collect_head_hessian(model: nn.Module, layers: nn.ModuleList, head: nn.Module, input_ids: Tensor,
                         final_hidden: list[Tensor], device: torch.device, dtype: torch.dtype) -> Tensor:
    """The float32 Hessian of the output head's inputs: the model's own tail (final norm, projections) applied to
    the last decoder layer's outputs `final_hidden` (mini-batches, in order of `input_ids`).

    Needs the modules outside the layers materialised on `device`; the head itself stays on meta (the forward
    stops at its input).
    """
    originals = list(layers)
    current: dict = {}
    entry = {"H": torch.zeros(head.in_features, head.in_features, device=device), "n": 0}

    def hook(mod, inp):
        entry["H"], entry["n"] = accumulate_hessian(entry["H"], entry["n"], inp[0])
        raise _StopForward

    handle = head.register_forward_pre_hook(hook)
    try:
        for i, layer in enumerate(originals):
            layers[i] = _Stand(layer, current if i == len(originals) - 1 else None)
        start = 0
        for hidden in final_hidden:
            current["hidden"] = _move(hidden, device, dtype)
            with contextlib.suppress(_StopForward):
                model(input_ids=input_ids[start:start + hidden.shape[0]].to(device), use_cache=False)
            start += hidden.shape[0]
    finally:
        handle.remove()
        for i, layer in enumerate(originals):
            layers[i] = layer
    return entry["H"]
