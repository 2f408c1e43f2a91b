"""The `quantkit` command: click parsing only; the work happens in the library."""
from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from quantkit import __version__
from quantkit.cli.output import silence_libraries
from quantkit.config import (
    BNB_BITS,
    COMPUTE_DTYPES,
    DEFAULT_GGUF_TYPE,
    DEFAULT_SHARD_SIZE,
    GGUF_FILE_TYPES,
    IMPORT_DTYPES,
    METHODS,
    SUPPORTED_BITS,
    CalibSpec,
    QuantSpec,
)
from quantkit.errors import QuantkitError, first_line


class _OneLineErrors(click.Group):
    """The one error path of every command: a QuantkitError is one `Error:` line and exit 1; any other exception
    is one line naming it as an internal error (exit 1), with its traceback only under --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit,
                KeyboardInterrupt):
            raise
        except QuantkitError as e:
            if _debug(ctx):
                raise
            raise click.ClickException(first_line(e)) from None
        except Exception as e:
            if _debug(ctx):
                raise
            raise click.ClickException(f"internal error ({type(e).__name__}: {first_line(e)}); rerun with --debug "
                                       "for the traceback") from None


def _debug(ctx: click.Context) -> bool:
    return bool((ctx.find_root().params or {}).get("debug"))


class _TqdmHandler(logging.Handler):
    """Log lines printed above a running progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def _setup_logging(quiet: bool) -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("quantkit")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    silence_libraries()


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="quantkit")
@click.option("--debug", is_flag=True, help="show the full traceback of any error")
def cli(debug: bool) -> None:
    """Quantize Hugging Face causal LMs to GPTQ checkpoints and prove they are good."""


@cli.command("import-gguf")
@click.argument("gguf_file", type=click.Path(dir_okay=False, path_type=str))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("--dtype", type=click.Choice(IMPORT_DTYPES), default="float32", show_default=True,
              help="dtype of the written weights (float32 keeps the GGUF values exactly)")
@click.option("--max-shard-size", default=DEFAULT_SHARD_SIZE, show_default=True, help="largest safetensors shard")
@click.option("--overwrite", is_flag=True, help="replace OUT_DIR if it exists")
def import_gguf_cmd(gguf_file: str, out_dir: str, dtype: str, max_shard_size: str, overwrite: bool) -> None:
    """Convert GGUF_FILE into a safetensors checkpoint in OUT_DIR (config, tokenizer, chat template)."""
    from quantkit.tools.gguf_import import import_gguf
    from quantkit.write.shards import parse_size

    _setup_logging(quiet=False)
    try:
        shard = parse_size(max_shard_size)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--max-shard-size") from None
    out = import_gguf(gguf_file, out_dir, dtype=dtype, max_shard_bytes=shard, overwrite=overwrite)
    click.echo(f"wrote {out}")


@cli.command()
@click.argument("model")
@click.option("--bits", type=click.Choice([str(b) for b in SUPPORTED_BITS]), default=str(QuantSpec.bits),
              show_default=True)
@click.option("--group-size", type=int, default=QuantSpec.group_size, show_default=True,
              help="input channels per scale; -1 = per row")
@click.option("--sym/--asym", default=QuantSpec.sym, show_default=True,
              help="symmetric grid (v1 format) or asymmetric (v2)")
@click.option("--damp", type=float, default=QuantSpec.damp, show_default=True,
              help="Hessian damping, fraction of mean diagonal")
@click.option("--act-order/--no-act-order", default=QuantSpec.act_order, show_default=True,
              help="quantize columns by decreasing Hessian diagonal (desc_act; g_idx is permuted unless "
                   "--static-groups)")
@click.option("--static-groups", is_flag=True,
              help="with --act-order: fix group parameters first, so g_idx stays in order")
@click.option("--true-sequential/--no-true-sequential", default=QuantSpec.true_sequential, show_default=True,
              help="quantize a layer's Linears in order, each seeing the already-quantized ones")
@click.option("--clip-search/--no-clip-search", default=QuantSpec.clip_search, show_default=True,
              help="shrink each group's range where that lowers its rounding error (costs ~5% more time)")
