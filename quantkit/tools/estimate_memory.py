"""Where a quantize run's memory lives, per mode (a CPU run, one GPU, N GPUs under torchrun), from a config alone.

Every figure is bytes, the peak of one process (for N GPUs: one rank; the host's sum is host_total). The terms
follow the pipeline (run/pipeline.py, run/layer.py, calibrate/statistics.py, solve/):

Dtypes. The forwards run in the compute dtype (calibrate/precision.py): on a GPU the model's 16-bit dtype
(float32 for a float32 model), on a CPU bfloat16 only for a bfloat16 model on a CPU with native bfloat16 matmuls,
else float32. A decoder layer is materialized in it. The activations between layers keep the model's 16-bit dtype
(float32 for a float32 model). Hessians and solves are float32 everywhere, except that with exact sums
(QuantSpec.exact_sums) each Hessian is summed in float64, 8 bytes an entry, then made a float32 mean beside its sum.

Weights. One decoder layer at a time. Under true-sequential (quantize's default) the attention's weights are
released once its stages are done, so the MLP's solves hold the MLP (with experts: a chunk of them, the router and
any shared expert) and the norms only. GPTAQ holds the unquantized copy of the layer as well.

A layer's passes, per solve (rows N, inputs K), the larger of:
  forward: the stage's Hessian K^2*4 (GPTAQ: and its cross term), one mini-batch on the device (tokens * hidden in
    the compute dtype; calibrate/batch.py: 4096 tokens on a GPU, 1024 on a CPU), and the forward's temporaries:
    the MLP's gate, up and their product alive together, 3 * tokens * width in the compute dtype. Exact sums: the
    Hessians at K^2*8, and after the forwards, in place of the batch, the float32 mean K^2*4 made beside them.
  solve: the Hessian, in whose memory the inverse factor is made; the stacked float32 weight, which the dequantized
    result overwrites, and its uint8 codes, N*K*5 bytes. A copy of the Hessian for a retry with more damping is
    held while factorizing: beside it on a CPU, in pinned host memory on a GPU. GPTAQ adds the cross term and
    while the weight is shifted two blocks of rows times C.
  Mixture-of-Experts layers: a pass sums a chunk of experts' Hessians; the chunk's experts are then solved while
  the others' Hessians wait (memory/expert_chunks.py), in batches of one shape (run/solves.py batch_limit: the
  other experts' float32 weights and codes up to BATCH_BYTES; on a CPU only small experts batch).

Host memory of a CPU run: RUNTIME_HOST_BYTES, plus the largest of the phases: the first layer's inputs (the
embeddings materialized in the compute dtype), a layer's passes (above), and the assembly (the embeddings read in
float16 to be copied into the output shard). The calibration activations, and down_proj's and o_proj's inputs kept
for later passes, are in unlinked scratch files (memory/spill.py): the kernel's page cache, not the process's
memory, so they are disk, not host, figures (without twice their size free on that disk they stay in memory).

Host memory of a GPU run: RUNTIME_HOST_BYTES + CUDA_HOST_BYTES, and torch's pinned host memory, whose caching
allocator rounds each block up to a power of two and keeps it for reuse until the process ends: the activations
(their mini-batches), a second copy of them (a layer's save reads its inputs on a worker thread while the next
layer replaces them), o_proj's inputs kept in memory for the next stage (when no wider than the hidden states),
an MoE block's summed expert outputs, the largest Hessian's retry copy, the next decoder layer's tensors read
ahead in the model's dtype (run/prefetch.py; an MoE layer's routed experts load a chunk at a time instead), the
packed tensors of two layers (the one solved and the one being saved); and at the end the embeddings in float16
for the output shard.

GPU: torch's peak allocation (the passes above); what nvidia-smi shows adds CUDA_CONTEXT_BYTES and the caching
allocator's reserve: the blocks of the largest stacked solve before the largest Hessian (its float32 weight and
codes) stay cached when that Hessian, too large for them, is allocated beside them. Fragmentation beyond that one
step is not modelled, so this figure is a floor (docs/BENCHMARKS.md).

N GPUs (torchrun --nproc-per-node N): each rank runs the forwards on 1/N of the calibration windows, so its
activations (host, and a GPU mini-batch where fewer windows than a batch's remain) are 1/N; it holds a whole
decoder layer and sums every Hessian locally, and the solves are spread over the ranks, so the GPU's solve term is
unchanged. Its saves run in order with the other ranks' (no second copy of the activations). Rank 0 also
assembles the output.

Disk: the work directory (each finished layer's packed tensors; the current and next layer's saved inputs; on a CPU
also the scratch files above), and the output (written into staging while the work directory still exists).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from quantkit.calibrate.batch import CPU_BATCH_TOKENS, MLP_BATCH_TOKENS
from quantkit.memory import expert_chunks
from quantkit.run.solves import batch_limit
from quantkit.solve.hessian import hessian_itemsize
from quantkit.solve.prepare import SHIFT_ROWS
from quantkit.tools.estimate_shape import ModelShape

MIB, GIB = 2**20, 2**30
RUNTIME_HOST_BYTES = 400 * MIB   # the process with torch, transformers' modeling code and a tokenizer loaded
CUDA_HOST_BYTES = 1 * GIB        # what the CUDA libraries add to the host process once initialised
CUDA_CONTEXT_BYTES = 512 * MIB   # the CUDA context and library workspaces on the device, outside torch's count


@dataclass(frozen=True)
class Calibration:
    """What a quantize run is sized for: calibration windows, GPTAQ, the expert chunk, the dtypes and exact sums."""
    samples: int
    seq_len: int
    gptaq: bool = False
    expert_chunk: int = 0
    model_bytes: int = 2        # the model's dtype: 2 for a 16-bit model, 4 for float32
    cpu_bf16: bool = False      # a bfloat16 model on a CPU with native bfloat16 matmuls computes in bfloat16
    exact_sums: bool = False    # Hessians summed in float64 (QuantSpec.exact_sums)

    @property
    def hessian_bytes(self) -> int:
        """Bytes of a Hessian entry while it is summed."""
        return hessian_itemsize(self.exact_sums)

    @property
    def streams(self) -> int:
        return 2 if self.gptaq else 1


@dataclass
class ModeMemory:
    """One mode's peaks (bytes, per process); fits_* None where no size was given (or no GPU in the mode)."""
    mode: str                       # "cpu", "1 gpu", "N gpus"
    gpus: int                       # 0 for a CPU run
    compute_dtype: str              # the forwards' dtype: the layer is held in it
    host: int                       # peak resident memory of one process (rank 0 for N GPUs)
    host_total: int                 # the host's sum over the processes
    gpu_allocated: int | None       # torch's peak allocation on one GPU
    gpu_total: int | None           # + CUDA context + allocator reserve: what nvidia-smi shows
    disk_work: int                  # the work directory at its largest (scratch included)
    disk_output: int                # the output written
    parts: dict[str, dict[str, int]] = field(default_factory=dict)   # {"gpu": {...}, "host": {...}}
    fits_gpu: bool | None = None
    fits_host: bool | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def parse_memory_size(text: str) -> int:
    """'24GB' / '24GiB' / '512MB' / '1.5TB' -> bytes, the units binary: a "24 GB" card is counted as 24 GiB, which
    is what such cards report (an 80 GB A100 has 81920 MiB). A unit is required; ValueError otherwise."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT])(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse memory size {text!r}; use e.g. 24GB, 512MB or 1.5TB (binary units)")
    n = int(float(m.group(1)) * 1024 ** ("KMGT".index(m.group(2).upper()) + 1))
    if n <= 0:
        raise ValueError(f"memory size must be positive, got {text!r}")
    return n


def pow2(n: int) -> int:
    """n rounded up to a power of two, as torch's pinned (caching host) allocator serves it."""
    return 1 << max(0, n - 1).bit_length() if n > 0 else 0


