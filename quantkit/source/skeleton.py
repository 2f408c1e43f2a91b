"""The transformers side: an empty (meta) model built from config.json, filled one module at a time.

All coupling to transformers' model classes lives here. Decoder layers and their Linear modules are
discovered from the module tree, so Llama-family models need no per-architecture tables.
"""
from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from quantkit.errors import QuantkitError
from quantkit.source.checkpoint import SafetensorsCheckpoint, TensorReader, check_config_fits
from quantkit.source.experts import routers, unfuse_experts

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

# decoder-only causal LMs whose layers and Linear modules quantkit discovers from the module tree; each has an
# end-to-end test on a tiny random model (tests/test_architectures.py)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "opt",
                         "gpt2", "gpt_neox", "codegen", "gptj")
# Mixture-of-Experts models: their fused experts become one Linear per expert (source/experts.py); each has an end-
# to-end test too (tests/test_moe.py)
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe")


def load_config(model_dir: str | Path, config_dict: dict) -> PretrainedConfig:
    """transformers config for a supported, unquantized causal LM (never runs remote code), once config.json is
    known to describe the weights beside it (checkpoint.check_config_fits)."""
    model_type = config_dict.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES + MOE_MODEL_TYPES:
        architectures = config_dict.get("architectures")
        named = ", ".join(map(str, architectures)) if isinstance(architectures, list) else ""
        raise QuantkitError(f"unsupported architecture {model_type!r} ({named}); "
                            f"quantkit supports {', '.join(SUPPORTED_MODEL_TYPES + MOE_MODEL_TYPES)}")
    if config_dict.get("quantization_config"):
        method = config_dict["quantization_config"].get("quant_method", "unknown")
        raise QuantkitError(f"{model_dir} is already quantized ({method}); quantize its unquantized base model instead")
    check_config_fits(config_dict, SafetensorsCheckpoint(Path(model_dir)))
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as e:
        raise QuantkitError(f"cannot read {model_dir}/config.json: {e}") from None


def causal_lm_from_config(config: PretrainedConfig, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """AutoModelForCausalLM.from_config with SDPA attention, or eager where the model class has no SDPA path
    (Gemma2: its class says `_supports_sdpa = False`, and transformers refuses SDPA for it)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM

    known = type(config) in MODEL_FOR_CAUSAL_LM_MAPPING  # an unknown config: from_config says so itself
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)] if known else None
    sdpa = not isinstance(model_class, type) or bool(model_class._supports_sdpa)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa" if sdpa else "eager", **kwargs)


def checkpoint_names(model: PreTrainedModel, names: Iterable[str]) -> Callable[[str], str]:
    """module parameter name -> the checkpoint's name for it: the inverse of checkpoint_key_renamer over the
    checkpoint's `names` (Mixtral's mlp.experts.0.w1.weight is block_sparse_moe.experts.0.w1.weight on disk);
    a name transformers does not rename is its own."""
    rename = checkpoint_key_renamer(model)
    renamed = {rename(name): name for name in names}
    return lambda name: renamed.get(name, name)


def discarded_on_load(model: PreTrainedModel, names: Iterable[str]) -> frozenset[str]:
    """The checkpoint tensors among `names` that transformers drops when it loads `model`: not in its state dict
    (after checkpoint_key_renamer) and matched by its `_keys_to_ignore_on_load_unexpected`, as transformers
    matches them. They are buffers older transformers versions saved and the model now computes: GPT-J's
    attn.bias and attn.masked_bias (-1e9, beyond float16), CodeGen's attn.causal_mask, GPT-NeoX's
    attention.bias and attention.masked_bias."""
    patterns = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()
    if not patterns:
        return frozenset()
    ignored = re.compile("|".join(f"({p})" for p in patterns))
    rename, own = checkpoint_key_renamer(model), set(model.state_dict())
    return frozenset(name for name in names if rename(name) not in own and ignored.search(name))


def checkpoint_key_renamer(model: PreTrainedModel) -> Callable[[str], str]:
    """name -> name: the renames transformers applies to legacy checkpoint keys on load (GPT-NeoX's embed_out ->
    lm_head), so loaders that set tensors by name find the module."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        rules = get_checkpoint_conversion_mapping(type(model).__name__) or \
            get_checkpoint_conversion_mapping(model.config.model_type) or []
    except (ImportError, AttributeError):
        rules = []
    pairs = [(src, dst) for r in rules if type(r).__name__ == "WeightRenaming"
             for src, dst in zip(r.source_patterns, r.target_patterns)]

    def rename(name: str) -> str:
        for src, dst in pairs:
            name = re.sub(src, dst, name)
        return name
    return rename


