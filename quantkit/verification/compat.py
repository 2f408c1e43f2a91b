"""Which GPTQ settings the usual inference engines cannot run on their fast paths: notes, never failures.

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
- TGI: desc_act with group_size -1 breaks its exllama path (DESIGN.md).
- transformers + optimum + gptqmodel on CPU: the default ATen int4pack kernel needs in_features divisible by the
  group size; GPTQConfig(..., backend="torch") runs ragged groups (DESIGN.md, measured on SmolLM2 g128).
"""
from __future__ import annotations

LM_HEAD_NOTE = ("lm_head is quantized: gptqmodel's GPTQModel.load, vLLM and quantkit load it; transformers + optimum "
                "convert only the decoder blocks and would leave the head unloaded")
BNB_NOTE = ("bitsandbytes: loads with transformers + bitsandbytes (CPU or CUDA) and in vLLM/TGI through their "
            "bitsandbytes paths; ExLlama, Marlin and gptqmodel kernels do not read it")
MARLIN_BITS = (4, 8)
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
EXLLAMA_GROUP_SIZES = (-1, 32, 64, 128)


def _example(names: list[str]) -> str:
    return f"{len(names)} module{'s' if len(names) != 1 else ''} (e.g. {names[0]})"


def compatibility_notes(quantization_config: dict, shapes: dict[str, tuple[int, int]] | None = None) -> list[str]:
    """Known loader limits for a checkpoint's quantization_config, one sentence each.

    :param quantization_config: the dict from config.json.
    :param shapes: module name -> (out_features, in_features), as nn.Linear.weight.shape; enables the
        per-module checks (ragged last group, Marlin tile sizes). None skips them.

    >>> compatibility_notes({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True})
    []
    """
    qc = quantization_config or {}
    method = str(qc.get("quant_method", "")).lower()
    if method == "bitsandbytes":
        return [BNB_NOTE]
    if method != "gptq":
        return [f"quant_method {qc.get('quant_method')!r}: compatibility notes cover GPTQ checkpoints only"]
    bits = qc.get("bits")
    group = qc.get("group_size", -1)
    sym = qc.get("sym", True)
    desc_act = qc.get("desc_act", False)
    fmt = qc.get("checkpoint_format", "gptq")
    notes: list[str] = []

    if qc.get("lm_head"):
        notes.append(LM_HEAD_NOTE)
    marlin_why = []
    if bits not in MARLIN_BITS:
        marlin_why.append(f"{bits}-bit")
    if not sym:
        marlin_why.append("asymmetric")
    if group not in MARLIN_GROUP_SIZES:
        marlin_why.append(f"group size {group}")
    if marlin_why:
        notes.append(f"vLLM: {', '.join(marlin_why)} is outside its fast Marlin/Machete kernels (4-bit or 8-bit, "
                     "symmetric, group size -1/32/64/128); it falls back to the slower gptq kernel")
    if fmt == "gptq_v2":
        notes.append("vLLM: checkpoint_format gptq_v2 (zero points stored as-is) loads correctly only in releases "
                     "with PR #26092 (Oct 2025), on the gptq kernel; older vLLM reads it as v1 and generates garbage")
    elif not sym or bits in (2, 3):
        notes.append("vLLM: asymmetric or 2/3-bit checkpoints in the v1 'gptq' format have been mis-loaded as "
                     "garbage; prefer checkpoint_format gptq_v2 for them")
    if bits != 4:
        notes.append(f"ExLlama (v1/v2 GPTQ kernels, also TGI's and transformers' exllama backends): 4-bit only, "
                     f"so {bits}-bit needs another kernel (ExLlamaV2's 2-8 bit support is its own EXL2 format)")
    elif group not in EXLLAMA_GROUP_SIZES:
        notes.append(f"ExLlama v2 GPTQ kernel (as gptqmodel ships it): group size {group} is not one of -1/32/64/128")
    if desc_act and group == -1:
        notes.append("TGI: desc_act with group_size -1 breaks its exllama path")

    if shapes:
        effective = lambda k: k if group == -1 else group  # noqa: E731
        ragged = sorted(n for n, (_, k) in shapes.items() if k % effective(k))
        if ragged:
            notes.append(f"{_example(ragged)} have a partial last group (in_features not divisible by group size "
                         f"{group}): vLLM's Marlin kernel refuses them; transformers + gptqmodel's default CPU "
                         "kernel cannot run them, load with GPTQConfig(bits=..., group_size=..., backend=\"torch\")")
        tiles = sorted(n for n, (out, k) in shapes.items() if (k % 128 or out % 64) and n not in ragged)
        if tiles and not marlin_why:
            notes.append(f"{_example(tiles)} have in_features not divisible by 128 or out_features not divisible by "
                         "64: vLLM's Marlin kernel refuses them (run vLLM with --quantization gptq)")
        if bits == 4:
            not32 = sorted(n for n, (_, k) in shapes.items() if k % 32)
            if not32:
                notes.append(f"{_example(not32)} have in_features not divisible by 32: gptqmodel's ExLlama v2 "
                             "kernel cannot take them")
    return notes