@click.option("--skip", "skip", multiple=True, metavar="PATTERN",
              help="keep Linears matching this glob (name within a layer, e.g. mlp.down_proj) in float16; repeatable")
@click.option("--lm-head", "lm_head", is_flag=True,
              help="quantize the output head too (loads in gptqmodel and vLLM, not transformers + optimum)")
@click.option("--gptaq", is_flag=True,
              help="asymmetric calibration: solve each Linear against the unquantized model's outputs, so it also "
                   "corrects the error of earlier layers (more time: unquantized forwards beside the quantized ones)")
@click.option("--exact-sums", is_flag=True,
              help="sum Hessians in float64 and share the calibration among torchrun's processes in whole "
                   "mini-batches: the same output bytes for any number of processes (twice the Hessians' memory "
                   "while they are summed)")
@click.option("--expert-chunk", type=int, default=QuantSpec.expert_chunk, show_default=True,
              help="Mixture-of-Experts: experts whose Hessians one calibration pass holds; 0 = as many as 2 GiB hold")
@click.option("--expert-min-tokens", type=int, default=QuantSpec.expert_min_tokens, show_default=True,
              help="Mixture-of-Experts: an expert routed fewer calibration tokens is rounded to nearest")
@click.option("--method", type=click.Choice(METHODS), default=QuantSpec.method, show_default=True,
              help="gptq (calibrated), rtn (round-to-nearest baseline, no calibration), or bitsandbytes nf4/int8 "
                   "(needs bitsandbytes; --bits and the GPTQ options do not apply)")
@click.option("--format", "output_format", type=click.Choice(["gptq", "gguf"]), default="gptq", show_default=True,
              help="gptq: a safetensors checkpoint; gguf: one .gguf file for llama.cpp and ollama (see --gguf-type)")
@click.option("--gguf-type", type=click.Choice(GGUF_FILE_TYPES, case_sensitive=False), default=None,
              help=f"with --format gguf: llama.cpp's file type (block types, and the mixes by name; default "
                   f"{DEFAULT_GGUF_TYPE})")
@click.option("--gguf-importance/--no-gguf-importance", default=QuantSpec.gguf_importance, show_default=True,
              help="with --format gguf: choose block scales weighted by the calibration inputs' mean square, as "
                   "llama.cpp's --imatrix does")
@click.option("--calib", default=CalibSpec.source, show_default=True,
              help="built-in set, a .txt/.jsonl/.parquet file, or hf:<dataset>[:config][:split]")
@click.option("--samples", type=int, default=CalibSpec.samples, show_default=True, help="calibration samples")
@click.option("--seq-len", type=int, default=CalibSpec.seq_len, show_default=True, help="tokens per calibration sample")
@click.option("--seed", type=int, default=CalibSpec.seed, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--compute-dtype", type=click.Choice(COMPUTE_DTYPES), default="auto",
              show_default=True, help="dtype of the calibration forwards; auto: the model's 16-bit dtype on a GPU and "
                                      "a bfloat16 model's on a CPU with AVX512-BF16/AMX, else float32")
@click.option("--repo-id", default=None, help="hub-cache repo id to publish as, NAMESPACE/NAME")
@click.option("--out", type=click.Path(path_type=str), default=None,
              help="write to this directory (with --format gguf: this .gguf file) instead of the hub cache")
