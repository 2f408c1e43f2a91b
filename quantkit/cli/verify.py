"""`quantkit verify`: click parsing and terminal output only; the work happens in verification.api.verify().

Exit codes: 0 every check passed; 1 a threshold or the integrity check failed, or the run could not
complete (one `Error:` line); 2 usage errors (bad options), from click.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from quantkit.cli.output import silence_model_loading
from quantkit.config import DEFAULT_EVAL
from quantkit.formats.registry import formats
from quantkit.verification.integrity import describe_quantization
from quantkit.verification.loading import LOADERS
from quantkit.verification.modes import DEVICES, STREAM_CHOICES
from quantkit.verification.report import (
    DEFAULT_MAX_KL,
    DEFAULT_MAX_PPL_RATIO,
    DEFAULT_MIN_TOP1,
    EVAL_MAX_TOKENS,
    EVAL_SEQ_LEN,
    MAX_NEW_TOKENS,
    Thresholds,
    VerifyReport,
)

if TYPE_CHECKING:
    from tqdm import tqdm


WORST_LAYERS = 3  # layers named in the terminal summary of per-layer errors


class _Progress:
    """Stage lines on stderr, plus a tqdm bar for counted stages when stderr is a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.stage: str | None = None
        self.bar: tqdm | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if stage != self.stage:
            self.close()
            self.stage = stage
            if total > 1 and sys.stderr.isatty():
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=stage, file=sys.stderr, leave=False)
            else:
                click.echo(f"{stage}{f' ({total})' if total > 1 else ''}...", err=True)
        if self.bar is not None:
            self.bar.n = done
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    from quantkit.write.shards import parse_size

    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@click.command("verify")
@click.argument("quantized")
@click.option("--base", default=None, help="reference model (directory or cached repo id); default: the base recorded "
              "in the checkpoint's quantkit.json, when available")
@click.option("--eval", "eval_source", default=DEFAULT_EVAL, show_default=True,
              help="evaluation text: built-in set, a .txt/.jsonl/.parquet file, or hf:<dataset>[:config][:split]")
@click.option("--seq-len", type=click.IntRange(min=8), default=EVAL_SEQ_LEN, show_default=True,
              help="tokens per evaluation window")
@click.option("--max-tokens", type=click.IntRange(min=8), default=EVAL_MAX_TOKENS, show_default=True,
              help="evaluate at most this many tokens (whole windows)")
@click.option("--loader", type=click.Choice(LOADERS), default="quantkit", show_default=True,
              help="quantkit: pure-torch dequantizing layers (no GPU, no gptqmodel); transformers: "
              "from_pretrained through optimum + gptqmodel, the deploy path")
@click.option("--format", "fmt", type=click.Choice(formats()), default=None,
              help="the artifact's format; default: detected from its files (quantization_config, a .gguf name)")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="where the layer-by-layer evaluation runs: auto is the GPU when there is one")
@click.option("--stream", type=click.Choice(STREAM_CHOICES), default="auto", show_default=True,
              help="on: run both models one decoder layer at a time (memory: one layer of each, any size; per-layer "
              "errors; CPU or GPU); off: hold both whole in memory; auto: on, unless --max-memory or --loader "
              "transformers asks for whole models")
@click.option("--max-memory", callback=_size, default=None,
              help="RAM for both models' weights together, e.g. 8GB; decoder layers beyond it are offloaded to disk")
@click.option("--max-ppl-ratio", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_MAX_PPL_RATIO,
              show_default=True, help="fail when quantized / base perplexity exceeds this")
@click.option("--max-kl", type=click.FloatRange(min=0), default=DEFAULT_MAX_KL, show_default=True,
              help="fail when the mean next-token KL(base || quantized) exceeds this (nats)")
@click.option("--min-top1", type=click.FloatRange(0, 1), default=DEFAULT_MIN_TOP1, show_default=True,
              help="fail when top-1 next-token agreement with the base is below this")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout; no progress lines")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=str), default=None,
              help="write report.json, report.md and verify.png into this directory")
@click.option("--no-generate", is_flag=True, help="skip the side-by-side greedy generations")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=MAX_NEW_TOKENS, show_default=True,
              help="tokens generated per prompt")
