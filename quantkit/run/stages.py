"""The order in which one decoder layer's groups of Linears are calibrated and solved: one stage per calibration pass.

A dense layer's groups come from calibrate.probes.discover_groups, each in its own stage when true-sequential, else
all in one. A Mixture-of-Experts block's experts are not found by running a sample (the router would reach only
some): their groups come from the block's structure, a chunk of experts per pass (memory.expert_chunks), each
chunk's gate/up before its down, so that a pass holds a chunk's Hessians and not every expert's, and each down
sees its expert's quantized gate and up. The experts' stages come after the layer's other groups: the experts'
input depends on the attention's, and nothing else in the layer depends on the experts' output.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from quantkit.config import QuantSpec
from quantkit.memory.expert_chunks import expert_chunk
from quantkit.solve.hessian import hessian_itemsize
from quantkit.source.experts import UnfusedExperts, expert_blocks
from quantkit.source.skeleton import in_features


@dataclass(frozen=True)
class Stage:
    """Groups whose Hessians one calibration pass sums. experts: the expert block and the experts that run in the
    pass (None: a dense layer, where every module runs); an empty set: a dense stage of an MoE layer, where no
    expert needs to run."""
    groups: list[list[str]]
    block: str | None = None
    experts: frozenset[int] | None = None

    def is_expert_stage(self) -> bool:
        return self.block is not None

    @property
    def experts_of_reference(self) -> frozenset[int] | None:
        """The experts GPTAQ's unquantized copy runs: none in an expert stage (experts are solved unpaired), as the
        layer otherwise."""
        return frozenset() if self.is_expert_stage() else self.experts


def layer_stages(layer: nn.Module, groups: list[list[str]], spec: QuantSpec) -> list[Stage]:
    """The layer's stages; `groups`: the discovered groups of its other Linears in execution order (no expert ran
    in the discovery), skipped Linears already removed."""
    blocks = expert_blocks(layer)
    if not blocks:
        return [Stage([g]) for g in groups] if spec.true_sequential else [Stage(groups)] if groups else []
    none: frozenset[int] = frozenset()  # no expert runs in the other groups' passes
    dense = [Stage([g], experts=none) for g in groups] if spec.true_sequential else \
        [Stage(groups, experts=none)] if groups else []
    return dense + [s for name, block in blocks.items() for s in expert_stages(name, block, spec)]


def expert_stages(name: str, block: UnfusedExperts, spec: QuantSpec) -> list[Stage]:
    """A block's experts, a chunk at a time: the chunk's gate/up groups, then its down groups (skipped Linears
    left out). A chunk whose experts are all kept in float has no groups; its experts join the chunk before it (or,
    the first, the one after), whose passes then run them too: every expert's output reaches the block's sums, in
    expert order."""
    layout = block.layout
    gate, _, down = block.expert(0).linears()
    chunk = expert_chunk(block.num_experts, max(in_features(gate), in_features(down)),
                         hessian_itemsize(spec.exact_sums), spec.expert_chunk)
    planned: list[tuple[frozenset[int], list[list[list[str]]]]] = []  # (experts, the groups of each stage)
    waiting: frozenset[int] = frozenset()  # kept-float experts before the first chunk with groups
    for start in range(0, block.num_experts, chunk):
        ids = frozenset(range(start, min(block.num_experts, start + chunk)))
        gate_up = [g for g in ([n for n in (f"{name}.{e}.{layout.gate}", f"{name}.{e}.{layout.up}")
                                if not spec.skips(n)] for e in sorted(ids)) if g]
        downs = [[f"{name}.{e}.{layout.down}"] for e in sorted(ids) if not spec.skips(f"{name}.{e}.{layout.down}")]
        groups = [g for g in (gate_up, downs) if g]
        if groups:
            planned.append((ids | waiting, groups))
            waiting = frozenset()
        elif planned:
            planned[-1] = (planned[-1][0] | ids, planned[-1][1])
        else:
            waiting |= ids
    return [Stage(groups, block=name, experts=ids) for ids, stages in planned for groups in stages]
