"""A decoder layer's groups of Linears solved: GPTQ (or llama.cpp's blocks) on each group's Hessian, or
round-to-nearest; the dequantized weights written back for later stages, only the packed tensors kept; under
several processes (run.ranks) each group solved by one, its results sent to the others."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

import torch
from torch import Tensor, nn

from quantkit.calibrate.statistics import Statistics
from quantkit.calibrate.transfer import move, wait_for_copies
from quantkit.config import QuantSpec
from quantkit.errors import NumericalError, QuantkitError
from quantkit.run.gguf_output import GGUFLayout, linear_types, rounded_on_blocks, solve_on_blocks, step_tensors
from quantkit.run.ranks import Ranks, solve_cost, spread_by_cost
from quantkit.solve.gptq import GPTQResult, gptq_quantize_batched, gptq_quantize_shared, rtn_result
from quantkit.solve.gptq_grids import GridResult
from quantkit.solve.grid import dequantize_grouped
from quantkit.source.skeleton import in_features, linear_modules, set_weight_matrix, weight_matrix
from quantkit.write.gptq_format import module_tensors

CPU = torch.device("cpu")
Result = TypeVar("Result", GPTQResult, GridResult)  # a solve's result for one Linear, GPTQ's grids or llama.cpp's

# Experts' solves of one shape run as a batch (gptq_quantize_batched): one chain of small kernels for the batch.
BATCH_BYTES = 128 << 20  # what a batch holds beyond one solve: its weights in float32 and their uint8 codes
CPU_BATCH_ELEMENTS = 1 << 20  # on a CPU, only solves of at most this many weights gain (the Python steps that
# batching saves outweigh the arithmetic only for small matrices); a GPU's column steps are launch-bound at any size


@dataclass
class Solved:
    tensors: dict[str, Tensor]  # one Linear's checkpoint tensors (qweight, qzeros, scales, ...), on the CPU
    loss: float
    damp: float
    tokens: int | None = None  # an expert's: the calibration tokens the router sent it
    rounded: bool = False  # an expert with too few tokens, rounded to nearest (QuantSpec.expert_min_tokens)


def packed(name: str, res: GPTQResult, spec: QuantSpec, fmt: str, bias: Tensor | None) -> Solved:
    """Pack where the solve ran (on a GPU, in a small fraction of the CPU's time), then keep only the packed
    tensors: a layer's int32 codes are never all held at once. From a GPU the copies to the host run
    asynchronously (calibrate.transfer.move): whoever reads the tensors on the CPU first waits for them
    (wait_for_copies), once for many Linears instead of a round trip per tensor."""
    tensors = module_tensors(name, res, spec.bits, fmt, bias)
    return Solved({k: move(v, CPU, v.dtype) for k, v in tensors.items()}, res.loss, res.damp)


def solve(label: str, weights: list[Tensor], hessian: Tensor, spec: QuantSpec,
          cross: Tensor | None = None) -> list[GPTQResult]:
    """GPTQ of weights that share `hessian` (consumed); a numerical failure is named after `label`."""
    try:
        return gptq_quantize_shared(weights, hessian, spec, consume_hessian=True, cross=cross)
    except NumericalError as e:
        raise NumericalError(f"{label}: {e}") from None


def check_packable(spec: QuantSpec, where: str, modules: dict[str, nn.Module]) -> None:
    """qweight packs input channels and qzeros output channels 32/bits to a word (3-bit: 32 values in 3 words)."""
    step = 32 if spec.bits == 3 else 32 // spec.bits
    for name, module in modules.items():
        n_out, n_in = weight_matrix(module).shape
        if not spec.skips(name) and (n_in % step or n_out % step):
            raise QuantkitError(f"{spec.bits}-bit GPTQ needs every quantized Linear's input and output sizes divisible "
                                f"by {step}; {where}.{name} is {n_in} -> {n_out}. Use --bits 4 or 8, or --skip {name}")


def solve_stage(ranks: Ranks, where: str, groups: list[list[str]], statistics: list[Statistics],
                modules: dict[str, nn.Module], spec: QuantSpec, fmt: str, out_name: Callable[[str], str],
                expert: bool = False, gguf: GGUFLayout | None = None) -> dict[str, Solved]:
    """A stage's groups solved (solve_group), `statistics` handed over one per group. Under several processes
    each group's Hessian is reduced (the token-weighted mean) onto the process that owns its solve (run.ranks, by
    cost); each process solves its own groups, then every quantized weight is sent from its owner to the others,
    the packed tensors to process 0, and the rest of each result to all."""
    owners = spread_by_cost([solve_cost(in_features(modules[g[0]]), sum(weight_matrix(modules[n]).shape[0]
                                                                             for n in g)) for g in groups],
                            ranks.load) if ranks.distributed else [0] * len(groups)
    what = f"the solves of {where}"
    reduced = _reduced(ranks, what, statistics, owners)
    mine: dict[int, dict[str, Solved]] = {}
    for batch in _batches(groups, reduced, modules, spec, expert and gguf is None):
        if len(batch) > 1:
            mine.update(zip(batch, solve_batch(where, [groups[k] for k in batch], [_taken(reduced, k) for k in batch],
                                               modules, spec, fmt, out_name)))
        else:  # handed over: the solve frees the Hessian before packing
            k = batch[0]
            mine[k] = solve_group(where, groups[k], _taken(reduced, k), modules, spec, fmt, out_name, expert=expert,
                                  gguf=gguf)
    wait_for_copies(weight_matrix(modules[groups[0][0]]).device)  # the packed tensors, on the host from here on
    results: dict[str, Solved] = {}
    for k, group in enumerate(groups):
        solved = mine.pop(k, None)
        if ranks.distributed:  # the packed tensors go to process 0, which writes them; every process gets the rest
            for_main = ranks.to_main(what, owners[k], solved)
            told = ranks.from_rank(what, owners[k], None if solved is None else
                                   {name: without_tensors(res) for name, res in solved.items()})
            solved = for_main if ranks.is_main else told
        if solved is None:
            raise QuantkitError(f"internal error: no result of {where}.{group[0]}")
        results.update(solved)
        ranks.weights_from(what, owners[k], [modules[n] for n in group], weight_matrix, set_weight_matrix)
    return results


def _reduced(ranks: Ranks, what: str, statistics: list[Statistics], owners: list[int]) -> list[Statistics | None]:
    """Each group's statistics reduced onto its owner (None on the other processes); `statistics` is emptied, so
    that the returned list holds the only reference to each Hessian, and each sum is dropped once its mean is made
    (exact sums: the float64 sum and its float32 mean are held together one at a time)."""
    totals = ranks.token_totals(what, [s.tokens for s in statistics])
    statistics.reverse()  # popped in group order
    reduced: list[Statistics | None] = []
    for total, owner in zip(totals, owners):
        s = statistics.pop()
        hessian, cross, tokens = s.hessian, s.cross, s.tokens
        del s
        mean = ranks.mean_to(what, owner, hessian, tokens, total)
        del hessian  # the sum, dropped before the cross term's mean is made beside it
        cross_mean = ranks.mean_to(what, owner, cross, tokens, total) if cross is not None else None
        reduced.append(Statistics(mean, cross_mean, total) if mean is not None else None)
    return reduced


def _batches(groups: list[list[str]], reduced: list[Statistics | None], modules: dict[str, nn.Module],
             spec: QuantSpec, experts: bool) -> list[list[int]]:
    """The groups this process solves (reduced[k] set), as batches of group indices: experts' GPTQ solves of one
    shape together (none rounded to nearest, no GPTAQ cross term, no static groups), up to BATCH_BYTES beyond the
    first and, on a CPU, only small ones (CPU_BATCH_ELEMENTS); every other group alone. In the groups' order."""
    batches: list[list[int]] = []
    open_batch: dict[tuple[int, ...], list[int]] = {}  # shape (K, N_1, N_2, ...) -> the batch being filled
    for k, statistics in enumerate(reduced):
        if statistics is None:
            continue
        weights = [weight_matrix(modules[n]) for n in groups[k]]
        limit = batch_limit(sum(w.shape[0] for w in weights), weights[0].shape[1], weights[0].is_cuda)
        if not experts or spec.static_groups or statistics.cross is not None or \
                _rounded_expert(statistics.tokens, spec) or limit == 1:
            batches.append([k])
            continue
        shape = (weights[0].shape[1], *(w.shape[0] for w in weights))
        batch = open_batch.get(shape)
        if batch is None or len(batch) >= limit:
            batch = open_batch[shape] = []
            batches.append(batch)
        batch.append(k)
    return batches


