"""What a decoder layer's class does with its Linears and child blocks, found by running it on one sample: which
Linears share an input, which blocks add straight onto the layer's input, which return their exit Linear's output."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from quantkit.calibrate.block_outputs import Tail, first_tensor, is_exit_output, tail_of, with_tail
from quantkit.calibrate.forward import LayerCall, run_layer
from quantkit.calibrate.transfer import move, wait_for_copies
from quantkit.source.experts import UnfusedExperts
from quantkit.source.skeleton import linear_modules


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
def foldable_blocks(layer: nn.Module, groups: Sequence[Sequence[str]], sample: Tensor, call: LayerCall,
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
        if linears and last not in linears and _adds_onto_input(layer, child, sample, call, device, dtype):
            found.add(name)
    return found


def _adds_onto_input(layer: nn.Module, child: nn.Module, sample: Tensor, call: LayerCall, device: torch.device,
                     dtype: torch.dtype) -> bool:
    """foldable_blocks' trial for one child block."""
    outputs = []
    handle = child.register_forward_hook(lambda mod, inp, out: outputs.append(out))
    try:
        reference = run_layer(layer, move(sample, device, dtype), call)
    finally:
        handle.remove()
    if len(outputs) != 1:  # not run, or run more than once per forward
        return False
    first, tail = first_tensor(outputs[0]), tail_of(outputs[0])
    if first is None or first.shape != sample.shape or any(t is not None for t in tail or ()):
        return False
    first_stored = move(first, sample.device, sample.dtype)
    wait_for_copies(device)
    folded = sample + first_stored  # as BlockMemo.fold_into adds it
    zeros = torch.zeros_like(first)
    child.forward = lambda *args, **kwargs: with_tail(zeros, tail)
    try:
        again = run_layer(layer, move(folded, device, dtype), call)
    finally:
        del child.forward
    return torch.equal(reference, again)


def exit_linears(layer: nn.Module, groups: Sequence[Sequence[str]]) -> dict[str, tuple[str, set[str]]]:
    """{block: (exit Linear, the Linears run before it)} for the layer's child blocks whose last-run group is one
    Linear (o_proj, down_proj): if the block returns that Linear's output, its kept inputs give the block's
    output without running the block. groups: in execution order (discover_groups)."""
    exits = {}
    for name, child in layer.named_children():
        if any(isinstance(m, UnfusedExperts) for m in child.modules()):
            continue  # a Mixture-of-Experts block sums its experts: no one Linear gives its output
        linears = {f"{name}.{sub}" for sub in linear_modules(child)}
        mine = [i for i, g in enumerate(groups) if set(g) <= linears] if linears else []
        if mine and len(groups[mine[-1]]) == 1:
            exits[name] = (groups[mine[-1]][0], {n for g in groups[:mine[-1]] for n in g})
    return exits


@torch.no_grad()
def derivable_blocks(layer: nn.Module, groups: Sequence[Sequence[str]], sample: Tensor, call: LayerCall,
                     device: torch.device, dtype: torch.dtype) -> dict[str, Tail]:
    """The child blocks that return their exit Linear's output and nothing else (but None), found by trying on
    one stored sample: {block: what it returns after that output (None: a bare tensor)}. It is a property of
    the layer's class, so checked once per class; BlockMemo then derives such a block's output from the exit
    Linear's kept inputs without running the real block even once. A block that scales, normalizes or adds to
    its exit Linear's output, runs more than once per forward, or returns more, is not derivable."""
    modules = linear_modules(layer)
    found = {}
    for block, (exit_name, _) in exit_linears(layer, groups).items():
        inputs, outputs = _exit_trial(layer, block, modules[exit_name], sample, call, device, dtype)
        if len(inputs) == 1 and len(outputs) == 1 and isinstance(first_tensor(outputs[0]), Tensor):
            if is_exit_output(outputs[0], modules[exit_name](inputs[0]), inputs[0]):
                found[block] = tail_of(outputs[0])
    return found


def _exit_trial(layer: nn.Module, block: str, exit_linear: nn.Module, sample: Tensor, call: LayerCall,
                device: torch.device, dtype: torch.dtype) -> tuple[list[Tensor], list[object]]:
    """The layer run on sample: the inputs its exit Linear saw and the outputs the block returned (one each when
    both run once per forward)."""
    inputs: list[Tensor] = []
    outputs: list[object] = []
    handles = [exit_linear.register_forward_pre_hook(lambda m, inp: inputs.append(inp[0].contiguous())),
               layer.get_submodule(block).register_forward_hook(lambda m, inp, out: outputs.append(out))]
    try:
        run_layer(layer, move(sample, device, dtype), call)
    finally:
        for h in handles:
            h.remove()
    return inputs, outputs