@click.option("--overwrite", is_flag=True, help="replace an existing output")
@click.option("--max-shard-size", default=DEFAULT_SHARD_SIZE, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object; no progress or log lines")
def quantize(model: str, bits: str, group_size: int, sym: bool, damp: float, act_order: bool, static_groups: bool,
             true_sequential: bool, clip_search: bool, skip: tuple[str, ...], lm_head: bool, gptaq: bool,
             exact_sums: bool, expert_chunk: int, expert_min_tokens: int, method: str, output_format: str,
             gguf_type: str | None, gguf_importance: bool, calib: str, samples: int, seq_len: int, seed: int,
             device: str, compute_dtype: str, repo_id: str | None, out: str | None, overwrite: bool,
             max_shard_size: str, as_json: bool) -> None:
    """Quantize MODEL (a directory or a repo id in the local hub cache) to a GPTQ checkpoint or a GGUF file."""
    from quantkit.config import CalibSpec, InvalidSetting, QuantSpec

    if repo_id and out:
        raise click.UsageError("--repo-id and --out are mutually exclusive")
    if gguf_type is not None and output_format != "gguf":
        raise click.UsageError("--gguf-type applies to --format gguf")
    if output_format == "gguf":
        _refuse_gptq_only_options()
        gguf_type = (gguf_type or DEFAULT_GGUF_TYPE).upper()
    if method in BNB_BITS and click.get_current_context().get_parameter_source("bits") is ParameterSource.DEFAULT:
        bits = str(BNB_BITS[method])
    try:
        spec = QuantSpec(bits=int(bits), group_size=group_size, sym=sym, damp=damp, act_order=act_order,
                         static_groups=static_groups, true_sequential=true_sequential, method=method,
                         clip_search=clip_search, skip=tuple(skip), lm_head=lm_head, gptaq=gptaq,
                         exact_sums=exact_sums, expert_chunk=expert_chunk, expert_min_tokens=expert_min_tokens,
                         gguf_type=gguf_type, gguf_importance=gguf_importance)
    except InvalidSetting as e:
        raise click.BadParameter(str(e), param_hint=e.flag) from None
    try:
        calib_spec = CalibSpec(source=calib, samples=samples, seq_len=seq_len, seed=seed)
    except InvalidSetting as e:
        raise click.BadParameter(str(e), param_hint=e.flag) from None
    _setup_logging(quiet=as_json)
    from quantkit.run.pipeline import quantize as run_quantize

    result = run_quantize(model, spec, calib_spec, repo_id=repo_id, out=out, overwrite=overwrite, device=device,
                          max_shard_size=max_shard_size, progress=not as_json, compute_dtype=compute_dtype)
    if result.rank != 0:  # under torchrun, process 0 reports the run
        return
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    gpu = f", peak GPU {result.peak_gpu_mb:.0f} MB" if result.peak_gpu_mb is not None else ""
    click.echo(f"wrote {result.path}  ({result.seconds:.0f}s, peak RSS {result.peak_rss_mb:.0f} MB{gpu})")
    if spec.is_gguf and result.gguf_file is not None:
        # ollama reads a bare name after FROM as a model to pull: a relative path must start with ./
        local = result.gguf_file if Path(result.gguf_file).is_absolute() else f"./{result.gguf_file}"
        click.echo(f"run it with: llama-cli -m {result.gguf_file}   (ollama: a Modelfile with FROM {local})")
    elif result.repo_id:
        click.echo(f"load it with: AutoModelForCausalLM.from_pretrained(\"{result.repo_id}\")")


# options that say how a GPTQ checkpoint stores its weights: a GGUF file's types say it instead
GPTQ_ONLY_OPTIONS = ("bits", "group_size", "sym", "static_groups", "clip_search", "max_shard_size")


def _refuse_gptq_only_options() -> None:
    """--format gguf with a GPTQ-only option given is a usage error, not an option silently ignored."""
    ctx = click.get_current_context()
    given = [name for name in GPTQ_ONLY_OPTIONS if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise click.UsageError(f"{flags} applies to GPTQ checkpoints; with --format gguf, --gguf-type says how each "
                               "tensor is stored")


def _register_commands() -> None:
    from quantkit.cli.tools import cache_group, convert_command, estimate_command, inspect_command
    from quantkit.cli.verify import verify_command

    cli.add_command(verify_command)
    cli.add_command(estimate_command)
    cli.add_command(inspect_command)
    cli.add_command(convert_command)
    cli.add_command(cache_group)


_register_commands()


def main() -> None:
    from quantkit.run.ranks import under_torchrun

    if not under_torchrun():
        cli(prog_name="quantkit")
        return
    # a torchrun process ends without C++'s static destructors: with a gloo process group they can abort the
    # process after its work is done (std::terminate, "terminate called without an active exception"), which
    # torchrun would report as the run's failure
    code = 1
    try:
        cli(prog_name="quantkit")
        code = 0
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except BaseException:  # --debug's traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
