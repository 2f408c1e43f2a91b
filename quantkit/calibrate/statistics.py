"""Running the calibration mini-batches through one decoder layer: each group of Linears' Hessian (and GPTAQ's cross
term), and the propagation that turns the layer's inputs into the next layer's."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from quantkit.calibrate.forward import LayerCall, StopForward, run_layer
from quantkit.calibrate.memo import BlockMemo
from quantkit.calibrate.transfer import move
from quantkit.memory.heap import reusing_freed_memory
from quantkit.memory.spill import Activations
from quantkit.solve.hessian import SUM_DTYPE, accumulate_cross, accumulate_hessian, add_cross, add_gram
from quantkit.source.skeleton import in_features, linear_modules, weight_matrix


@dataclass
class Reference:
    """The unquantized model's side of GPTAQ (asymmetric calibration): a copy of the layer with its original
    weights and that model's own activations entering it, one per mini-batch (CPU, like the quantized ones).

    Its memo follows the quantized layer's schedule (the same `done` sets): its blocks never change, so any
    schedule replays them correctly, and this one records, keeps and folds them exactly when the quantized
    layer's memo does: the attention runs once per batch, not once per stage."""
    layer: nn.Module
    batches: Activations
    memo: BlockMemo | None = None


@dataclass
class Statistics:
    """What one calibration pass gathers for a group of Linears sharing an input: the Hessian, and with a
    reference the cross term of GPTAQ (hessian.accumulate_cross). Float32 running means, or with exact sums their
    float64 sums (hessian.SUM_DTYPE), which run.ranks.Ranks.mean_to turns into the means."""
    hessian: Tensor
    cross: Tensor | None = None
    tokens: int = 0  # the inputs summed (for an expert: the tokens routed to it)


@dataclass
class HessianSum:
    """The Hessian of a Linear's inputs summed so far, and the tokens it sums: a float32 running mean
    (hessian.accumulate_hessian), or in hessian.SUM_DTYPE an exact sum (hessian.add_gram)."""
    hessian: Tensor
    tokens: int = 0
    cross: Tensor | None = field(default=None)  # GPTAQ's cross term, summed over the same tokens

    @classmethod
    def zeros(cls, k: int, device: torch.device, cross: bool = False, exact: bool = False) -> HessianSum:
        """An empty sum for inputs of width k (and GPTAQ's cross term beside it); exact: an exact sum."""
        dtype = SUM_DTYPE if exact else torch.float32
        return cls(torch.zeros(k, k, device=device, dtype=dtype),
                   cross=torch.zeros(k, k, device=device, dtype=dtype) if cross else None)

    @property
    def exact(self) -> bool:
        return self.hessian.dtype == SUM_DTYPE

    def add(self, x: Tensor) -> None:
        if self.exact:
            self.tokens += add_gram(self.hessian, x)
        else:
            self.hessian, self.tokens = accumulate_hessian(self.hessian, self.tokens, x)

    def add_cross(self, x_ref: Tensor, x: Tensor) -> None:
        """GPTAQ's cross term for the tokens of x, which `add` then counts."""
        if self.cross is None:
            raise RuntimeError("internal error: a cross term added to a Hessian summed without one")
        if self.exact:
            add_cross(self.cross, x_ref, x)
        else:
            accumulate_cross(self.cross, self.tokens, x_ref, x)


def collect_hessians(layer: nn.Module, groups: Sequence[Sequence[str]], batches: Activations, call: LayerCall,
                     device: torch.device, dtype: torch.dtype, memo: BlockMemo | None = None,
                     done: AbstractSet[str] = frozenset()) -> list[Tensor]:
    """One float32 Hessian per group, from inputs to the group's first member; the forward stops after the last.

    `done` names the Linear modules quantized already; `memo` replays blocks made only of those.
    """
    return [s.hessian for s in collect_statistics(layer, groups, batches, call, device, dtype, memo, done)]


@torch.no_grad()
def collect_statistics(layer: nn.Module, groups: Sequence[Sequence[str]], batches: Activations, call: LayerCall,
                       device: torch.device, dtype: torch.dtype, memo: BlockMemo | None = None,
                       done: AbstractSet[str] = frozenset(), reference: Reference | None = None,
                       paired: bool = True, exact: bool = False) -> list[Statistics]:
    """`collect_hessians`, and with a `reference` each group's GPTAQ cross term too: each batch first runs through
    the unquantized copy of the layer, up to the last group, whose inputs to the groups are paired with the
    quantized layer's inputs for the same tokens. paired=False: the reference still runs (its memo keeps step
    with the layer's) but no cross term is summed (experts: the two models route different tokens to them).
    exact: float64 exact sums instead of running means (QuantSpec.exact_sums)."""
    memo = memo if memo is not None else BlockMemo(layer, enabled=False)
    ref_memo, ref_modules = None, {}
    if reference is not None:
        ref_memo = reference.memo if reference.memo is not None else BlockMemo(reference.layer, enabled=False)
        ref_modules = linear_modules(reference.layer)
    sums: list[HessianSum] = []
    ref_inputs: dict[str, Tensor] = {}  # this batch's unquantized inputs to each group's first Linear
    handles: list[RemovableHandle] = []
    modules = linear_modules(layer)
    for gi, group in enumerate(groups):
        k = in_features(modules[group[0]])
        sums.append(HessianSum.zeros(k, device, cross=reference is not None and paired, exact=exact))
        last = gi == len(groups) - 1
        handles.append(modules[group[0]].register_forward_pre_hook(
            _hessian_hook(sums[-1], group[0], last, memo, ref_inputs if reference is not None else None)))
        if reference is not None and ref_memo is not None:
            handles.append(ref_modules[group[0]].register_forward_pre_hook(
                _reference_hook(group[0], last, ref_memo, ref_inputs)))
    try:
        with memo.replaying(set(done), len(batches), device), \
                (ref_memo.replaying(set(done), len(batches), device) if ref_memo else contextlib.nullcontext()), \
                forward_temporaries_reused(layer, batches, device, dtype):
            for i, hidden in enumerate(batches):
                _calibrate_batch(layer, i, hidden, batches, call, device, dtype, memo, reference, ref_memo,
                                 ref_inputs)
    finally:
        for h in handles:
            h.remove()
    return [Statistics(s.hessian, s.cross, s.tokens) for s in sums]