def _solve_plan(shape: ModelShape, experts: bool) -> list[tuple[int, int, bool]]:
    """(rows, inputs, in the attention) of each stacked solve of a layer, in order (estimate_shape.solves: the
    attention's first, then an MLP's two, gate/up stacked and down)."""
    plan = shape.solves(experts)
    mlp = any(not lin.name.startswith("self_attn") for lin in shape.layer_linears(experts))
    attention = len(plan) - (2 if mlp else 0)
    return [(n, k, i < attention) for i, (n, k) in enumerate(plan)]


def _solve_bytes(n: int, k: int, gptaq: bool, backup_beside: bool) -> int:
    """A stacked solve's peak: factorizing (the Hessian, its retry copy when beside it, GPTAQ's cross term) or
    sweeping (the inverse factor, float32 weight and uint8 codes; GPTAQ's cross term and shifted rows)."""
    factor = (2 if backup_beside else 1) * k * k + (k * k if gptaq else 0)
    sweep = k * k + n * k + n * k // 4 + (k * k + 2 * min(n, SHIFT_ROWS) * k if gptaq else 0)
    return 4 * max(factor, sweep)


def _batched_beyond_one(n: int, k: int, chunk: int, on_gpu: bool) -> int:
    """What a batch of a chunk's experts of one shape (run/solves.py) holds beyond one expert's solve (5nk: its
    float32 weight and uint8 codes): the batch's stacked float32 weights beside one expert's own while they are
    stacked, then the stack and every expert's codes (their Hessians are factored in their own memory, already
    counted as waiting)."""
    batch = min(chunk, batch_limit(n, k, on_gpu))
    if batch < 2:
        return 0
    return max(4 * batch * n * k + 4 * n * k, 5 * batch * n * k) - 5 * n * k