def build_skeleton(config: PretrainedConfig) -> PreTrainedModel:
    """The causal LM with every parameter on the meta device (no memory); buffers such as rotary tables are real."""
    from accelerate import init_empty_weights

    config.use_cache = False
    with init_empty_weights(include_buffers=False):
        model = causal_lm_from_config(config)
    unfuse_experts(model)
    return model.eval()


def decoder_layers(model: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the decoder layers, and its qualified name (e.g. 'model.layers')."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and n_layers > 0:
            return name, module
    raise QuantkitError(f"cannot find the {n_layers} decoder layers in {type(model).__name__}")


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a Linear whose weight is stored transposed, [in, out]."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def linear_modules(layer: nn.Module) -> dict[str, nn.Module]:
    """The layer's Linear-like modules (nn.Linear and transformers' Conv1D), by qualified name, in module order;
    not the routers of its Mixture-of-Experts blocks (experts.routers), which stay float."""
    from transformers.pytorch_utils import Conv1D

    named = list(layer.named_modules())
    skip = routers(named)
    return {name: m for name, m in named if isinstance(m, (nn.Linear, Conv1D)) and name and name not in skip}


def _stored_weight(module: nn.Module) -> torch.Tensor:
    """The Linear-like module's weight tensor, in its stored orientation."""
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.weight is not a tensor")
    return weight.data


def in_features(module: nn.Module) -> int:
    return _stored_weight(module).shape[0] if is_conv1d(module) else _stored_weight(module).shape[1]


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features], the orientation GPTQ and the file format use."""
    return _stored_weight(module).t() if is_conv1d(module) else _stored_weight(module)


def set_weight_matrix(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an [out_features, in_features] weight back in the module's own orientation and dtype."""
    target = _stored_weight(module)
    target.copy_((weight.t() if is_conv1d(module) else weight).to(target.dtype))


def _same(name: str) -> str:
    return name


def stored_tensors(module: nn.Module, prefix: str, checkpoint: TensorReader,
                   names: Callable[[str], str] = _same) -> list[tuple[str, str, Tensor, bool]]:
    """What `module` reads from the checkpoint: (name in the module, checkpoint name, its skeleton tensor, is a
    parameter) for every parameter, and for every persistent buffer the checkpoint holds (DeepSeek-V3's router
    bias, e_score_correction_bias, decides which experts each token reaches; a buffer a checkpoint does not hold
    keeps the value the model class computes). names: module name -> checkpoint name (checkpoint_names)."""
    persistent = set(module.state_dict(keep_vars=True))
    found: list[tuple[str, str, Tensor, bool]] = [(n, names(f"{prefix}.{n}" if prefix else n), p, True)
                                                  for n, p in module.named_parameters()]
    for n, b in module.named_buffers():
        full = names(f"{prefix}.{n}" if prefix else n)
        if n in persistent and full in checkpoint:
            found.append((n, full, b, False))
    return found


def read_now(module: nn.Module, prefix: str, checkpoint: TensorReader, names: Callable[[str], str] = _same,
             later: AbstractSet[str] = frozenset()) -> list[tuple[str, str, Tensor, bool]]:
    """stored_tensors without those of the submodules in `later` (paths within `module`): what materialize reads."""
    return [entry for entry in stored_tensors(module, prefix, checkpoint, names)
            if not (later and entry[0].rpartition(".")[0] and any(entry[0].startswith(f"{m}.") for m in later))]


def check_tensors(module: nn.Module, prefix: str, checkpoint: TensorReader,
                  names: Callable[[str], str] = _same) -> None:
    """Every tensor `module` reads (stored_tensors) is in the checkpoint with the shape config.json implies
    (headers only)."""
    for _, full, tensor, _ in stored_tensors(module, prefix, checkpoint, names):
        _check_shape(full, checkpoint.shape(full), tensor.shape)