def _hessian_hook(sums: HessianSum, name: str, last: bool, memo: BlockMemo,
                  ref_inputs: dict[str, Tensor] | None) -> Callable[[nn.Module, tuple[Any, ...]], None]:
    """The pre-hook on a group's first Linear: its input into the group's sums (with ref_inputs, GPTAQ's cross term
    first: both are running means over the same tokens) and the memo's kept inputs; the last group ends the forward."""
    def hook(mod: nn.Module, inp: tuple[Any, ...]) -> None:
        if ref_inputs is not None and sums.cross is not None:
            if name not in ref_inputs:  # a Linear the layer calls twice per forward: no pairing of inputs
                raise RuntimeError(f"GPTAQ: {name} ran more often in the quantized layer than in its unquantized "
                                   "copy; this layer cannot be calibrated with --gptaq")
            sums.add_cross(ref_inputs.pop(name), inp[0])
        sums.add(inp[0])
        memo.keep_exit_input(name, inp[0])
        if last:
            raise StopForward
    return hook


def _reference_hook(name: str, last: bool, ref_memo: BlockMemo,
                    ref_inputs: dict[str, Tensor]) -> Callable[[nn.Module, tuple[Any, ...]], None]:
    """The pre-hook on the unquantized copy's Linear: its input, for the quantized layer's hook to pair."""
    def hook(mod: nn.Module, inp: tuple[Any, ...]) -> None:
        ref_inputs[name] = inp[0]
        ref_memo.keep_exit_input(name, inp[0])
        if last:
            raise StopForward
    return hook


def _calibrate_batch(layer: nn.Module, i: int, hidden: Tensor, batches: Activations, call: LayerCall,
                     device: torch.device, dtype: torch.dtype, memo: BlockMemo, reference: Reference | None,
                     ref_memo: BlockMemo | None, ref_inputs: dict[str, Tensor]) -> None:
    """Batch i through the unquantized copy (with a reference), then the layer, each up to the last group (the
    hooks end the forwards); then the memos fold their records into the stored inputs."""
    memo.batch = i
    ref_hidden = None
    if reference is not None and ref_memo is not None:
        ref_memo.batch = i
        ref_hidden = reference.batches[i]
        with contextlib.suppress(StopForward):
            run_layer(reference.layer, move(ref_hidden, device, dtype), call)
    with contextlib.suppress(StopForward):
        run_layer(layer, move(hidden, device, dtype), call)
    memo.fold_into(batches, i, device, read=hidden)
    if reference is not None and ref_memo is not None:  # after both forwards: the inputs it paired may be views
        ref_inputs.clear()
        ref_memo.fold_into(reference.batches, i, device, read=ref_hidden)


@torch.no_grad()
def propagate(layer: nn.Module, batches: Activations, call: LayerCall, device: torch.device,
              dtype: torch.dtype, memo: BlockMemo | None = None) -> None:
    """Replace each mini-batch in place by the layer's output on it (the next layer's input)."""
    memo = memo if memo is not None else BlockMemo(layer, enabled=False)
    with memo.replaying(set(linear_modules(layer)), len(batches), device, last_pass=True), \
            forward_temporaries_reused(layer, batches, device, dtype):
        for i, hidden in enumerate(batches):
            memo.batch = i
            batches[i] = move(run_layer(layer, move(hidden, device, dtype), call), torch.device("cpu"), hidden.dtype)


def forward_temporaries_reused(layer: nn.Module, batches: Activations, device: torch.device,
                               dtype: torch.dtype) -> contextlib.AbstractContextManager[None]:
    """On a CPU, the window in which a pass's forward temporaries are kept for the next mini-batch
    (heap.reusing_freed_memory), sized by the widest activation of a mini-batch: its tokens times the widest Linear.
    A GPU's temporaries come from torch's own caching allocator: nothing to do."""
    if device.type != "cpu" or not len(batches):
        return contextlib.nullcontext()
    shape, _ = batches.meta(0)
    widest = max([shape[-1], *(max(weight_matrix(m).shape) for m in linear_modules(layer).values())])
    return reusing_freed_memory(math.prod(shape[:-1]) * widest * max(dtype.itemsize, torch.float32.itemsize))