def read_ahead_bytes(shape: ModelShape, model_bytes: int) -> int:
    """A decoder layer's tensors read ahead into pinned memory (run/prefetch.py), each block rounded up to a power
    of two, which torch's pinned allocator keeps and reuses only for blocks of its size: a dense layer's, plus an
    MoE layer's without its routed experts where the model has both kinds."""
    dense, sparse = shape.layer_counts()
    kinds = [experts for experts, count in ((False, dense), (True, sparse)) if count]
    norms = pow2(shape.hidden * model_bytes) * 2  # the two layer norms (q/k norms and MLA's are smaller still)
    return sum(sum(pow2(lin.params * model_bytes) for lin in shape.layer_linears(experts)) + norms +
               (pow2(shape.router_params() * model_bytes) if experts else 0) for experts in kinds)


def expert_pass(shape: ModelShape, chosen: int = 0, exact_sums: bool = False) -> tuple[int, int]:
    """(experts per calibration pass, the bytes of their Hessians) of a layer with experts; `chosen` as
    QuantSpec.expert_chunk (0: as many as the budget holds), exact_sums as QuantSpec.exact_sums."""
    if shape.moe is None:
        return 0, 0
    widest, itemsize = _widest_expert_input(shape), hessian_itemsize(exact_sums)
    chunk = expert_chunks.expert_chunk(shape.moe.experts, widest, itemsize, chosen)
    return chunk, chunk * expert_chunks.expert_hessian_bytes(widest, itemsize)


def _widest_expert_input(shape: ModelShape) -> int:
    """The wider of an expert's two inputs (gate/up's: hidden; down's: its intermediate)."""
    return max(shape.hidden, shape.moe.expert_intermediate) if shape.moe is not None else shape.hidden


