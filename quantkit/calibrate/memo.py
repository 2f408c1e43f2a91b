"""BlockMemo: the outputs of a decoder layer's finished child blocks, recorded once and replayed, folded into the
layer's stored input, or derived from their exit Linears' kept inputs, so later passes of the layer skip them."""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from quantkit.calibrate.block_outputs import Tail, first_tensor, is_exit_output, tail_of, with_tail
from quantkit.calibrate.kept_inputs import KeptExitInputs, kept_exits
from quantkit.calibrate.transfer import move, move_all, wait_for_copies
from quantkit.memory.spill import Activations, KeptInMemory, KeptOnDisk, ScratchFiles
from quantkit.source.skeleton import linear_modules, weight_matrix


class BlockMemo:
    """Per-batch outputs of a layer's child blocks whose Linear modules are all quantized already.

    True-sequential GPTQ reruns the layer once per stage. A block that can no longer change (the attention,
    once q/k/v/o are quantized) is recorded the first time it completes and replayed afterwards, which saves
    its matmuls in every later stage and in the propagation. Replays return clones, so in-place edits by
    the caller never reach the record; blocks called other than once per forward are never replayed.

    A block in `fold` (one the layer adds straight onto its input, checked by `probes.foldable_blocks`) is not
    kept at all: each batch's record is added into the stored input the moment that batch's forward is done
    (`fold_into`), and the block replays zeros from then on. The sum is what the layer itself would compute,
    bit for bit, and one copy of the activations' size is saved.

    spill_dir: where exit Linears' inputs are kept (kept_inputs.KeptExitInputs), in an unlinked scratch file
    instead of memory. Inputs wider than the hidden states (down_proj's) are kept only there, and only when a
    propagation follows (`propagates`): it then applies down_proj to them instead of rerunning gate/up. Call
    `close` when the layer is done.

    derivable: the blocks `probes.derivable_blocks` found to return their exit Linear's output; only those keep
    inputs, and the real block never runs again. Without it (None) every block with an exit Linear keeps them,
    and the first batch runs the real block to compare.

    fold_in_place: False makes `fold_into` replace a batch by a new tensor instead of adding into it, for
    batches that a background save may still be reading. Batches whose reads are copies (on disk) are always
    read, added into and written back.
    """

    def __init__(self, layer: nn.Module, enabled: bool = True, storage_dtype: torch.dtype | None = None,
                 groups: Sequence[Sequence[str]] = (), hidden_size: int = 0, fold: AbstractSet[str] = frozenset(),
                 spill_dir: Path | ScratchFiles | None = None, propagates: bool = True,
                 derivable: dict[str, Tail] | None = None, fold_in_place: bool = True) -> None:
        self.layer = layer
        self.storage_dtype = storage_dtype  # records are kept like the activations (the model's dtype)
        self.blocks = {name: {f"{name}.{sub}" for sub in linear_modules(child)}
                       for name, child in layer.named_children() if enabled and linear_modules(child)}
        self.outputs: dict[str, list[Any]] = {}
        self.dtypes: dict[str, torch.dtype | None] = {}  # what the block returned, restored on replay
        self.batch = 0  # index of the mini-batch being run
        self.derivable = derivable
        self.kept = KeptExitInputs(kept_exits(layer, groups, self.blocks, derivable, hidden_size,
                                              keep_wide=spill_dir is not None and propagates),
                                   storage_dtype, spill_dir)
        self.done: set[str] = set()  # the Linears quantized already, in the pass being run
        self.fold = set(fold)  # blocks whose records are added into the stored inputs (foldable_blocks)
        self.folded: dict[str, list[torch.Size]] = {}  # folded block -> its output's shape, one per batch
        self.tails: dict[str, Tail] = {}  # what a block returned after its first tensor (None: a tensor)
        self.fold_in_place = fold_in_place

    @property
    def exits(self) -> dict[str, str]:
        """{block: exit Linear} whose inputs are kept."""
        return self.kept.exits

    @property
    def seeds(self) -> dict[str, KeptInMemory | KeptOnDisk]:
        """{block: its exit Linear's kept inputs, one per batch}."""
        return self.kept.seeds

    def keep_exit_input(self, linear: str, x: Tensor) -> None:
        """Called with each batch's input to `linear` while it is calibrated (a Hessian hook). Kept only when every
        Linear run before it is quantized already (true-sequential): else a later pass would see other inputs."""
        self.kept.keep(linear, x, self.done, self.outputs)

    def replayed_from_now_on(self, n_batches: int) -> list[str]:
        """The blocks that every later pass of this layer replays (records complete for every batch, or folded
        into the inputs) instead of running: their weights are not read again."""
        return [name for name in self.blocks
                if len(self.folded.get(name, ())) == n_batches
                or (name not in self.folded and len(self.outputs.get(name, ())) == n_batches)]

    def close(self) -> None:
        """Free every kept input (and its scratch file)."""
        self.kept.close()

    @contextlib.contextmanager
    def replaying(self, done: AbstractSet[str], n_batches: int, device: torch.device,
                  last_pass: bool = False) -> Iterator[None]:
        """Replay recorded final blocks; record final blocks not recorded yet (kept if complete for every batch).

        last_pass: no later pass reads the records (the propagation), so each is freed once replayed and nothing
        new is recorded: a record is as large as the activations themselves."""
        handles, replaced, recording = [], [], []
        seeded_before = set(self.kept.seeds)  # kept by the previous stage: used now, or never
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
            if self.kept.count(name) == n_batches:
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
                self.kept.drop(name)

    def _replay(self, block: str, device: torch.device, last_use: bool, *args: object, **kwargs: object) -> object:
        """The block's recorded output for this batch: a copy (the caller may edit it in place), or on its last
        use the record itself, dropped from the memo."""
        if block in self.folded:  # already added into the layer's input
            zeros = torch.zeros(self.folded[block][self.batch], dtype=self.dtypes[block], device=device)
            return with_tail(zeros, self.tails[block])
        records = self.outputs[block]
        if last_use:
            record, records[self.batch] = records[self.batch], None
            return move_all(record, device, self.dtypes[block])
        return move_all(records[self.batch], device, self.dtypes[block], copy=True)

    def _from_exit_input(self, block: str, forward: Callable[..., Any], *args: object, **kwargs: object) -> object:
        """The block's output as its exit Linear applied to the kept input. Unless the block's class was checked
        (`derivable`), batch 0 runs the real block and is compared with that: a block that does more after its
        exit Linear (or returns more than one tensor) runs for real on every batch."""
        kept = self.kept.take(block, self.batch)  # each kept input is freed once used
        if kept is None:  # dropped, unreadable, or the block runs twice per forward: run it for real
            return forward(*args, **kwargs)
        exit_linear = self.layer.get_submodule(self.kept.exits[block])
        weight = weight_matrix(exit_linear)
        device = weight.device
        if self.derivable is not None:
            return with_tail(exit_linear(move(kept, device, weight.dtype)), self.derivable[block])
        if self.batch == 0:
            real = forward(*args, **kwargs)
            first = first_tensor(real)
            self.dtypes[block], self.tails[block] = first.dtype if first is not None else None, tail_of(real)
            derived = exit_linear(move(kept, device, first.dtype)) if first is not None else None
            if derived is None or not is_exit_output(real, derived, kept):
                self.kept.drop(block)
            return real
        dtype = self.dtypes[block]
        return with_tail(exit_linear(move(kept, device, kept.dtype if dtype is None else dtype)), self.tails[block])

    def _record(self, name: str, module: nn.Module, inputs: tuple[Any, ...], output: object) -> None:
        """Forward hook: keep a copy of the block's output for this batch (on the CPU, in the storage dtype)."""
        first = first_tensor(output)
        self.dtypes[name] = first.dtype if first is not None else None
        self.tails[name] = tail_of(output)
        self.outputs[name].append(move_all(output, "cpu", self.storage_dtype, copy=True))

    def fold_into(self, batches: Activations, i: int, device: torch.device, read: Tensor | None = None) -> None:
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
            record, records[i] = first_tensor(records[i]), None
            if record is None:  # foldable_blocks admits only blocks whose output starts with a tensor
                raise RuntimeError(f"internal error: {name} returned no tensor in batch {i}; it cannot be folded")
            add_into_batch(batches, i, record, read, self.fold_in_place)
            self.folded.setdefault(name, []).append(record.shape)


def add_into_batch(batches: Activations, i: int, record: Tensor, read: Tensor | None, in_place: bool) -> None:
    """batches[i] += record, as the store allows: a read that is a copy is added into and written back (read:
    batches[i] as read already, or None to read it); else in place, or (in_place False) into a new tensor."""
    if batches.reads_are_copies:
        folded = batches[i] if read is None else read
        folded.add_(record)
        batches[i] = folded
    elif in_place:
        batches[i].add_(record)
    else:  # the old tensor may still be being saved (saves.BackgroundSaves): a new one, same sum,
        # pinned like the old (its later copies to the GPU then stay asynchronous)
        old = batches[i]
        batches[i] = torch.add(old, record, out=torch.empty(old.shape, dtype=old.dtype, pin_memory=old.is_pinned()))
