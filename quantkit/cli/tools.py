"""`quantkit estimate`, `inspect`, `convert` and `cache list|rm`: click parsing and output only.

Exit codes: 0 done; 1 the work could not be done (one `Error:` line), or `inspect` found a damaged checkpoint
(manifest mismatch or unreadable headers); 2 usage errors, from click.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from quantkit.config import (
    DEFAULT_ESTIMATE_BITS,
    ESTIMATE_BATCH,
    ESTIMATE_BITS,
    ESTIMATE_CONTEXT,
    ESTIMATE_DEVICES,
    CalibSpec,
    QuantSpec,
)

if TYPE_CHECKING:
    from quantkit.tools.cache import CachedModel


def _bits(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        bits = tuple(dict.fromkeys(int(b) for b in value.split(",") if b.strip()))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 16,8,4, got {value!r}") from None
    bad = [b for b in bits if b not in ESTIMATE_BITS]
    if bad or not bits:
        raise click.BadParameter(f"each must be one of {', '.join(map(str, ESTIMATE_BITS))}, got {value!r}")
    return bits


def _group_size(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value != -1 and value <= 0:
        raise click.BadParameter(f"must be -1 (per row) or positive, got {value}")
    return value


def _memory(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    from quantkit.tools.estimate_memory import parse_memory_size

    if value is None:
        return None
    try:
        return parse_memory_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@click.command("estimate")
@click.argument("model_or_config")
@click.option("--bits", default=",".join(map(str, DEFAULT_ESTIMATE_BITS)), show_default=True, callback=_bits,
              help="comma-separated bit widths to size (16 = unquantized fp16)")
@click.option("--group-size", type=int, default=QuantSpec.group_size, show_default=True, callback=_group_size,
              help="input channels per scale/zero; -1 = per row")
@click.option("--context", type=click.IntRange(min=1), default=ESTIMATE_CONTEXT, show_default=True,
              help="tokens of KV cache per sequence")
@click.option("--batch", type=click.IntRange(min=1), default=ESTIMATE_BATCH, show_default=True,
              help="concurrent sequences")
@click.option("--samples", type=click.IntRange(min=1), default=CalibSpec.samples, show_default=True,
              help="calibration samples (quantize peak)")
@click.option("--seq-len", type=click.IntRange(min=1), default=CalibSpec.seq_len, show_default=True,
              help="tokens per calibration sample (quantize peak)")
@click.option("--gptaq", is_flag=True, help="size the quantize peak of quantize --gptaq")
@click.option("--exact-sums", is_flag=True, help="size the quantize peak of quantize --exact-sums")
@click.option("--expert-chunk", type=click.IntRange(min=0), default=QuantSpec.expert_chunk, show_default=True,
              help="Mixture-of-Experts: size the quantize peak of quantize --expert-chunk N (0 = automatic)")
@click.option("--device", type=click.Choice(ESTIMATE_DEVICES), default="auto", show_default=True,
              help="the quantize modes to size: auto = a CPU run and GPU runs")
@click.option("--gpus", type=click.IntRange(min=1), default=1, show_default=True,
              help="also size a torchrun --nproc-per-node N run (per process)")
@click.option("--gpu-mem", callback=_memory, help="one GPU's memory, e.g. 24GB (a 'N GB' card is N GiB): fits?")
@click.option("--host-mem", callback=_memory, help="the host's memory, e.g. 64GB (binary units): fits?")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def estimate_command(model_or_config: str, bits: tuple[int, ...], group_size: int, context: int, batch: int,
                     samples: int, seq_len: int, gptaq: bool, exact_sums: bool, expert_chunk: int, device: str,
                     gpus: int, gpu_mem: int | None, host_mem: int | None, as_json: bool) -> None:
    """Memory needed to run and to quantize MODEL_OR_CONFIG, from its config alone: a directory, a config.json,
    a repo id in the local hub cache, or a built-in name (llama-2-7b, llama-2-13b, llama-2-70b, mistral-7b,
    llama-3-8b, llama-3-70b, qwen2.5-7b, smollm2-135m, qwen3-30b-a3b, mixtral-8x7b, deepseek-v3). Quantize's
    memory per mode (a CPU run, one GPU, N GPUs): GPU allocation and nvidia-smi's figure, host, disk; with
    --gpu-mem/--host-mem, whether each fits. Sizes in GiB (2**30 bytes)."""
    from quantkit.tools.estimate import estimate
    from quantkit.tools.estimate_text import format_estimate

    result = estimate(model_or_config, bits=bits, group_size=group_size, context=context, batch=batch,
                      samples=samples, seq_len=seq_len, gptaq=gptaq, expert_chunk=expert_chunk, device=device,
                      gpus=gpus, gpu_mem=gpu_mem, host_mem=host_mem, exact_sums=exact_sums)
    click.echo(json.dumps(result.to_dict()) if as_json else format_estimate(result))


@click.command("inspect")
@click.argument("path_or_repo")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def inspect_command(path_or_repo: str, as_json: bool) -> None:
    """Show what PATH_OR_REPO holds (a directory or a repo id in the local hub cache): quantization settings,
    quantized and float Linears, size and compression vs fp16, manifest status and loader compatibility notes.
    Reads safetensors headers only. A .gguf file (or a folder or cached repo id holding one .gguf file and no
    config.json): its architecture and sizes, file type, bytes per ggml type and bits per weight, tokenizer, from
    its header and metadata. Exit 1 when the manifest does not match or a header is unreadable."""
    from quantkit.tools.inspect import format_inspect, inspect
    from quantkit.tools.inspect_gguf import format_inspect_gguf, inspect_gguf, is_gguf_file
    from quantkit.verification.sources import artifact_path

    given = Path(path_or_repo).expanduser()
    # a GGUF file, or a folder / cached repo id holding one GGUF file and no config.json (artifact_path)
    gguf_file = given if is_gguf_file(given) else artifact_path(path_or_repo)
    if gguf_file.is_file():
        gguf_report = inspect_gguf(gguf_file)
        click.echo(json.dumps(gguf_report.to_dict()) if as_json else format_inspect_gguf(gguf_report))
        if gguf_report.errors:
            if not as_json:
                click.echo(f"Error: GGUF metadata damaged: {gguf_report.errors[0]}", err=True)
            raise SystemExit(1)
        return
    report = inspect(path_or_repo)
    click.echo(json.dumps(report.to_dict()) if as_json else format_inspect(report))
    damaged = report.errors or report.manifest.get("status") in ("mismatch", "invalid")
    if damaged:
        if not as_json:
            first = (report.manifest.get("problems") or report.errors or ["manifest invalid"])[0]
            click.echo(f"Error: checkpoint damaged: {first}", err=True)
        raise SystemExit(1)


@click.command("convert")
@click.argument("gptq_checkpoint")
@click.argument("out", type=click.Path(dir_okay=False, path_type=str))
@click.option("--overwrite", is_flag=True, help="replace OUT when it is an existing GGUF file")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def convert_command(gptq_checkpoint: str, out: str, overwrite: bool, as_json: bool) -> None:
    """Repack GPTQ_CHECKPOINT (a directory or a repo id in the local hub cache; 4- or 8-bit, any tool's v1 or v2
    format) into llama.cpp blocks as the GGUF file OUT, without calibration: 4-bit symmetric as Q4_0 and 8-bit
    symmetric as Q8_0 (bit for bit), 4-bit asymmetric as Q4_1 (the min rounded to float16). Groups must be
    multiples of 32, whole 32-column blocks under act-order; anything else is refused with the command that
    works instead."""
    from quantkit.tools.convert import convert

    result = convert(gptq_checkpoint, out, overwrite=overwrite)
    click.echo(json.dumps(result.to_dict()) if as_json else result.summary())


@click.group("cache")
def cache_group() -> None:
    """Quantized models in the local Hugging Face hub cache (HF_HUB_CACHE)."""


@cache_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def cache_list_command(as_json: bool) -> None:
    """List quantized models (refs/main snapshot with a quantization_config) in the hub cache. Damaged entries are
    left out; when there are any, one `Error:` line names the first and the exit status is 1."""
    from quantkit.source.hub import hub_cache_dir
    from quantkit.tools.cache import scan_cache

    listing = scan_cache()
    models = listing.models
    if as_json:
        click.echo(json.dumps({"cache": str(hub_cache_dir()), "models": [m.to_dict() for m in models],
                               "skipped": listing.skipped}))
    elif not models:
        click.echo(f"no quantized models in {hub_cache_dir()}")
    else:
        _print_models(models)
    if listing.skipped:  # the intact ones are listed; the exit status says the cache needs a look
        more = len(listing.skipped) - 1
        also = f" (+{more} more damaged entries; --json lists them)" if more else ""
        raise click.ClickException(f"{listing.skipped[0]}{also}")


def _print_models(models: list[CachedModel]) -> None:
    from quantkit.tools.inspect import human_size

    rows = [["repo id", "method", "bits", "group", "sym", "size", "path"]]
    for m in models:
        group = "row" if m.group_size == -1 else str(m.group_size)
        sym = "?" if m.sym is None else "sym" if m.sym else "asym"
        rows.append([m.repo_id, m.method, str(m.bits), group, sym, human_size(m.size_bytes), m.path])
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.rjust(w) if c in (2, 3, 5) else cell.ljust(w)
                             for c, (cell, w) in enumerate(zip(row, widths))).rstrip())


@cache_group.command("rm")
@click.argument("repo_id")
@click.option("--yes", "-y", is_flag=True, help="do not ask for confirmation")
def cache_rm_command(repo_id: str, yes: bool) -> None:
    """Remove REPO_ID (its whole models--NS--NAME folder) from the hub cache."""
    from quantkit.tools.cache import cache_remove, cached_repo_folder, folder_size
    from quantkit.tools.inspect import human_size

    folder = cached_repo_folder(repo_id)
    if not yes:
        click.confirm(f"remove {repo_id} ({human_size(folder_size(folder))}, {folder})?", abort=True)
    freed = cache_remove(repo_id)
    click.echo(f"removed {repo_id} ({human_size(freed)} freed)")
