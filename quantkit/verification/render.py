"""Render a VerifyReport: report.json (to_dict), report.md (tables and generations) and verify.png."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from quantkit.source.checkpoint import QUANTIZE_CONFIG_NAME
from quantkit.verification.inputs import OUTLIER_FACTOR
from quantkit.verification.integrity import describe_quantization
from quantkit.verification.report import VerifyReport

if TYPE_CHECKING:
    from matplotlib.axes import Axes

PLOT_NAME = "verify.png"


def write_report(report: VerifyReport, out_dir: str | Path) -> dict[str, Path]:
    """Write the three files into out_dir (created); returns their paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "plot": out / PLOT_NAME}
    paths["json"].write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    paths["markdown"].write_text(render_markdown(report, plot=PLOT_NAME))
    plot(report, paths["plot"])
    return paths


def fmt(value: object, digits: int = 4) -> str:
    """A metric for a table: significant digits, scientific below 1e-3, "–" for a missing value."""
    if value is None:
        return "–"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) < 1e-3 and value != 0:
            return f"{value:.2e}"
        # '#' keeps trailing zeros, so a perplexity of 7.000 does not print as a bare "7"
        return f"{value:#.{digits}g}".rstrip(".")
    return str(value)


def metric_rows(r: VerifyReport) -> list[tuple[str, str, str, str, str]]:
    """(metric, base, quantized, threshold, result) rows shared by report.md and the terminal table."""
    failed = {f["metric"] for f in r.failures}
    t = r.thresholds
    compared = r.base_ppl is not None

    def result(metric: str, limit: float | None) -> str:
        if not compared or limit is None:
            return ""
        return "FAIL" if metric in failed else "pass"

    rows = [("perplexity", fmt(r.base_ppl), fmt(r.quantized_ppl), "", "")]
    if compared:
        rows += [
            ("perplexity ratio", "", "–" if r.ppl_ratio is None else f"{r.ppl_ratio:.4f}",
             _limit("≤", t.max_ppl_ratio), result("ppl_ratio", t.max_ppl_ratio)),
            ("KL mean", "", fmt(r.kl_mean), _limit("≤", t.max_kl), result("kl_mean", t.max_kl)),
            ("KL p99", "", fmt(r.kl_p99), "", ""),
            ("top-1 agreement", "", fmt(r.top1_agreement), _limit("≥", t.min_top1),
             result("top1_agreement", t.min_top1)),
        ]
    return rows


def _limit(op: str, value: float | None) -> str:
    return "" if value is None else f"{op} {value:g}"


