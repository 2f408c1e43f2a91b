"""Which GPTQ settings the usual inference engines cannot run on their fast paths: known limits, notes not failures.

Sources (checked for this module; engines change, so the notes name the kernel they are about):
- vLLM gptq_marlin (Marlin; Machete on Hopper uses the same config check): GPTQ_MARLIN_SUPPORTED_NUM_BITS
  [4, 8], symmetric only, MARLIN_SUPPORTED_GROUP_SIZES [-1, 32, 64, 128]; verify_marlin_supports_shape wants
  out_features % 64 == 0, in_features % 128 == 0 and in_features % group_size == 0 per tensor-parallel shard,
  and otherwise refuses the layer ("Consider reducing tensor_parallel_size or running with --quantization gptq").
  Settings outside that run on vLLM's slower gptq (exllama-derived gptq_gemm) kernel.
- vLLM read checkpoint_format "gptq_v2" as v1 (garbage output, vllm-project/vllm#26343) until PR #26092
  (merged October 2025) taught gptq_gemm the v2 zero points; asym or 2/3-bit v1 files have been mis-loaded too.
- ExLlama v1/v2 GPTQ kernels: 4-bit only (transformers docs: "Only 4-bit models are supported"; gptqmodel
  ExllamaV2QuantLinear: bits [4], group sizes [-1, 32, 64, 128], in_features divisible by 32). ExLlamaV2's own
  EXL2 format takes 2-8 bits, but that is a different file format.
- TGI: its exllama path assumes groups of contiguous channels, which desc_act with group_size -1 does not give.
- transformers + optimum + gptqmodel on CPU: the default kernel needs in_features divisible by the group size, and
  for 4-bit asymmetric per-row checkpoints the kernel gptqmodel picks (TorchFusedLinear) computes wrong outputs;
  GPTQConfig(..., backend="torch") runs both exactly.
- Mixture-of-Experts (transformers 5.25, optimum 2.3, gptqmodel 7.6, read in their source and tested): transformers
  keeps a layer's experts fused in 3-D float parameters, its GPTQ path (optimum's convert_model) swaps only
  nn.Linear modules, and its checkpoint conversion rules merge per-expert `.weight` tensors only, so per-expert
  qweight/qzeros/scales/g_idx are dropped as unexpected and the experts stay randomly initialised (a load-report
  warning, no error). GPTQModel.load unfuses experts into per-expert modules and loads them, but under Mixtral's
  runtime names (mlp.experts.E.{gate,up,down}_proj), so a checkpoint with Mixtral's own block_sparse_moe
  .experts.E.{w1,w2,w3} names is refused ("Missing required quantized weights"). vLLM's FusedMoE loader reads each
  model's own checkpoint names (make_expert_params_mapping), which are the ones quantkit writes.
- AutoGPTQ's layout (older TheBloke repositories): transformers takes a checkpoint's quantization from config.json's
  quantization_config alone, and its weights from model.safetensors or an index; vLLM reads quantize_config.json
  (GPTQConfig.get_config_filenames) once started with --quantization gptq, and every *.safetensors file;
  GPTQModel.load reads quantize_config.json and finds gptq_model-<bits>bit-<group>g.safetensors or model.safetensors.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass

LM_HEAD_NOTE = ("lm_head is quantized: gptqmodel's GPTQModel.load, vLLM and quantkit load it; transformers + optimum "
                "convert only the decoder blocks and would leave the head unloaded")
QUANTIZE_CONFIG_NOTE = ("the GPTQ settings are only in quantize_config.json (config.json has no quantization_config): "
                        "transformers' from_pretrained reads config.json alone and would load this as an unquantized "
                        "model (verify --loader transformers passes the settings itself); GPTQModel.load reads "
                        "quantize_config.json, vLLM once started with --quantization gptq")
BNB_NOTE = ("bitsandbytes: loads with transformers + bitsandbytes (CPU or CUDA) and in vLLM/TGI through their "
            "bitsandbytes paths; ExLlama, Marlin and gptqmodel kernels do not read it")
# gptqmodel 7.6 picks TorchFusedLinear for 4-bit on CPU; for asymmetric per-row checkpoints its outputs are wrong
TORCH_BACKEND_NOTE = "gptqmodel 7.6's default CPU kernel (TorchFusedLinear) computes wrong outputs"
MOE_EXPERTS_NOTE = ("experts are quantized: transformers' from_pretrained (with optimum + gptqmodel) keeps each "
                    "layer's experts fused in float parameters and does not load per-expert GPTQ tensors (it leaves "
                    "the experts randomly initialised, with only a load-report warning); gptqmodel's GPTQModel.load, "
                    "vLLM and quantkit load them. For an output transformers loads, quantize with --skip "
                    "'mlp.experts.*' (experts kept in float16)")
MIXTRAL_NAMES_NOTE = ("gptqmodel 7.6's GPTQModel.load looks for Mixtral's experts as mlp.experts.E.{gate,up,down}_proj "
                      "and refuses these block_sparse_moe.experts.E.{w1,w2,w3} names (the checkpoint's own, which "
                      "vLLM and quantkit read)")
EXPERT_MODULE = re.compile(r"\.experts\.\d+\.")  # a Linear of one expert of a Mixture-of-Experts block
WEIGHTS_NAME = "model.safetensors"  # the one unindexed weight file transformers' from_pretrained looks for
MARLIN_BITS = (4, 8)
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
EXLLAMA_GROUP_SIZES = (-1, 32, 64, 128)


class Limit(enum.Enum):
    """One known loader limit; `LoaderLimit.note` says it in words."""

    NOT_GPTQ = "not_gptq"                      # a method these notes do not cover
    BITSANDBYTES = "bitsandbytes"              # only bitsandbytes-aware loaders read it
    LM_HEAD = "lm_head"                        # transformers + optimum leave a quantized head unloaded
    QUANTIZE_CONFIG_ONLY = "quantize_config_only"  # settings only in quantize_config.json, which transformers ignores
    WEIGHTS_FILE_NAME = "weights_file_name"    # one weight file not named model.safetensors, no index
    MOE_FUSED_EXPERTS = "moe_fused_experts"    # quantized experts, which transformers' GPTQ path does not load
    GPTQMODEL_MIXTRAL_NAMES = "gptqmodel_mixtral_names"  # Mixtral's own expert names, which GPTQModel.load refuses
    MARLIN_SETTINGS = "marlin_settings"        # bits, symmetry or group size outside vLLM's Marlin kernels
    GPTQ_V2 = "gptq_v2"                        # older vLLM reads v2 zero points as v1
    V1_MISLOADED = "v1_misloaded"              # asymmetric or 2/3-bit in the v1 format
    EXLLAMA_BITS = "exllama_bits"              # ExLlama takes 4-bit only
    EXLLAMA_GROUP = "exllama_group"            # a group size ExLlama v2 does not take
    TGI_DESC_ACT = "tgi_desc_act"              # desc_act with group_size -1
    TORCH_BACKEND = "torch_backend"            # 4-bit asymmetric per row: gptqmodel's default CPU kernel is wrong
    RAGGED_GROUPS = "ragged_groups"            # modules whose in_features the group size does not divide
    MARLIN_TILES = "marlin_tiles"              # modules whose shape misses Marlin's tiles
    EXLLAMA_IN_FEATURES = "exllama_in_features"  # modules whose in_features 32 does not divide


@dataclass(frozen=True)
class LoaderLimit:
    """A limit, the note that says it, and the modules it concerns (empty for limits of the settings)."""

    kind: Limit
    note: str
    modules: tuple[str, ...] = ()


def _example(names: list[str]) -> str:
    return f"{len(names)} module{'s' if len(names) != 1 else ''} (e.g. {names[0]})"


def loader_limits(quantization_config: dict, shapes: dict[str, tuple[int, int]] | None = None) -> list[LoaderLimit]:
    """Known loader limits for a checkpoint's quantization_config, in the order their notes are shown.

    :param quantization_config: the dict from config.json (or quantize_config.json).
    :param shapes: module name -> (out_features, in_features), as nn.Linear.weight.shape; enables the
        per-module checks (ragged last group, Marlin tile sizes). None skips them.
    """
    qc = quantization_config or {}
    method = str(qc.get("quant_method", "")).lower()
    if method == "bitsandbytes":
        return [LoaderLimit(Limit.BITSANDBYTES, BNB_NOTE)]
    if method != "gptq":
        return [LoaderLimit(Limit.NOT_GPTQ, f"quant_method {qc.get('quant_method')!r}: compatibility notes cover GPTQ "
                                            "checkpoints only")]
    limits = _settings_limits(qc)
    if shapes:
        marlin_ok = not any(limit.kind is Limit.MARLIN_SETTINGS for limit in limits)
        limits += _expert_limits(shapes) + _shape_limits(qc, shapes, marlin_ok)
    return limits


def _expert_limits(shapes: dict[str, tuple[int, int]]) -> list[LoaderLimit]:
    """The limits of quantized Mixture-of-Experts experts, found by their modules' names."""
    experts = sorted(n for n in shapes if EXPERT_MODULE.search(n))
    if not experts:
        return []
    limits = [LoaderLimit(Limit.MOE_FUSED_EXPERTS, MOE_EXPERTS_NOTE, tuple(experts))]
    mixtral = [n for n in experts if ".block_sparse_moe.experts." in n]
    if mixtral:
        limits.append(LoaderLimit(Limit.GPTQMODEL_MIXTRAL_NAMES, MIXTRAL_NAMES_NOTE, tuple(mixtral)))
    return limits