def verify_command(quantized: str, base: str | None, eval_source: str, seq_len: int, max_tokens: int, loader: str,
                   fmt: str | None, device: str, stream: str, max_memory: int | None, max_ppl_ratio: float,
                   max_kl: float, min_top1: float, as_json: bool,
                   report_dir: str | None, no_generate: bool, max_new_tokens: int) -> None:
    """Check QUANTIZED (a directory, a repo id in the local hub cache, or a .gguf file; GPTQ, AWQ,
    compressed-tensors, bitsandbytes, FP8 or GGUF): integrity, perplexity, KL and top-1 agreement against its base
    model, each decoder layer's error (layer by layer), and greedy generations side by side (in memory). Exit 0 when
    every check passes, 1 when one fails."""
    if max_tokens < seq_len:
        raise click.BadParameter(f"must be at least --seq-len ({seq_len}), got {max_tokens}", param_hint="--max-tokens")
    silence_model_loading()
    from quantkit.verification.api import verify

    progress = _Progress(enabled=not as_json)
    try:
        report = verify(quantized, base, fmt=fmt, eval_source=eval_source, seq_len=seq_len, max_tokens=max_tokens,
                        loader=loader, max_memory=max_memory, device=device, stream=stream,
                        generate=not no_generate, max_new_tokens=max_new_tokens,
                        thresholds=Thresholds(max_ppl_ratio=max_ppl_ratio, max_kl=max_kl, min_top1=min_top1),
                        progress=progress)
    finally:
        progress.close()
    written = None
    if report_dir:
        from quantkit.verification.render import write_report

        written = write_report(report, report_dir)
    integrity_failure = next((f for f in report.failures if f["metric"] == "integrity"), None)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    elif not integrity_failure:
        _print_human(report, written)
    if integrity_failure:
        more = len(report.integrity.errors) - 1
        click.echo(f"Error: integrity check failed: {integrity_failure['message']}"
                   f"{f' (+{more} more problems)' if more > 0 else ''}", err=True)
    sys.exit(0 if report.passed else 1)


def _print_human(report: VerifyReport, written: dict[str, Path] | None) -> None:
    from quantkit.verification.render import metric_rows

    r = report
    lines = [f"quantized   {r.quantized_path}  ({r.format or 'unquantized'}, loader: {r.loader})",
             f"base        {r.base_path + f'  ({r.base_origin})' if r.base_path else 'none'}"]
    i = r.integrity
    state = "ok" if i.ok else f"FAILED ({len(i.errors)} problems)"
    detail = []
    if i.manifest:
        detail.append(f"{i.files_checked} files match quantkit.json")
    if i.quantization:
        detail.append(f"{describe_quantization(i.quantization)}, {i.quantized_modules} modules")
    lines.append(f"integrity   {state}{': ' + '; '.join(detail) if detail else ''}")
    if r.eval:
        lines.append(f"evaluation  {r.eval['source']}: {r.eval['windows']} x {r.eval['seq_len']} tokens "
                     f"({r.tokens} predicted), {r.eval['mode']} on {r.eval['device']}")
    if r.quantized_ppl is not None:
        rows = [("metric", "base", "quantized", "threshold", "")] + metric_rows(r)
        widths = [max(len(row[c]) for row in rows) for c in range(5)]
        lines.append("")
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    if r.layer_errors:
        worst = sorted(r.layer_errors, key=lambda row: row["local_error"], reverse=True)[:WORST_LAYERS]
        lines.append("")
        lines.append("layers      largest error added (local relative error of the layer's output): " +
                     ", ".join(f"{row['index']}: {row['local_error']:.3g}" for row in worst))
        final = r.layer_errors[-1]["relative_error"]
        lines.append(f"            relative error of the final hidden states: {final:.3g}")
    if r.generations:
        compared = [g for g in r.generations if g.match is not None]
        lines.append("")
        if compared:
            lines.append(f"generations {sum(1 for g in compared if g.match)}/{len(compared)} identical (greedy)")
        for g in r.generations:
            mark = "" if g.match is None else ("same " if g.match else "DIFF ")
            lines.append(f"  {mark}{g.kind:4}  {_short(g.prompt, 30):32} -> {_short(g.quantized, 50)}")
    for w in i.warnings:
        lines.append(f"warning: {w}")
    for n in i.notes + r.notes:
        lines.append(f"note: {n}")
    if written:
        lines.append(f"report: {written['markdown']}, {written['json'].name}, {written['plot'].name}")
    lines.append("")
    if r.passed:
        lines.append("PASSED" if r.base_ppl is not None else "PASSED (integrity only: no base to compare with)")
    else:
        lines.append("FAILED: " + "; ".join(f["message"] for f in r.failures))
    click.echo("\n".join(lines))


def _short(text: str, n: int) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= n else text[: n - 1] + "…")