def _check_shape(name: str, found: Sequence[int], expected: Sequence[int]) -> None:
    if tuple(found) != tuple(expected):
        raise QuantkitError(f"tensor {name} has shape {list(found)} in the checkpoint, but config.json implies "
                            f"{list(expected)}")


def materialize(module: nn.Module, prefix: str, checkpoint: TensorReader, device: torch.device,
                dtype: torch.dtype, names: Callable[[str], str] = _same, later: AbstractSet[str] = frozenset()) -> None:
    """Load `module`'s tensors (stored_tensors) from the checkpoint (names prefix + '.' + name, through `names` to
    the checkpoint's) onto device in place, then unmap the shards (the checkpoint reopens them on its next read).
    later: submodules (paths within `module`) left on the meta device, loaded on their own when needed."""
    from accelerate.utils import set_module_tensor_to_device

    for pname, full, current, is_param in read_now(module, prefix, checkpoint, names, later):
        tensor = checkpoint.get(full)
        _check_shape(full, tensor.shape, current.shape)
        if tensor.is_floating_point():
            if not torch.isfinite(tensor).all():
                raise QuantkitError(f"tensor {full} holds NaN or Inf values")
            # without dtype=, accelerate would cast back to the skeleton's (config's) dtype; a buffer keeps its own
            set_module_tensor_to_device(module, pname, device, value=tensor, dtype=dtype if is_param else current.dtype)
        else:
            set_module_tensor_to_device(module, pname, device, value=tensor)
    _computed_buffers_to(module.modules(), device)
    checkpoint.close()  # unmap the shards: pages read through the mapping would otherwise stay resident


def _computed_buffers_to(owners: Iterable[nn.Module], device: torch.device) -> list[tuple[nn.Module, str, Tensor]]:
    """Move the owners' own buffers that the model class computed (not read from the checkpoint: rotary tables
    such as GPT-J's and CodeGen's, causal masks), which the skeleton holds on the CPU, to `device`; returns
    (module, name, the CPU tensor) for each one moved."""
    moved = []
    for owner in owners:
        for name, buf in list(owner._buffers.items()):
            if buf is not None and buf.device.type not in ("meta", device.type):
                owner._buffers[name] = buf.to(device)
                moved.append((owner, name, buf))
    return moved


@contextlib.contextmanager
def outer_modules_materialized(model: PreTrainedModel, layers_prefix: str, checkpoint: TensorReader,
                               device: torch.device, dtype: torch.dtype,
                               input_embeddings: bool = True) -> Iterator[None]:
    """Within the block, the modules outside the decoder layers (embeddings, final norm, rotary tables; not the
    output head) hold their checkpoint weights; afterwards they are back on the meta device. Without
    input_embeddings, the input embedding stays on the meta device (for forwards given inputs_embeds)."""
    from accelerate.utils import set_module_tensor_to_device

    skipped = (model.get_output_embeddings(), None if input_embeddings else model.get_input_embeddings())
    in_layers = lambda name: name == layers_prefix or name.startswith(layers_prefix + ".")  # noqa: E731
    outside = [(name, m) for name, m in model.named_modules()
               if all(m is not s for s in skipped) and not in_layers(name)]
    outer = [(name, m) for name, m in outside if any(True for _ in m.parameters(recurse=False))]
    moved = _computed_buffers_to([m for _, m in outside], device)
    try:
        for name, module in outer:
            for pname in [p for p, t in module._parameters.items() if t is not None]:  # a Linear without bias: None
                tensor = checkpoint.get(f"{name}.{pname}")
                set_module_tensor_to_device(module, pname, device, value=tensor,
                                            dtype=dtype if tensor.is_floating_point() else None)
        yield
    finally:
        for _, module in outer:
            for pname, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[pname] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        for owner, name, original in moved:
            owner._buffers[name] = original
        checkpoint.close()  # the embedding's pages, read through the mapping, would otherwise stay resident


def release(module: nn.Module) -> None:
    """Drop a module's weights back to the meta device."""
    module.to("meta")