def _fence(text: str) -> str:
    """A code fence longer than any backtick run in text, so model output cannot break the Markdown."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _visible(text: str) -> str:
    """Control characters (other than newline and tab) as escapes, so they show up instead of vanishing."""
    return "".join(c if c in "\n\t" or c.isprintable() else repr(c)[1:-1] for c in text)


def _code(text: str) -> str:
    text = _visible(text)
    fence = _fence(text)
    return f"{fence}text\n{text}\n{fence}"


def render_markdown(r: VerifyReport, plot: str | None = PLOT_NAME) -> str:
    status = "PASSED" if r.passed else "FAILED"
    lines = [f"# quantkit verify: {status}", ""]
    lines += ["| | |", "|---|---|",
              f"| quantized | `{r.quantized_path}` ({r.format or 'unquantized'}, loader: {r.loader}) |",
              f"| base | {f'`{r.base_path}` ({r.base_origin})' if r.base_path else 'none'} |"]
    if r.eval:
        e = r.eval
        lines.append(f"| evaluation | {e['source']}: {e['windows']} windows × {e['seq_len']} tokens, "
                     f"{r.tokens} predicted tokens, {e.get('mode', 'in memory')} on {e.get('device', 'cpu')} |")
    lines.append(f"| time | {r.seconds:.0f} s |")
    lines.append("")
    if r.failures:
        lines += ["## Failures", ""] + [f"- **{f['metric']}**: {f['message']}" for f in r.failures] + [""]
    if r.quantized_ppl is not None:
        lines += ["## Metrics", "", "| metric | base | quantized | threshold | result |", "|---|---:|---:|---|---|"]
        lines += [f"| {' | '.join(row)} |" for row in metric_rows(r)]
        lines += ["", "Perplexity: exp of the mean next-token NLL over all evaluated tokens. KL: KL(base ‖ quantized) "
                  "of the next-token distributions per position (mean and 99th percentile). Top-1 agreement: share of "
                  "positions where both models rank the same next token first.", ""]
        if plot:
            lines += [f"![per-window perplexity and KL histogram]({plot})", ""]
    lines += _integrity_section(r)
    if r.generations:
        lines += _generation_section(r)
    if r.layer_errors:
        lines += _layer_error_section(r)
    if r.layers:
        outliers = [str(row["index"]) for row in r.layers if row.get("outlier")]
        lines += ["## Per-layer GPTQ loss (recorded by quantize)", "",
                  "Sum over the layer's Linears of the GPTQ objective (output error on the calibration activations)."
                  + (f" Layers {', '.join(outliers)} stand out (more than {OUTLIER_FACTOR}× the median layer): the "
                     "first places to look when quality is short." if outliers else ""), "",
                  "| layer | total loss | worst module | its loss | |", "|---:|---:|---|---:|---|"]
        lines += [f"| {row['index']} | {fmt(row['total_loss'])} | {row['worst_module']} | {fmt(row['worst_loss'])} | "
                  f"{'⚠ outlier' if row.get('outlier') else ''} |" for row in r.layers]
        lines.append("")
    if r.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in r.notes] + [""]
    return "\n".join(lines)


def _layer_error_section(r: VerifyReport) -> list[str]:
    """Per decoder layer, the error the quantized layer adds (local) and the error accumulated up to it."""
    worst = max(r.layer_errors, key=lambda row: row["local_error"])
    lines = ["## Where the error comes from", "",
             "Per decoder layer, on the evaluation tokens: **local**, ‖L_q(h) − L_b(h)‖ / ‖L_b(h)‖ for the quantized "
             "and the base layer on the same inputs (the base's hidden states), the error this layer adds by itself; "
             "**accumulated**, the quantized model's hidden states after the layer against the base's, each model on "
             f"its own inputs. The largest local error is layer {worst['index']}'s.", "",
             "| layer | local | accumulated |", "|---:|---:|---:|"]
    lines += [f"| {row['index']} | {fmt(row['local_error'])} | {fmt(row['relative_error'])} |"
              for row in r.layer_errors]
    return lines + [""]


def _integrity_section(r: VerifyReport) -> list[str]:
    i = r.integrity
    lines = ["## Integrity", ""]
    if i.manifest:
        lines.append(f"- files: {i.files_checked} checked against the manifest (sha256 and size)")
    if i.quantization:
        settings = QUANTIZE_CONFIG_NAME if i.settings_file == QUANTIZE_CONFIG_NAME else "quantization_config"
        lines.append(f"- quantization: {describe_quantization(i.quantization, long=True)}; {i.quantized_modules} "
                     f"quantized modules consistent with {settings}")
    lines += [f"- **error**: {e}" for e in i.errors]
    lines += [f"- warning: {w}" for w in i.warnings]
    lines += [f"- note: {n}" for n in i.notes]
    return lines + [""]


def _generation_section(r: VerifyReport) -> list[str]:
    compared = any(g.base is not None for g in r.generations)
    matches = sum(bool(g.match) for g in r.generations)
    cfg = r.generation_config
    lines = ["## Generations", "",
             f"Greedy decoding of at most {cfg.get('max_new_tokens', '?')} new tokens, stopping at end-of-sequence "
             f"tokens {cfg.get('eos_token_ids', [])}; chat prompts are rendered with the tokenizer's chat template "
             f"after the system message \"{cfg.get('system_prompt', '')}\"."
             + (f" **{matches} of {len(r.generations)}** continuations are identical." if compared else ""), ""]
    for n, g in enumerate(r.generations, start=1):
        if g.match is None:
            verdict = ""
        elif g.match:
            verdict = " — identical"
        else:
            verdict = f" — differ from generated token {g.first_difference}"
        label = "chat (system + user, chat template)" if g.kind == "chat" else "text"
        lines += [f"### {n}. {label}{verdict}", "", "Prompt:", "", _code(g.prompt), ""]
        if g.base is not None:
            lines += [f"Base (stop: {g.base_stop}):", "", _code(g.base), ""]
        lines += [f"Quantized (stop: {g.quantized_stop}):", "", _code(g.quantized), ""]
    return lines


def plot(r: VerifyReport, path: Path) -> None:
    """Per-window perplexity (base vs quantized) and the histogram of per-position KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_kl = r.kl_histogram is not None
    panels = 1 + has_kl + bool(r.layers) + bool(r.layer_errors)
    fig, axes = plt.subplots(1, panels, figsize=(5.6 * panels + 0.8, 4.2), squeeze=False)
    ax = axes[0][0]
    idx = [w["index"] for w in r.per_window]
    if idx:
        if has_kl:
            ax.plot(idx, [w["base_ppl"] for w in r.per_window], "o-", label=f"base (ppl {fmt(r.base_ppl)})", ms=3)
        ax.plot(idx, [w["quantized_ppl"] for w in r.per_window], "s-", label=f"quantized (ppl {fmt(r.quantized_ppl)})",
                ms=3)
        ax.legend()
    ax.set_xlabel(f"evaluation window ({r.eval.get('seq_len', '?')} tokens each)")
    ax.set_ylabel("perplexity")
    ax.set_title("Perplexity per window")
    ax.grid(alpha=0.3)
    if r.kl_histogram is not None:
        _plot_kl(axes[0][1], r, r.kl_histogram)
    if r.layer_errors:
        _plot_layer_errors(axes[0][1 + has_kl], r)
    if r.layers:
        _plot_layers(axes[0][panels - 1], r)
    status = "PASSED" if r.passed else "FAILED: " + ", ".join(f["metric"] for f in r.failures)
    fig.suptitle(f"quantkit verify — {Path(r.quantized_path).name} — {status}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_kl(ax: Axes, r: VerifyReport, h: dict) -> None:
    edges, counts = h["edges"], h["counts"]
    if sum(counts):
        ax.stairs(counts, edges, fill=True, alpha=0.6)
        ax.set_xscale("log")
        for value, label, style in ((r.kl_mean, "mean", "-"), (r.kl_p99, "p99", "--"),
                                    (r.thresholds.max_kl, "--max-kl", ":")):
            if value:
                ax.axvline(value, color="k" if label != "--max-kl" else "r", ls=style, lw=1,
                           label=f"{label} {fmt(value, 3)}")
        ax.legend()
    else:
        ax.text(0.5, 0.5, f"KL is exactly 0 at all {h['zeros']} positions", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("KL(base ‖ quantized) per position (nats)")
    ax.set_ylabel("positions")
    ax.set_title(f"Next-token KL divergence ({h['zeros']} positions exactly 0)" if h["zeros"] else
                 "Next-token KL divergence")
    ax.grid(alpha=0.3)


def _plot_layer_errors(ax: Axes, r: VerifyReport) -> None:
    idx = [row["index"] for row in r.layer_errors]
    ax.bar(idx, [row["local_error"] for row in r.layer_errors], color="tab:orange", label="local (this layer)")
    ax.plot(idx, [row["relative_error"] for row in r.layer_errors], "k.-", ms=3, label="accumulated")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("relative error of the layer's output")
    ax.set_title("Where the error comes from")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")


def _plot_layers(ax: Axes, r: VerifyReport) -> None:
    idx = [row["index"] for row in r.layers]
    colors = ["tab:red" if row.get("outlier") else "tab:blue" for row in r.layers]
    ax.bar(idx, [row["total_loss"] for row in r.layers], color=colors)
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("GPTQ loss (sum over the layer's Linears)")
    ax.set_title(f"Per-layer quantization loss (red: > {OUTLIER_FACTOR}x median)")
    ax.grid(alpha=0.3, axis="y")