def layout_limits(settings_only_in_quantize_config: bool, weight_files: list[str], indexed: bool) -> list[LoaderLimit]:
    """Known loader limits of where a GPTQ checkpoint keeps its settings and its weights (AutoGPTQ's layout).

    :param settings_only_in_quantize_config: config.json has no quantization_config; quantize_config.json holds it.
    :param weight_files: the safetensors files that hold the weights; `indexed`: an index lists them.
    """
    limits: list[LoaderLimit] = []
    if settings_only_in_quantize_config:
        limits.append(LoaderLimit(Limit.QUANTIZE_CONFIG_ONLY, QUANTIZE_CONFIG_NOTE))
    if not indexed and weight_files and weight_files != [WEIGHTS_NAME]:
        limits.append(LoaderLimit(Limit.WEIGHTS_FILE_NAME, f"the weights are in {weight_files[0]}, without an index: "
                                  f"transformers' from_pretrained looks for {WEIGHTS_NAME} or an index only, so it "
                                  "cannot load this checkpoint (verify's own loader can); vLLM reads every "
                                  "*.safetensors file; GPTQModel.load finds gptq_model-<bits>bit-<group>g.safetensors "
                                  f"or {WEIGHTS_NAME}"))
    return limits


def _settings_limits(qc: dict) -> list[LoaderLimit]:
    """The limits that follow from a GPTQ quantization_config alone."""
    bits, group, sym = qc.get("bits"), qc.get("group_size", -1), qc.get("sym", True)
    limits: list[LoaderLimit] = []
    if qc.get("lm_head"):
        limits.append(LoaderLimit(Limit.LM_HEAD, LM_HEAD_NOTE))
    marlin_why = []
    if bits not in MARLIN_BITS:
        marlin_why.append(f"{bits}-bit")
    if not sym:
        marlin_why.append("asymmetric")
    if group not in MARLIN_GROUP_SIZES:
        marlin_why.append(f"group size {group}")
    if marlin_why:
        limits.append(LoaderLimit(Limit.MARLIN_SETTINGS, f"vLLM: {', '.join(marlin_why)} is outside its fast "
                                  "Marlin/Machete kernels (4-bit or 8-bit, symmetric, group size -1/32/64/128); it "
                                  "falls back to the slower gptq kernel"))
    if qc.get("checkpoint_format", "gptq") == "gptq_v2":
        limits.append(LoaderLimit(Limit.GPTQ_V2, "vLLM: checkpoint_format gptq_v2 (zero points stored as-is) loads "
                                  "correctly only in releases with PR #26092 (Oct 2025), on the gptq kernel; older "
                                  "vLLM reads it as v1 and generates garbage"))
    elif not sym or bits in (2, 3):
        limits.append(LoaderLimit(Limit.V1_MISLOADED, "vLLM: asymmetric or 2/3-bit checkpoints in the v1 'gptq' "
                                  "format have been mis-loaded as garbage; prefer checkpoint_format gptq_v2 for them"))
    if bits != 4:
        limits.append(LoaderLimit(Limit.EXLLAMA_BITS, f"ExLlama (v1/v2 GPTQ kernels, also TGI's and transformers' "
                                  f"exllama backends): 4-bit only, so {bits}-bit needs another kernel (ExLlamaV2's "
                                  "2-8 bit support is its own EXL2 format)"))
    elif group not in EXLLAMA_GROUP_SIZES:
        limits.append(LoaderLimit(Limit.EXLLAMA_GROUP, f"ExLlama v2 GPTQ kernel (as gptqmodel ships it): group size "
                                  f"{group} is not one of -1/32/64/128"))
    if qc.get("desc_act", False) and group == -1:
        limits.append(LoaderLimit(Limit.TGI_DESC_ACT, "TGI: desc_act with group_size -1 breaks its exllama path"))
    if (bits, sym, group) == (4, False, -1):
        limits.append(LoaderLimit(Limit.TORCH_BACKEND, f"4-bit asymmetric with group size -1: {TORCH_BACKEND_NOTE}; "
                                  "load with GPTQConfig(..., "
                                  "backend=\"torch\"), which is exact (verify --loader transformers does this)"))
    return limits