def layer_passes(shape: ModelShape, experts: bool, cal: Calibration, compute_bytes: int, batch_tokens: int,
                 on_gpu: bool) -> dict[str, int]:
    """The largest moment of a layer's passes on the compute device (module docstring): {weights, hessians,
    forward, solve, total}, the parts of that moment."""
    s = cal.streams
    norms = shape.layer_norm_params()
    attention = sum(lin.params for lin in shape.attention_linears())
    mlp = sum(lin.params for lin in shape.layer_linears(experts)) - attention
    width = shape.intermediate
    chunk, chunk_hessians, waiting = 0, 0, 0
    if experts and shape.moe is not None:
        moe = shape.moe
        chunk, chunk_hessians = expert_pass(shape, cal.expert_chunk, cal.exact_sums)
        mlp += chunk * sum(lin.params for lin in shape.expert_linears()) + shape.router_params()
        width = max(moe.shared_intermediate, moe.active * moe.expert_intermediate)
        waiting = chunk_hessians - chunk_hessians // chunk
    batch = s * batch_tokens * shape.hidden * compute_bytes
    temporaries = 3 * batch_tokens * width * compute_bytes
    moments = []
    for n, k, in_attention in _solve_plan(shape, experts):
        weights = s * (attention * in_attention + mlp + norms) * compute_bytes
        hessians = s * k * k * cal.hessian_bytes
        # exact sums: a float32 mean is made beside the sums before the solve (run/solves.py, _reduced)
        moments.append({"weights": weights, "hessians": hessians, "forward": batch + temporaries,
                        "mean": 4 * k * k if cal.exact_sums else 0, "solve": _solve_bytes(n, k, cal.gptaq, not on_gpu)})
    if chunk:
        weights = s * (mlp + norms) * compute_bytes
        expert_solve = max(_solve_bytes(n, k, False, not on_gpu) + _batched_beyond_one(n, k, chunk, on_gpu)
                           for n, k in shape.expert_solves())
        moments.append({"weights": weights, "hessians": s * chunk_hessians, "forward": batch + temporaries,
                        "mean": 4 * _widest_expert_input(shape) ** 2 if cal.exact_sums else 0,
                        "solve": s * waiting + expert_solve})
    for m in moments:
        m["total"] = m["weights"] + max(m["hessians"] + max(m["forward"], m["mean"]), m["solve"])
    return max(moments, key=lambda m: m["total"])


def largest_layer_passes(shape: ModelShape, cal: Calibration, compute_bytes: int, batch_tokens: int,
                         on_gpu: bool) -> dict[str, int]:
    """layer_passes of the kind of layer (dense, with experts) that needs more."""
    dense, sparse = shape.layer_counts()
    kinds = [experts for experts, n in ((False, dense), (True, sparse)) if n]
    return max((layer_passes(shape, e, cal, compute_bytes, batch_tokens, on_gpu) for e in kinds),
               key=lambda m: m["total"])


def widest_input(shape: ModelShape) -> int:
    dense, sparse = shape.layer_counts()
    lins = (shape.layer_linears() if dense else []) + (
        shape.layer_linears(experts=True) + shape.expert_linears() if sparse else [])
    return max(lin.in_features for lin in lins)


