"""Mixture-of-Experts blocks as quantkit handles them: one nn.Linear per expert and projection.

transformers keeps a layer's experts fused in 3-D parameters ([experts, out, in]); checkpoints, and the GPTQ
checkpoints vLLM and gptqmodel read, hold one Linear per expert. `unfuse_experts` replaces each fused experts module
of a model by `UnfusedExperts`, whose Linears carry the checkpoint's names (after transformers' renames) and which
computes what the fused module computes, so every expert is an ordinary Linear to calibrate, solve, pack and load.
Which checkpoint names make up which fused parameter comes from transformers' own conversion rules for the model,
so no per-architecture table is kept here. `fuse_experts` turns the Linears back into transformers' fused module.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from quantkit.errors import QuantkitError

# a conversion rule's source pattern for one expert's Linear, e.g. ".experts.*.w1.weight"
_EXPERT_SOURCE = re.compile(r"experts\.\*\.(\w+)\.weight$")


@dataclass(frozen=True)
class FusedLayout:
    """How a model's fused experts map to per-expert Linears: the fused input projection (gate and up, stacked along
    the output dimension in this order) and the output projection, each with its checkpoint Linear name(s)."""
    gate_up: str  # fused parameter name, e.g. "gate_up_proj"
    gate: str  # per-expert Linear names as the checkpoint has them, e.g. "w1" / "gate_proj"
    up: str
    down_param: str  # e.g. "down_proj"
    down: str  # e.g. "w2" / "down_proj"


def _conversion_rules(model: nn.Module) -> list:
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return []
    config = getattr(model, "config", None)
    return list(get_checkpoint_conversion_mapping(type(model).__name__)
                or get_checkpoint_conversion_mapping(getattr(config, "model_type", None)) or [])


def fused_layout(model: nn.Module) -> FusedLayout | None:
    """The model's expert layout from transformers' checkpoint conversion rules (per-expert weights merged along
    the expert dimension, gate and up concatenated along the output one); None for a model without such rules."""
    parts: dict[str, list[str]] = {}
    for rule in _conversion_rules(model):
        if type(rule).__name__ != "WeightConverter":
            continue
        names = [m.group(1) for p in rule.source_patterns if (m := _EXPERT_SOURCE.search(p))]
        if not names:
            continue
        ops = [(type(op).__name__, getattr(op, "dim", None)) for op in rule.operations]
        expected = [("MergeModulelist", 0)] + ([("Concatenate", 1)] if len(names) > 1 else [])
        if len(names) != len(rule.source_patterns) or len(rule.target_patterns) != 1 or ops != expected:
            raise QuantkitError(f"{type(model).__name__} stores its experts in a layout quantkit does not know "
                                f"({rule.source_patterns} -> {rule.target_patterns})")
        parts[rule.target_patterns[0].rsplit(".", 1)[-1]] = names
    if not parts:
        return None
    gated = [k for k, v in parts.items() if len(v) == 2]
    single = [k for k, v in parts.items() if len(v) == 1]
    if len(parts) != 2 or len(gated) != 1 or len(single) != 1:
        raise QuantkitError(f"{type(model).__name__}'s experts are not a gated MLP (gate, up, down): {parts}")
    (gate, up), (down,) = parts[gated[0]], parts[single[0]]
    return FusedLayout(gated[0], gate, up, single[0], down)


class Expert(nn.Module):
    """One expert: its gate, up and down Linears, as attributes named as the checkpoint names them."""

    def __init__(self, layout: FusedLayout, hidden: int, inner: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.layout = layout
        for name, (n_out, n_in) in ((layout.gate, (inner, hidden)), (layout.up, (inner, hidden)),
                                    (layout.down, (hidden, inner))):
            self.add_module(name, nn.Linear(n_in, n_out, bias=False, dtype=dtype, device=device))

    def linears(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        """gate, up, down: nn.Linear, or what a loader swapped in for them (verification's GPTQLinear)."""
        layout = self.layout
        return self.get_submodule(layout.gate), self.get_submodule(layout.up), self.get_submodule(layout.down)


class UnfusedExperts(nn.Module):
    """A layer's experts as one `Expert` per index (children "0", "1", ...), called as transformers calls its fused
    experts: (hidden_states [tokens, hidden], top_k_index [tokens, k], top_k_weights [tokens, k]). Each expert runs
    on the tokens routed to it (index num_experts is routing's "no expert") and its output, times the routing
    weight, is added into the result, as the fused module does.

    Calibration, which holds a chunk of experts' weights at a time, sets three attributes:
    - `active`: when set, only those experts run; the others' contributions are left out (a pass that collects
      some experts' Hessians stops inside this module, or, when its last expert got no tokens, finishes a forward
      whose output nothing reads);
    - `start`: the sum to add this call's experts into (the earlier chunks' outputs) instead of zeros;
    - `replay`: returned as the output without running any expert (every chunk's outputs, summed)."""

    def __init__(self, fused: nn.Module, layout: FusedLayout) -> None:
        super().__init__()
        gate_up = getattr(fused, layout.gate_up)
        n_experts, two_inner, hidden = gate_up.shape
        self.num_experts = n_experts
        self.act_fn = cast(Callable[[Tensor], Tensor], fused.act_fn)
        self.layout = layout
        self.fused_class = type(fused)  # what fuse_experts builds again
        self.active: frozenset[int] | None = None
        self.start: Tensor | None = None
        self.replay: Tensor | None = None
        for e in range(n_experts):
            self.add_module(str(e), Expert(layout, hidden, two_inner // 2, gate_up.dtype, gate_up.device))

    def expert(self, e: int) -> Expert:
        return self.get_submodule(str(e))  # type: ignore[return-value]  # children are Experts by construction

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        if self.replay is not None:
            return self.replay
        final = torch.zeros_like(hidden_states) if self.start is None else self.start
        with torch.no_grad():
            # every (slot, token) routed, grouped by expert and, within one, in slot-major order (what
            # torch.where(one_hot mask of the expert) lists); the experts' counts are the one read back to the host
            tokens = top_k_index.shape[0]
            routed = top_k_index.t().reshape(-1)
            order = torch.argsort(routed, stable=True)
            counts = torch.bincount(routed, minlength=self.num_experts + 1).tolist()
        end = 0
        for e, count in enumerate(counts):
            start, end = end, end + count
            if not count or e == self.num_experts or (self.active is not None and e not in self.active):
                continue
            position, token = order[start:end].div(tokens, rounding_mode="floor"), order[start:end] % tokens
            x = hidden_states[token]
            gate, up, down = self.expert(e).linears()
            h = down(self.act_fn(gate(x)) * up(x)) * top_k_weights[token, position, None]
            final.index_add_(0, token, h.to(final.dtype))
        return final


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module of `model` (one holding the layout's 3-D parameters) by UnfusedExperts
    with uninitialised Linears on the same device (meta stays meta); returns how many were replaced."""
    layout = fused_layout(model)
    if layout is None:
        return 0
    fused = [(name, m) for name, m in model.named_modules()
             if isinstance(getattr(m, layout.gate_up, None), nn.Parameter)
             and isinstance(getattr(m, layout.down_param, None), nn.Parameter)]
    for name, module in fused:
        parent, _, child = name.rpartition(".")
        model.get_submodule(parent).add_module(child, UnfusedExperts(module, layout))
    return len(fused)


def fuse_experts(model: nn.Module) -> None:
    """The inverse of unfuse_experts on a loaded model: each UnfusedExperts becomes transformers' fused module again,
    its Linears' weights stacked into the 3-D parameters (a plain transformers model of float weights)."""
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, UnfusedExperts)]:
        parent_name, _, child = name.rpartition(".")
        fused = module.fused_class(model.config)
        experts = [module.expert(e).linears() for e in range(module.num_experts)]
        gate_up = torch.stack([torch.cat([_weight(g), _weight(u)]) for g, u, _ in experts])
        down = torch.stack([_weight(d) for _, _, d in experts])
        setattr(fused, module.layout.gate_up, nn.Parameter(gate_up, requires_grad=False))
        setattr(fused, module.layout.down_param, nn.Parameter(down, requires_grad=False))
        model.get_submodule(parent_name).add_module(child, fused)


def _weight(linear: nn.Module) -> Tensor:
    weight = linear.weight
    if not isinstance(weight, Tensor):
        raise TypeError(f"{type(linear).__name__} holds no float weight to fuse")
    return weight


@contextlib.contextmanager
def only_experts(layer: nn.Module, active: frozenset[int] | None) -> Iterator[None]:
    """Within the block, the layer's UnfusedExperts run only the `active` experts (None: all of them)."""
    blocks = [m for m in layer.modules() if isinstance(m, UnfusedExperts)]
    for m in blocks:
        m.active = active
    try:
        yield
    finally:
        for m in blocks:
            m.active = None


def expert_blocks(layer: nn.Module) -> dict[str, UnfusedExperts]:
    """The layer's UnfusedExperts by qualified name within the layer (e.g. 'mlp.experts')."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, UnfusedExperts)}


def routers(named: list[tuple[str, nn.Module]]) -> set[str]:
    """Among a layer's modules (its named_modules, walked once by the caller), the Linears of its MoE blocks that
    route rather than compute: beside an UnfusedExperts, with one output per expert (the router) or a single one (a
    shared expert's gate). They stay unquantized."""
    found = set()
    for name, experts in named:
        if not isinstance(experts, UnfusedExperts):
            continue
        parent = name.rpartition(".")[0]
        found |= {n for n, m in named if n and n != name and n.rpartition(".")[0] == parent
                  and isinstance(m, nn.Linear) and m.out_features in (experts.num_experts, 1)}
    return found
