"""The README.md model card written next to a quantized checkpoint."""
from __future__ import annotations

from quantkit.config import CalibSpec, QuantSpec


def render_model_card(*, repo_id: str | None, source: str, spec: QuantSpec, calib: CalibSpec | None,
                      version: str, fmt: str, layer_losses: list[dict], size_bytes: int) -> str:
    title = repo_id or f"{source} ({spec.method.upper()} {spec.bits}-bit)"
    group = "per row" if spec.group_size == -1 else str(spec.group_size)
    tag = "bitsandbytes" if spec.is_bnb else "gptq"
    lines = [
        "---",
        f"base_model: {source}",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        f"tags: [{tag}, {spec.bits}-bit, quantkit]",
        "---",
        f"# {title}",
        "",
        f"{spec.bits}-bit {spec.method.upper()} quantization of `{source}`, made with quantkit {version}.",
        "",
        "| setting | value |",
        "|---|---|",
        f"| method | {spec.method} |",
        f"| bits | {spec.bits} |",
    ]
    if spec.is_bnb:
        scheme = "NF4, blocks of 64 with an absmax scale" if spec.bits == 4 else "LLM.int8, per-row absmax"
        lines += [f"| scheme | {scheme} |"]
    else:
        target = "the unquantized model (GPTAQ)" if spec.gptaq else "each layer as quantized so far (GPTQ)"
        head = "quantized (lm_head: true; untied from the embedding)" if spec.lm_head else "float16"
        lines += [
            f"| group size | {group} |",
            f"| symmetric | {spec.sym} |",
            f"| act-order (desc_act) | {spec.act_order} |",
            f"| true sequential | {spec.true_sequential} |",
            f"| range clip search | {spec.clip_search} |",
            *([f"| calibration target | {target} |"] if spec.method == "gptq" else []),
            f"| damping | {spec.damp} |",
            f"| output head | {head} |",
        ]
    lines += [
        f"| kept in float16 | {', '.join(f'`{p}`' for p in spec.skip) or 'nothing'} |",
        f"| checkpoint format | {fmt} |",
        f"| weights on disk | {size_bytes / 2**20:.1f} MiB |",
    ]
    if calib is not None and spec.method == "gptq":
        lines += [f"| calibration set | {calib.source} |",
                  f"| calibration tokens | {calib.samples} x {calib.seq_len} (seed {calib.seed}) |"]
    where = repo_id or "<this directory>"
    if spec.lm_head:  # optimum converts only the decoder blocks: gptqmodel's own loader (or vLLM) is needed
        load = ["Its output head is quantized too, so load it with gptqmodel (CPU or CUDA) or vLLM, not "
                "`AutoModelForCausalLM` + optimum:", "", "```python", "from gptqmodel import GPTQModel",
                f'model = GPTQModel.load("{where}")', "```"]
    else:
        load = [("Needs `transformers` and `bitsandbytes` (CPU or CUDA):" if spec.is_bnb
                 else "Needs `transformers`, `optimum` and `gptqmodel` (CPU or CUDA):"), "", "```python",
                "from transformers import AutoModelForCausalLM, AutoTokenizer",
                f'model = AutoModelForCausalLM.from_pretrained("{where}", device_map="auto")',
                f'tokenizer = AutoTokenizer.from_pretrained("{where}")', "```"]
    lines += ["", "## Load it", "", *load, "", "Check it against its base model with `quantkit verify`."]
    if layer_losses:
        worst = sorted(layer_losses, key=lambda r: -max(r["losses"].values()))[:5]
        lines += ["", "## GPTQ loss, highest layers", "", "| layer | module | loss |", "|---|---|---|"]
        for r in worst:
            name, loss = max(r["losses"].items(), key=lambda kv: kv[1])
            lines.append(f"| {r['index']} | {name} | {loss:.4g} |")
    return "\n".join(lines) + "\n"


def render_gguf_card(*, repo_id: str | None, source: str, spec: QuantSpec, calib: CalibSpec | None, version: str,
                     file_name: str, size_bytes: int, types: dict[str, int]) -> str:
    """The model card beside a GGUF file quantkit wrote: how its codes were chosen, its tensor types, how to run it."""
    how = ("GPTQ on llama.cpp's block grids" + (", grids weighted by the calibration inputs' mean square"
                                                 if spec.gguf_importance else "")
           if spec.method == "gptq" else "round-to-nearest on llama.cpp's block grids (as llama-quantize)")
    lines = [
        "---",
        f"base_model: {source}",
        "library_name: gguf",
        "pipeline_tag: text-generation",
        f"tags: [gguf, {spec.gguf_type}, quantkit]",
        "---",
        f"# {repo_id or file_name}",
        "",
        f"{spec.gguf_type} GGUF of `{source}` for llama.cpp and ollama, made with quantkit {version}.",
        "",
        "| setting | value |",
        "|---|---|",
        f"| file | {file_name} ({size_bytes / 2**20:.1f} MiB) |",
        f"| llama.cpp type | {spec.gguf_type} |",
        f"| tensors by type | {', '.join(f'{n} {t}' for t, n in sorted(types.items()))} |",
        f"| codes | {how} |",
        f"| kept in float16 | {', '.join(f'`{p}`' for p in spec.skip) or 'nothing'} |",
    ]
    if calib is not None and spec.method == "gptq":
        lines += [f"| calibration set | {calib.source} |",
                  f"| calibration tokens | {calib.samples} x {calib.seq_len} (seed {calib.seed}) |"]
    lines += ["", "## Run it", "", "```bash", f"llama-cli -m {file_name} -p \"Hello\"", "```", "",
              f"ollama: a `Modelfile` holding `FROM ./{file_name}`, then `ollama create NAME -f Modelfile`.", "",
              "Check it against its base model with `quantkit verify`."]
    return "\n".join(lines) + "\n"
