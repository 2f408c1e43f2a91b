"""A Mixture-of-Experts layer's experts, one chunk in memory at a time: loaded for the chunk's stages, run once
more over every mini-batch when quantized so their outputs join the block's running sums
(calibrate.expert_sums), then dropped. Peak memory then holds one chunk's weights and Hessians, whatever the
number of experts; the propagation takes the block's output from the sums."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

import torch
from torch import nn

from quantkit.calibrate.expert_sums import adding_into, replaying
from quantkit.calibrate.forward import LayerCall
from quantkit.calibrate.memo import BlockMemo
from quantkit.calibrate.statistics import Reference, collect_statistics
from quantkit.config import QuantSpec
from quantkit.memory.heap import return_free_heap
from quantkit.memory.spill import Activations, ActivationsInMemory, ActivationsOnDisk, ScratchFiles
from quantkit.run.stages import Stage
from quantkit.source.experts import UnfusedExperts, expert_blocks, only_experts
from quantkit.source.skeleton import linear_modules, release

# loads the parameters of a module of the layer (its path within the layer) from the base checkpoint
Loader = Callable[[nn.Module, str], None]


def loaded_per_chunk(layer: nn.Module, spec: QuantSpec) -> set[str]:
    """The experts (paths within the layer, 'mlp.experts.3') whose weights wait on the meta device until their
    chunk: those with a Linear to quantize. Experts kept whole in float (--skip) load with the layer."""
    if spec.method != "gptq":
        return set()
    return {f"{name}.{e}" for name, block in expert_blocks(layer).items() for e in range(block.num_experts)
            if any(not spec.skips(f"{name}.{e}.{sub}") for sub in linear_modules(block.expert(e)))}


@dataclass
class ExpertChunks:
    """The chunk lifecycle of one layer's lazily loaded experts (loaded_per_chunk), for the stage loop of
    run.layer.gptq_layer; with GPTAQ, the unquantized copy's experts (original weights) follow the same chunks."""
    layer: nn.Module
    lazy: set[str]
    load: Loader
    batches: Activations
    call: LayerCall
    device: torch.device
    dtype: torch.dtype
    memo: BlockMemo
    propagates: bool
    reference: Reference | None = None
    scratch: ScratchFiles | None = None  # where the sums wait when the batches are on disk
    sums: dict[tuple[int, str], Activations] = field(default_factory=dict)  # (0 layer | 1 reference, block) -> sums
    loaded: frozenset[int] = frozenset()

    def enter(self, stage: Stage) -> None:
        """Before a stage: its chunk's experts loaded (the previous chunk is finished by then)."""
        if stage.block is None or stage.experts is None or stage.experts == self.loaded:
            return
        for e in sorted(stage.experts):
            if f"{stage.block}.{e}" in self.lazy:
                self.load(self.layer.get_submodule(f"{stage.block}.{e}"), f"{stage.block}.{e}")
        self.loaded = stage.experts

    def leave(self, stage: Stage, following: Stage | None, done: AbstractSet[str]) -> None:
        """After a stage: when it ends its chunk, the chunk's outputs join the sums (if the layer propagates) and
        its weights leave memory."""
        if stage.block is None or stage.experts is None or (following is not None and
                                                               following.experts == stage.experts):
            return
        block = stage.block
        ids = sorted(e for e in stage.experts if f"{block}.{e}" in self.lazy)
        if self.propagates and ids:
            self._add_outputs(block, stage.experts, done)
        for e in ids:
            release(self.layer.get_submodule(f"{block}.{e}"))
        self.loaded = frozenset()
        return_free_heap()  # the chunk's weights and Hessians, back to the system before the next chunk

    def _add_outputs(self, block: str, experts: frozenset[int], done: AbstractSet[str]) -> None:
        """One pass over every batch running only `experts` (and, with GPTAQ, the same experts of the unquantized
        copy, loaded from the checkpoint for it), adding their outputs into the block's sums."""
        ref = self.reference
        with contextlib.ExitStack() as scope:
            scope.enter_context(only_experts(self.layer, experts))
            scope.enter_context(adding_into(self._block(0, block), self._sums(0, block), self.memo, self.device))
            if ref is not None and ref.memo is not None:
                for e in sorted(experts):
                    self.load(ref.layer.get_submodule(f"{block}.{e}"), f"{block}.{e}")
                for e in sorted(experts):
                    scope.callback(release, ref.layer.get_submodule(f"{block}.{e}"))
                scope.enter_context(only_experts(ref.layer, experts))
                scope.enter_context(adding_into(self._block(1, block), self._sums(1, block), ref.memo, self.device))
            collect_statistics(self.layer, [], self.batches, self.call, self.device, self.dtype, self.memo,
                               done=done, reference=ref, paired=False)

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        """Within the block (the propagation), each summed block returns its sums instead of running experts."""
        with contextlib.ExitStack() as scope:
            for (side, block), sums in self.sums.items():
                memo = self.memo if side == 0 else self.reference.memo if self.reference is not None else None
                if memo is not None:
                    scope.enter_context(replaying(self._block(side, block), sums, memo, self.device))
            yield

    def close(self) -> None:
        for sums in self.sums.values():
            sums.close()
        self.sums.clear()

    def _block(self, side: int, block: str) -> UnfusedExperts:
        owner = self.layer if side == 0 or self.reference is None else self.reference.layer
        found = owner.get_submodule(block)
        if not isinstance(found, UnfusedExperts):
            raise TypeError(f"{block} is not an experts block")
        return found

    def _sums(self, side: int, block: str) -> Activations:
        if (side, block) not in self.sums:
            scratch = self.scratch if self.batches.reads_are_copies else None  # beside batches kept on disk
            self.sums[(side, block)] = ActivationsInMemory() if scratch is None else ActivationsOnDisk(scratch)
        return self.sums[(side, block)]