def batch_limit(rows: int, n_in: int, on_gpu: bool) -> int:
    """How many solves of `rows` stacked rows and n_in inputs one batch takes: those whose float32 weights and uint8
    codes fit in BATCH_BYTES beyond the first; on a CPU one, unless the solve is small (CPU_BATCH_ELEMENTS)."""
    if not on_gpu and rows * n_in > CPU_BATCH_ELEMENTS:
        return 1
    return 1 + BATCH_BYTES // (5 * rows * n_in)


def _rounded_expert(tokens: int, spec: QuantSpec) -> bool:
    """Whether an expert the router sent `tokens` calibration tokens is rounded to nearest instead of solved."""
    return tokens < max(1, spec.expert_min_tokens)


def _taken(items: list[Statistics | None], k: int) -> Statistics:
    """items[k], taken out of the list (None left in its place)."""
    item, items[k] = items[k], None
    if item is None:
        raise QuantkitError("internal error: statistics taken twice")
    return item


def without_tensors(solved: Solved) -> Solved:
    """A result as the processes that do not write it need it: for the step's report."""
    return replace(solved, tensors={})


def solve_group(where: str, group: list[str], statistics: Statistics, modules: dict[str, nn.Module],
                spec: QuantSpec, fmt: str, out_name: Callable[[str], str], expert: bool = False,
                gguf: GGUFLayout | None = None) -> dict[str, Solved]:
    """GPTQ the Linears sharing a Hessian (consumed), write their dequantized weights back for later stages, and
    keep only their packed tensors: the solve's [N, K] codes and results are freed on return. With a GPTAQ cross
    term the solve targets the weights that reproduce the unquantized model's outputs. The caller hands over its
    only reference to `statistics`. expert: the group is one expert's, rounded to nearest instead when the router
    sent it fewer than spec.expert_min_tokens tokens (none at all: always). gguf: solve onto llama.cpp's blocks
    (a GGUF output holds no experts)."""
    if gguf is not None:
        return _solved_on_blocks(where, group, statistics, modules, spec, out_name, gguf)
    tokens = statistics.tokens if expert else None
    rounded = tokens is not None and _rounded_expert(tokens, spec)
    if rounded:
        del statistics
        solved = [_rounded(weight_matrix(modules[name]), spec) for name in group]
    else:
        solved = solve(f"{where}.{group[0]}", [weight_matrix(modules[name]) for name in group], statistics.hessian,
                       spec, statistics.cross)  # the group shares its Hessian: a failure is named after its first
        del statistics  # the spent Hessian (and cross term) is freed before packing, which would otherwise hold it
    solved = _written_back(group, solved, modules)  # and the float32 weight: only the results' own tensors remain
    return _kept(group, solved, modules, spec, fmt, out_name, tokens, rounded)