def _shape_limits(qc: dict, shapes: dict[str, tuple[int, int]], marlin_ok: bool) -> list[LoaderLimit]:
    """The limits that follow from the quantized modules' shapes."""
    bits, group = qc.get("bits"), qc.get("group_size", -1)
    limits: list[LoaderLimit] = []
    ragged = sorted(n for n, (_, k) in shapes.items() if k % (k if group == -1 else group))
    if ragged:
        limits.append(LoaderLimit(Limit.RAGGED_GROUPS, f"{_example(ragged)} have a partial last group (in_features "
                                  f"not divisible by group size {group}): vLLM's Marlin kernel refuses them; "
                                  "transformers + gptqmodel's default CPU kernel cannot run them, load with "
                                  "GPTQConfig(bits=..., group_size=..., backend=\"torch\")", tuple(ragged)))
    tiles = sorted(n for n, (out, k) in shapes.items() if (k % 128 or out % 64) and n not in ragged)
    if tiles and marlin_ok:
        limits.append(LoaderLimit(Limit.MARLIN_TILES, f"{_example(tiles)} have in_features not divisible by 128 or "
                                  "out_features not divisible by 64: vLLM's Marlin kernel refuses them (run vLLM with "
                                  "--quantization gptq)", tuple(tiles)))
    if bits == 4:
        not32 = sorted(n for n, (_, k) in shapes.items() if k % 32)
        if not32:
            limits.append(LoaderLimit(Limit.EXLLAMA_IN_FEATURES, f"{_example(not32)} have in_features not divisible "
                                      "by 32: gptqmodel's ExLlama v2 kernel cannot take them", tuple(not32)))
    return limits


def compatibility_notes(quantization_config: dict, shapes: dict[str, tuple[int, int]] | None = None) -> list[str]:
    """Known loader limits for a checkpoint's quantization_config, one sentence each (see `loader_limits`).

    >>> compatibility_notes({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True})
    []
    """
    return [limit.note for limit in loader_limits(quantization_config, shapes)]
