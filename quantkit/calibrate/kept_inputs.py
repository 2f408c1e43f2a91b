"""The inputs of a decoder layer's exit Linears (o_proj, down_proj), kept one per batch while those Linears are
calibrated, so that a later pass derives their blocks' outputs from them instead of running the blocks."""
from __future__ import annotations

import logging
from collections.abc import Container, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path

import torch
from torch import Tensor, nn

from quantkit.calibrate.probes import exit_linears
from quantkit.calibrate.transfer import move_all
from quantkit.memory.spill import KeptInMemory, KeptOnDisk, ScratchFiles
from quantkit.source.skeleton import in_features, linear_modules

log = logging.getLogger("quantkit")


def kept_exits(layer: nn.Module, groups: Sequence[Sequence[str]], blocks: Container[str],
               derivable: Container[str] | None, hidden_size: int, keep_wide: bool) -> dict[str, tuple[str, set[str]]]:
    """{block: (exit Linear, the Linears run before it)} whose inputs are kept (`probes.exit_linears`), among
    `blocks` and, when given, `derivable`. Inputs wider than the hidden states (down_proj's) would cost more memory
    than the activations themselves: kept only if keep_wide."""
    modules = linear_modules(layer)
    exits = {}
    for block, (exit_linear, after) in exit_linears(layer, groups).items():
        if block not in blocks or (derivable is not None and block not in derivable):
            continue
        if keep_wide or in_features(modules[exit_linear]) <= hidden_size:
            exits[block] = (exit_linear, after)
    return exits


class KeptExitInputs:
    """Per block, its exit Linear's inputs, one per batch: in memory in the storage dtype, or with spill_dir in an
    unlinked scratch file (spill.KeptOnDisk) in the compute dtype (exact on a CPU). A disk that fails costs time
    (the block is run instead), never the run."""

    def __init__(self, exits: dict[str, tuple[str, set[str]]], storage_dtype: torch.dtype | None,
                 spill_dir: Path | ScratchFiles | None) -> None:
        self.exits = {block: exit_linear for block, (exit_linear, _) in exits.items()}  # {block: exit Linear}
        self.exit_after = {block: after for block, (_, after) in exits.items()}  # the Linears run before the exit
        self.storage_dtype = storage_dtype
        self.spill_dir = spill_dir
        self.seeds: dict[str, KeptInMemory | KeptOnDisk] = {}  # block -> its exit Linear's inputs, one per batch

    def keep(self, linear: str, x: Tensor, done: AbstractSet[str], recorded: Container[str]) -> None:
        """x: a batch's input to `linear`. Kept for each block that `linear` exits, is not `recorded` already, and
        whose Linears run before it are all `done` (quantized: else a later pass would see other inputs)."""
        for block, exit_linear in self.exits.items():
            if exit_linear != linear or block in recorded or not self.exit_after[block] <= done:
                continue
            try:
                if self.spill_dir is None:
                    self.seeds.setdefault(block, KeptInMemory()).append(move_all(x, "cpu", self.storage_dtype,
                                                                                 copy=True))
                    continue
                if block not in self.seeds:
                    self.seeds[block] = KeptOnDisk(self.spill_dir)
                self.seeds[block].append(x)  # copied to the CPU there, synchronously
            except OSError as e:  # a full disk costs time (the block reruns), never the run
                log.warning("cannot keep %s's inputs in %s (%s); %s will be rerun instead", linear, self.spill_dir,
                            e, block)
                self.drop(block)
                del self.exits[block]
                return

    def count(self, block: str) -> int:
        """How many batches' inputs are kept for `block`."""
        return len(self.seeds.get(block, ()))

    def take(self, block: str, i: int) -> Tensor | None:
        """Batch i's kept input for `block`, freed from the store; None where there is none to take (never kept,
        dropped, unreadable, or taken already: a block run twice per forward), and the block must run."""
        seeds = self.seeds.get(block)
        if seeds is None:
            return None
        try:
            return seeds.take(i)
        except (OSError, RuntimeError) as e:
            if isinstance(e, OSError):
                log.warning("cannot read %s's kept inputs back (%s); it is rerun instead", block, e)
            self.drop(block)
            return None

    def drop(self, block: str) -> None:
        """Free the block's kept inputs (and their scratch file)."""
        seeds = self.seeds.pop(block, None)
        if seeds is not None:
            seeds.close()

    def close(self) -> None:
        """Free every kept input."""
        for block in list(self.seeds):
            self.drop(block)
