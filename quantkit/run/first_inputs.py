"""The calibration a GPTQ run starts from: the tokens, where the activations between layers are kept, and the
inputs of the first layer to quantize (layer 0's, computed, or a resumed run's, read back)."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from quantkit.calibrate.batch import calibration_batch_size
from quantkit.calibrate.capture import capture_layer_inputs
from quantkit.calibrate.forward import LayerCall
from quantkit.config import CalibSpec
from quantkit.errors import QuantkitError
from quantkit.memory.heap import return_free_heap
from quantkit.memory.spill import Activations, ActivationsInMemory, ActivationsOnDisk, disk_has_room
from quantkit.run.layer import LayerJob, Streams
from quantkit.run.model import Skeleton, Source
from quantkit.source.calibration import calibration_batch
from quantkit.source.checkpoint import SafetensorsCheckpoint
from quantkit.source.skeleton import outer_modules_materialized

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger("quantkit")


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as e:
        raise QuantkitError(f"cannot load the tokenizer from {model_dir}: {e}") from None


def calibration_tokens(tokenizer: Any, calib: CalibSpec, config: Any) -> Tensor:
    """The calibration batch [samples, seq_len], refused when its sequences are longer than the model's positions."""
    input_ids = calibration_batch(tokenizer, calib)
    positions = getattr(config, "max_position_embeddings", None)
    if positions and calib.seq_len > positions:
        raise QuantkitError(f"--seq-len {calib.seq_len} is longer than the model's {positions} positions "
                            f"(max_position_embeddings); use --seq-len {positions} or less")
    return input_ids


def storage_dtype(model_dtype: torch.dtype, compute_dtype: torch.dtype) -> torch.dtype:
    """Calibration activations between layers are kept in the model's own 16-bit dtype (half the memory of
    float32; a GPU run in that dtype rounds them the same way); float32 models keep float32."""
    return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else compute_dtype


def activation_store(stores: contextlib.ExitStack, work: Path, on_disk: bool,
                     nbytes: int) -> Callable[[], Activations]:
    """A factory of containers for calibration activations: in a scratch file in `work` (spill.ActivationsOnDisk,
    closed with `stores`) when on_disk and there is room for nbytes, else in memory (a GPU run's pinned batches:
    its background saves read them while the next layer computes)."""
    if not (on_disk and disk_has_room(work, nbytes)):
        return ActivationsInMemory

    def new() -> Activations:
        return stores.enter_context(contextlib.closing(ActivationsOnDisk(work)))
    return new


def layer_zero_inputs(skeleton: PreTrainedModel, layers: nn.ModuleList, prefix: str, checkpoint: SafetensorsCheckpoint,
                      input_ids: Tensor, dev: torch.device, compute_dtype: torch.dtype, storage_dtype: torch.dtype,
                      store: Activations | None = None) -> tuple[Activations, list[LayerCall]]:
    """Materialise the modules outside the decoder layers (not lm_head), run the calibration batch up to layer 0;
    its inputs are appended to `store` (a new ActivationsInMemory by default). Returns (the batches, each layer's
    call arguments)."""
    with outer_modules_materialized(skeleton, prefix, checkpoint, dev, compute_dtype):
        return capture_layer_inputs(skeleton, layers, input_ids, calibration_batch_size(input_ids.shape[1], dev), dev,
                                    storage_dtype, store)


def first_inputs(job: LayerJob, source: Source, skeleton: Skeleton, input_ids: Tensor, calib: CalibSpec,
                 stores: contextlib.ExitStack, work: Path, activations_dtype: torch.dtype) -> Streams:
    """The calibration activations entering the first layer to quantize: layer 0's, run up from the tokens (and
    for a resumed run read back from its saved inputs, after the call arguments are taken), with under GPTAQ the
    unquantized model's own stream beside them."""
    spec, state = job.spec, job.state
    share = f" ({len(input_ids)} of them in this process of {job.ranks.world})" if job.ranks.distributed else ""
    log.info("calibration: %d x %d tokens from %s%s, forwards in %s on %s", calib.samples, calib.seq_len,
             calib.source, share, str(job.compute_dtype).removeprefix("torch."), job.device)
    new_store = activation_store(stores, work, job.device.type == "cpu" and not job.saves.enabled,
                                 (1 + spec.gptaq) * input_ids.numel()
                                 * source.config.hidden_size * activations_dtype.itemsize)
    batches, calls = layer_zero_inputs(skeleton.model, skeleton.layers, skeleton.prefix, source.checkpoint, input_ids,
                                       job.device, job.compute_dtype, activations_dtype, new_store())
    return_free_heap()  # the small frees of the embedding lookup and the first forward
    if state.layers_done:  # saved as the quantized stream, then (GPTAQ) the unquantized one
        batches.close()  # layer 0's inputs; the run continues from later ones
        streams = [new_store() for _ in range(1 + spec.gptaq)]
        state.load_activations(streams)
        return Streams(input_ids, streams[0], calls, streams[1] if spec.gptaq else None)
    return Streams(input_ids, batches, calls, reference_copy(batches, new_store()) if spec.gptaq else None)


def reference_copy(batches: Activations, store: Activations) -> Activations:
    """GPTAQ's unquantized stream at layer 0, where it equals the quantized one: a copy of each batch into
    `store`, pinned like the originals on a GPU run (so their copies to the device stay asynchronous)."""
    for b in batches:
        store.append(torch.empty(b.shape, dtype=b.dtype, pin_memory=b.is_pinned()).copy_(b))
    return store
