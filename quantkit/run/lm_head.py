"""--lm-head: the output head quantized like a decoder Linear, calibrated on the model's own final hidden states.

A tied head (lm_head sharing the input embedding's weight) is untied: the embedding stays in float16, the head
is written packed, and the output's config says tie_word_embeddings: false. transformers + optimum converts only
the decoder blocks, so such checkpoints load through gptqmodel's own loader, vLLM and quantkit, not
AutoModelForCausalLM + optimum (verify and inspect say so).
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from quantkit.calibrate.head import collect_head_hessian
from quantkit.config import QuantSpec
from quantkit.errors import QuantkitError
from quantkit.faults import kill_point
from quantkit.run.layer import LayerJob, Streams
from quantkit.run.model import Skeleton, Source
from quantkit.run.solves import Solved, packed, solve, without_tensors
from quantkit.run.step_report import step_report
from quantkit.solve.gptq import GPTQResult, rtn_result
from quantkit.source.checkpoint import SafetensorsCheckpoint
from quantkit.source.skeleton import outer_modules_materialized

if TYPE_CHECKING:
    from tqdm import tqdm
    from transformers import PreTrainedModel

log = logging.getLogger("quantkit")


def head_names(model: PreTrainedModel, checkpoint: SafetensorsCheckpoint) -> tuple[str, str]:
    """(the head's module name, the checkpoint tensor holding its weight: its own, or the tied embedding's)."""
    names = {id(m): n for n, m in model.named_modules()}
    head = names[id(model.get_output_embeddings())]
    if f"{head}.weight" in checkpoint:
        return head, f"{head}.weight"
    return head, f"{names[id(model.get_input_embeddings())]}.weight"


def quantize_head(job: LayerJob, source: Source, skeleton: Skeleton, streams: Streams) -> tuple[str, Solved]:
    """Quantize the output head (GPTQ on the Hessian of the final hidden states, streams.batches, or RTN);
    returns (its module name, its packed tensors and result)."""
    spec, checkpoint, model = job.spec, source.checkpoint, skeleton.model
    head_name, weight_name = head_names(model, checkpoint)
    if spec.method != "gptq":
        weight = checkpoint.get(weight_name).to(job.device, torch.float32)
        return head_name, _packed_head(checkpoint, head_name, rtn_result(weight, spec), spec, job.fmt)
    if streams.input_ids is None or streams.batches is None:
        raise QuantkitError(f"internal error: GPTQ of {head_name} without the final hidden states")
    with outer_modules_materialized(model, skeleton.prefix, checkpoint, job.device, job.compute_dtype):
        H = collect_head_hessian(model, skeleton.layers, model.get_output_embeddings(), streams.input_ids,
                                 streams.batches, job.device, job.compute_dtype, spec.exact_sums)
    # several processes: the Hessian reduced over their windows onto process 0, which solves and writes the head;
    # the others get the result for the step's report (no later forward needs the quantized head)
    ranks, tokens = job.ranks, streams.input_ids.numel()
    summed = ranks.mean_to(head_name, 0, H, tokens, ranks.token_totals(head_name, [tokens])[0])
    del H
    solved = None
    if summed is not None:
        weight = checkpoint.get(weight_name).to(job.device, torch.float32)
        # packed on the CPU: a large vocabulary's codes and packing temporaries would add to the GPU's peak
        res = solve(head_name, [weight], summed, spec)[0].cpu()
        del summed, weight
        solved = _packed_head(checkpoint, head_name, res, spec, job.fmt)
    told = ranks.from_rank(head_name, 0, None if solved is None else without_tensors(solved))
    return head_name, solved if solved is not None else told


def _packed_head(checkpoint: SafetensorsCheckpoint, head_name: str, res: GPTQResult, spec: QuantSpec,
                 fmt: str) -> Solved:
    """The head's result packed, with its bias (a head with one) as the checkpoint holds it."""
    bias = checkpoint.get(f"{head_name}.bias") if f"{head_name}.bias" in checkpoint else None
    return packed(head_name, res, spec, fmt, bias)


def head_step(job: LayerJob, source: Source, skeleton: Skeleton, streams: Streams, bar: tqdm) -> None:
    """The head as the run's last step: quantized, reported, saved like a layer (index: the number of layers)."""
    index = len(skeleton.layers)
    t_head = time.perf_counter()
    kill_point("head:start")
    name, solved = quantize_head(job, source, skeleton, streams)
    report = step_report(index, round(time.perf_counter() - t_head, 2), {name: solved}, job.spec, module=name)
    job.state.note_base(index, source.reads.digests)
    job.state.save_layer(index, solved.tensors, report, None)
    log.info("%s  loss=%.4g  (%.1fs)", name, solved.loss, report["seconds"])
    source.unmap()  # the head's weight, read through the mapping
    bar.update(1)