def solve_batch(where: str, groups: list[list[str]], statistics: list[Statistics], modules: dict[str, nn.Module],
                spec: QuantSpec, fmt: str, out_name: Callable[[str], str]) -> list[dict[str, Solved]]:
    """Experts' groups of one shape solved as one batch (gptq_quantize_batched: the same bits as solve_group
    gives each), their statistics handed over (consumed); then every group written back (which frees the batch's
    float32 stack) and packed as solve_group does. A numerical failure is named after the failing group's first
    Linear."""
    tokens = [s.tokens for s in statistics]
    hessians = [s.hessian for s in statistics]
    statistics.clear()
    try:
        solved = gptq_quantize_batched([[weight_matrix(modules[n]) for n in g] for g in groups], hessians, spec)
    except NumericalError as e:
        raise NumericalError(f"{where}.{groups[e.solve or 0][0]}: {e}") from None
    solved = [_written_back(group, results, modules) for group, results in zip(groups, solved)]
    return [_kept(group, solved.pop(0), modules, spec, fmt, out_name, count, False)
            for group, count in zip(groups, tokens)]


def _kept(group: list[str], solved: list[GPTQResult], modules: dict[str, nn.Module], spec: QuantSpec, fmt: str,
          out_name: Callable[[str], str], tokens: int | None, rounded: bool) -> dict[str, Solved]:
    """A group's results, already written back (_written_back), packed: only the packed tensors are kept."""
    return {name: replace(packed(out_name(name), res, spec, fmt, bias(modules[name])), tokens=tokens, rounded=rounded)
            for name, res in zip(group, solved)}