def batch_tokens(samples: int, seq_len: int, per_batch: int) -> int:
    """Tokens of one mini-batch (calibrate/batch.py): whole windows, about per_batch tokens."""
    return min(samples, max(1, per_batch // seq_len)) * seq_len


def cpu_mode(shape: ModelShape, cal: Calibration, output_bytes: int, packed_bytes: int) -> ModeMemory:
    """A CPU run (module docstring)."""
    compute = 2 if cal.cpu_bf16 else 4
    tokens = cal.samples * cal.seq_len
    passes = largest_layer_passes(shape, cal, compute, batch_tokens(cal.samples, cal.seq_len, CPU_BATCH_TOKENS),
                                  on_gpu=False)
    embeddings = shape.vocab * shape.hidden
    host_parts = {"runtime": RUNTIME_HOST_BYTES, "first_inputs": embeddings * compute,
                  "layer": passes["total"], "assembly": embeddings * 2}
    host = RUNTIME_HOST_BYTES + max(host_parts["first_inputs"], passes["total"], host_parts["assembly"])
    activations = cal.streams * tokens * shape.hidden * cal.model_bytes
    kept = cal.streams * tokens * widest_input(shape) * compute
    saved_inputs = 2 * activations
    scratch = activations + kept
    return ModeMemory(mode="cpu", gpus=0, compute_dtype="bfloat16" if cal.cpu_bf16 else "float32", host=host,
                      host_total=host, gpu_allocated=None, gpu_total=None,
                      disk_work=max(scratch + saved_inputs + packed_bytes, packed_bytes + output_bytes),
                      disk_output=output_bytes,
                      parts={"host": host_parts, "layer": passes,
                             "disk": {"scratch": scratch, "saved_inputs": saved_inputs, "layers": packed_bytes}})


def gpu_mode(shape: ModelShape, cal: Calibration, gpus: int, output_bytes: int, packed_bytes: int) -> ModeMemory:
    """One rank of an N-GPU run (N = 1: one GPU), module docstring."""
    compute = cal.model_bytes
    samples = math.ceil(cal.samples / gpus)  # this rank's windows
    per_batch = batch_tokens(samples, cal.seq_len, MLP_BATCH_TOKENS)
    passes = largest_layer_passes(shape, cal, compute, per_batch, on_gpu=True)
    batches = math.ceil(samples / (per_batch // cal.seq_len))
    activations = cal.streams * batches * pow2(per_batch * shape.hidden * cal.model_bytes)
    o_in = next(lin.in_features for lin in shape.attention_linears() if lin.name.endswith("o_proj"))
    kept = batches * pow2(per_batch * o_in * cal.model_bytes) if o_in <= shape.hidden else 0
    sums = cal.streams * batches * pow2(per_batch * shape.hidden * compute) if shape.moe is not None else 0
    k = widest_input(shape)
    # one GPU: a layer's save reads a copy of its inputs while the next layer runs; N GPUs save together, in order
    pinned = {"activations": activations, "saved_copy": activations if gpus == 1 else 0, "kept_inputs": kept,
              "expert_sums": sums, "hessian_copy": pow2(k * k * 4),
              "next_layer": read_ahead_bytes(shape, cal.model_bytes),
              # the packed tensors of the layer being solved and of the one a background save holds, each layer's
              # sum rounded up to a power of two (the pinned allocator rounds each tensor)
              "packed_layers": 2 * pow2(math.ceil(packed_bytes / shape.layers))}
    assembly = shape.vocab * shape.hidden * 2
    host = RUNTIME_HOST_BYTES + CUDA_HOST_BYTES + sum(pinned.values()) + assembly
    rank = host - assembly
    largest_solve = max(n * k * 5 for n, k, _ in _solve_plan(shape, False)) if shape.layer_counts()[0] else 0
    reserve = largest_solve if largest_solve and passes["hessians"] >= largest_solve else 0
    saved_inputs = 2 * cal.streams * cal.samples * cal.seq_len * shape.hidden * cal.model_bytes
    return ModeMemory(mode="1 gpu" if gpus == 1 else f"{gpus} gpus", gpus=gpus,
                      compute_dtype="float32" if compute == 4 else "16-bit", host=host,
                      host_total=host + (gpus - 1) * rank, gpu_allocated=passes["total"],
                      gpu_total=passes["total"] + reserve + CUDA_CONTEXT_BYTES,
                      disk_work=max(saved_inputs + packed_bytes, packed_bytes + output_bytes),
                      disk_output=output_bytes,
                      parts={"host": {"runtime": RUNTIME_HOST_BYTES + CUDA_HOST_BYTES, **pinned,
                                      "assembly": assembly},
                             "layer": passes, "gpu": {"allocated": passes["total"], "reserve": reserve,
                                                      "context": CUDA_CONTEXT_BYTES},
                             "disk": {"saved_inputs": saved_inputs, "layers": packed_bytes}})