def _solved_on_blocks(where: str, group: list[str], statistics: Statistics, modules: dict[str, nn.Module],
                      spec: QuantSpec, out_name: Callable[[str], str], gguf: GGUFLayout) -> dict[str, Solved]:
    """solve_group for a GGUF output: each Linear of the group onto its ggml type's blocks."""
    weights = [weight_matrix(modules[name]) for name in group]
    types = linear_types(gguf, [out_name(name) for name in group], weights)
    solved = solve_on_blocks(f"{where}.{group[0]}", weights, statistics.hessian, types, spec, statistics.cross)
    del statistics, weights
    solved = _written_back(group, solved, modules)
    return {name: Solved(step_tensors(out_name(name), res), res.loss, res.damp) for name, res in zip(group, solved)}


def _rounded(weight: Tensor, spec: QuantSpec) -> GPTQResult:
    """Round-to-nearest with its dequantized weight, which later stages of the layer compute with."""
    res = rtn_result(weight, spec)
    return replace(res, weight=dequantize_grouped(res.codes, res.scales, res.zeros, res.g_idx).to(weight.device))


def _written_back(group: list[str], solved: list[Result], modules: dict[str, nn.Module]) -> list[Result]:
    """Each Linear's weight set to its dequantized result (later stages see the quantized weights); the results
    are returned without that float32 copy."""
    for name, res in zip(group, solved):
        if res.weight is None:
            raise QuantkitError(f"internal error: the solve of {name} returned no weight")
        set_weight_matrix(modules[name], res.weight)
    return [replace(res, weight=None) for res in solved]


def rtn_layer(layer: nn.Module, spec: QuantSpec, fmt: str, out_name: Callable[[str], str],
              gguf: GGUFLayout | None = None) -> dict[str, Solved]:
    """Round-to-nearest of every Linear not skipped: GPTQ's grids, or llama.cpp's own for a GGUF output."""
    modules = {name: module for name, module in linear_modules(layer).items() if not spec.skips(name)}
    if gguf is None:
        # rtn_result hands back its codes on the host (packed on the CPU); a GPU bias's copy to the host is awaited
        # before the layer is saved (layer.quantize_layer's wait_for_copies)
        return {name: packed(out_name(name), rtn_result(weight_matrix(module), spec), spec, fmt, bias(module))
                for name, module in modules.items()}
    weights = {name: weight_matrix(module) for name, module in modules.items()}
    types = linear_types(gguf, [out_name(name) for name in modules], list(weights.values()))
    results = {name: rounded_on_blocks(weights[name], ggml) for name, ggml in zip(modules, types)}
    return {name: Solved(step_tensors(out_name(name), res), 0.0, spec.damp) for name, res in results.items()}


def bias(module: nn.Module) -> Tensor | None:
    """A Linear's (or Conv1D's) bias, None when it has none."""
    b = module.bias
    return b if isinstance(b, Tensor) else None
