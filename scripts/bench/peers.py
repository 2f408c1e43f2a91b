#!/usr/bin/env python
"""quantkit against llm-compressor and GPTQModel on the CPU, side by side, on the same checkpoint and the same tokens.

Run through `scripts/bench/peers.sh`, which prepares each tool's own virtual environment. Every tool quantizes
the same calibration windows (written once to a safetensors file) in its own process, measured by
scripts/bench/measure.py (wall clock and peak RSS of the whole command, imports included). The tools alternate
order between rounds. Each output's perplexity is then computed by scripts/bench/peer_runners/perplexity.py in the
tool's own environment, loading the checkpoint through transformers as its users would, on the same evaluation
windows.

Two setups (--setup demo,user runs both, one after the other, each with its own table):
- demo: the float32 checkpoint `quantkit import-gguf` makes, quantkit calibrating on its built-in set;
- user: what a new user does: a bfloat16 checkpoint made by transformers' own GGUF loader from the same file, a
  plain-text calibration file (--calib-text, else one written from Python's reference prose and the built-in
  docstrings), and quantkit's command as typed (`--calib FILE.txt --repo-id NS/NAME --json`, published into a
  hub cache in the work directory), with no tokenizer setting in the environment.
Takes about 15 minutes a round and setup for SmolLM2-135M on 2 CPU cores (quantkit about 2, each peer about 5),
plus the peers' installs on the first run.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from measure import QUANTKIT, bench_env, last_json, quantkit_json, run

ROOT = Path(__file__).resolve().parents[2]
RUNNERS = Path(__file__).resolve().parent / "peer_runners"


def perplexity(python: str, model_dir: Path, eval_file: Path, env: dict) -> float:
    proc = subprocess.run([python, str(RUNNERS / "perplexity.py"), str(model_dir), str(eval_file)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"perplexity of {model_dir} failed:\n{proc.stderr[-3000:]}")
    return last_json(proc.stdout.splitlines())["ppl"]


MARKS = {"demo": ("<!-- bench_peers:start -->", "<!-- bench_peers:end -->"),
         "user": ("<!-- bench_peers_user:start -->", "<!-- bench_peers_user:end -->")}
SETUP_TEXT = {
    "demo": "the float32 checkpoint `quantkit import-gguf` makes, calibration windows from the built-in "
            "`pydocs-calib` set",
    "user": "a bfloat16 checkpoint made by transformers' GGUF loader, calibration windows from the plain-text file "
            "{calib} (quantkit: `--calib FILE.txt --repo-id NS/NAME --json`, publishing into a hub cache)",
}


@dataclass
class Setup:
    """One benchmark setup: the checkpoint every tool quantizes, quantkit's calibration option, the environment."""
    name: str
    model: Path
    calib: list[str]  # quantkit's calibration options
    calib_source: str  # the CalibSpec source the shared windows are cut from
    env: dict[str, str]


def user_base(gguf: Path, out: Path) -> Path:
    """A bfloat16 checkpoint of `gguf` made as a transformers user makes one: its GGUF loader, dequantized, saved."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16,
                                                 quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True))
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(out))
    return out


def user_text(out: Path) -> Path:
    """A plain-text calibration file of English prose and docstrings: Python's language reference topics (from the
    standard library's pydoc_data) followed by the built-in calibration docstrings."""
    import pydoc_data.topics

    from quantkit.config import DEFAULT_CALIB
    from quantkit.source.calibration import load_documents

    out.write_text("\n\n".join([*pydoc_data.topics.topics.values(), *load_documents(DEFAULT_CALIB)]))
    return out


def setups(args: argparse.Namespace, work: Path) -> list[Setup]:
    out = []
    for name in args.setup.split(","):
        if name == "demo":
            out.append(Setup("demo", args.model, [], "pydocs-calib", bench_env()))
        elif name == "user":
            if args.gguf is None:
                sys.exit("--setup user needs --gguf FILE (the GGUF the bfloat16 checkpoint is made from)")
            text = args.calib_text.resolve() if args.calib_text else user_text(work / "calib.txt")
            env = {k: v for k, v in bench_env(HF_HUB_CACHE=str(work / "hub")).items() if k != "TOKENIZERS_PARALLELISM"}
            out.append(Setup("user", user_base(args.gguf.resolve(), work / "base-bf16"), ["--calib", str(text)],
                             str(text), env))
        else:
            sys.exit(f"unknown setup {name!r}: use demo, user or both (demo,user)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="unquantized checkpoint directory (the demo setup's)")
    ap.add_argument("--llmcompressor-python", required=True)
    ap.add_argument("--gptqmodel-python", required=True)
    ap.add_argument("--setup", default="demo", help="demo, user, or demo,user (see above)")
    ap.add_argument("--gguf", type=Path, help="the GGUF the user setup's bfloat16 checkpoint is made from")
    ap.add_argument("--calib-text", type=Path, help="the user setup's calibration text file (default: one written "
                                                     "from Python's reference prose and the built-in docstrings)")
    ap.add_argument("--tools", default="quantkit,llmcompressor,gptqmodel")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--work", type=Path, help="where outputs go (default: a temporary directory)")
    ap.add_argument("--write-docs", action="store_true",
                    help="replace each setup's section of docs/BENCHMARKS.md")
    ap.add_argument("--reuse", action="store_true",
                    help="with --work: keep runs already finished there (same tokens), run only the missing ones")
    args = ap.parse_args()
    args.model = args.model.resolve()  # the tools run inside the work directory
    work = (args.work or Path(tempfile.mkdtemp(prefix="quantkit-bench-peers-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    for setup in setups(args, work):
        bench_setup(args, setup, work / setup.name)


def bench_setup(args: argparse.Namespace, setup: Setup, work: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from quantkit.config import CalibSpec
    from quantkit.source.calibration import calibration_batch, evaluation_windows

    work.mkdir(parents=True, exist_ok=True)
    print(f"setup {setup.name}: {setup.model}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(setup.model))
    calib = calibration_batch(tokenizer, CalibSpec(source=setup.calib_source, samples=args.samples,
                                                   seq_len=args.seq_len))
    windows = evaluation_windows(tokenizer, "pydocs-eval", args.seq_len, args.eval_tokens)
    save_file({"input_ids": calib.contiguous()}, str(work / "calib.safetensors"))
    save_file({"input_ids": windows.contiguous()}, str(work / "eval.safetensors"))
    env = {**setup.env, "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2")}
    q = ["--bits", str(args.bits), "--group-size", str(args.group_size)]

    def quantkit(out: Path) -> list[str]:
        # quantkit tokenizes the calibration set itself, with the same function and seed as above
        where = ["--repo-id", f"bench/{out.name}"] if setup.name == "user" else ["--out", str(out)]
        return [*QUANTKIT, "quantize", str(setup.model), *q, "--sym", "--samples", str(args.samples),
                "--seq-len", str(args.seq_len), *setup.calib, *where, "--overwrite", "--json"]

    commands = {
        "quantkit": quantkit,
        "llmcompressor": lambda out: [args.llmcompressor_python, str(RUNNERS / "llmcompressor_gptq.py"),
                                      str(setup.model), str(work / "calib.safetensors"), str(out), *q],
        "gptqmodel": lambda out: [args.gptqmodel_python, str(RUNNERS / "gptqmodel_gptq.py"), str(setup.model),
                                  str(work / "calib.safetensors"), str(out), *q],
    }
    pythons = {"quantkit": sys.executable, "llmcompressor": args.llmcompressor_python,
               "gptqmodel": args.gptqmodel_python}
    tools = args.tools.split(",")
    runs: dict[str, list[tuple[float, float]]] = {t: [] for t in tools}
    outputs: dict[str, Path] = {}
    for r in range(args.rounds):
        order = tools[r % len(tools):] + tools[:r % len(tools)]  # alternate who goes first
        for tool in order:
            out = work / f"{tool}-r{r}"
            timefile = work / f"{tool}-r{r}.time"
            if args.reuse and timefile.is_file():
                wall, rss_kb, where = timefile.read_text().split()[-3:]
                if (Path(where) / "config.json").is_file():
                    runs[tool].append((float(wall), int(rss_kb) / 1024))
                    outputs.setdefault(tool, Path(where))
                    print(f"round {r + 1}: {tool:14s} {float(wall):8.1f} s  {int(rss_kb) / 1024:7.0f} MB  (reused)")
                    continue
            m = run(commands[tool](out), work / f"{tool}-r{r}.log", env).check()
            wall, rss = m.wall_s, m.peak_rss_mb
            where = Path(m.report().get("path", out)) if tool == "quantkit" else out  # a published snapshot
            timefile.write_text(f"{wall:.2f} {round(rss * 1024)} {where}\n")  # read back by --reuse
            runs[tool].append((wall, rss))
            outputs.setdefault(tool, where)
            print(f"round {r + 1}: {tool:14s} {wall:8.1f} s  {rss:7.0f} MB", flush=True)

    base_ppl = perplexity(sys.executable, setup.model, work / "eval.safetensors", env)
    rows = []
    for tool in tools:
        ppl = perplexity(pythons[tool], outputs[tool], work / "eval.safetensors", env)
        # a second view of quality: KL divergence from the base and top-1 agreement (quantkit verify, which reads
        # every tool's GPTQ checkpoint; exit 1 only means its default thresholds were not all met)
        kl = quantkit_json(["verify", str(outputs[tool]), "--base", str(setup.model), "--no-generate"], env,
                           ok=(0, 1))
        rows.append({"tool": tool, "wall_s": statistics.median(w for w, _ in runs[tool]),
                     "peak_rss_mb": max(m for _, m in runs[tool]), "ppl": ppl, "kl": kl["kl_mean"],
                     "top1": kl["top1_agreement"]})
    versions = {t: subprocess.run([pythons[t], "-c", f"import importlib.metadata as m; print(m.version('{t}'))"],
                                  capture_output=True, text=True).stdout.strip() for t in tools}
    what = SETUP_TEXT[setup.name].format(calib=f"`{Path(setup.calib_source).name}`")
    table = render(rows, base_ppl, versions, args, windows.numel(), setup.name, what)
    if "quantkit" in tools:
        table += "\n\n" + time_split(work / "quantkit-r0.log", runs["quantkit"][0][0])
    print(table)
    if args.write_docs:
        start, end = MARKS[setup.name]
        doc = ROOT / "docs" / "BENCHMARKS.md"
        text = doc.read_text()
        section = f"{start}\n{table}\n{end}"
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: section, text, flags=re.S) \
            if start in text else text.rstrip() + "\n\n" + section + "\n"
        doc.write_text(text)
        print(f"wrote {doc}")


def render(rows: list[dict], base_ppl: float, versions: dict, args: argparse.Namespace, eval_tokens: int,
           setup: str, what: str) -> str:
    by = {r["tool"]: r for r in rows}
    lines = [f"Measured {time.strftime('%Y-%m-%d')}, one run of `scripts/bench/peers.sh --setup {args.setup}`, setup "
             f"**{setup}** ({what}); {args.rounds} round(s), "
             f"tools alternating, {args.bits}-bit, group {args.group_size}, symmetric, {args.samples} x "
             f"{args.seq_len} calibration tokens (the same windows for every tool), perplexity on {eval_tokens} "
             f"`pydocs-eval` tokens loaded through transformers; unquantized perplexity {base_ppl:.3f}. KL and top-1: "
             "`quantkit verify OUTPUT --base BASE --no-generate` (its own `pydocs-eval` windows).", "",
             "| tool | version | wall s | peak RSS MB | perplexity | vs unquantized | KL mean | top-1 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tool']} | {versions.get(r['tool'], '?')} | {r['wall_s']:.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['ppl']:.3f} | {r['ppl'] / base_ppl:.3f} | {r['kl']:.4f} | {r['top1']:.3f} |")
    if "quantkit" in by:
        q, peers = by["quantkit"], [r for r in rows if r["tool"] != "quantkit"]
        lines += ["", "| quantkit / peer | wall time | peak RSS | perplexity | KL mean |", "|---|---|---|---|---|"]
        for r in peers:
            lines.append(f"| {r['tool']} | {q['wall_s'] / r['wall_s']:.2f} | "
                         f"{q['peak_rss_mb'] / r['peak_rss_mb']:.2f} | {q['ppl'] / r['ppl']:.3f} | "
                         f"{q['kl'] / r['kl']:.2f} |")
        lines += targets(q, peers)
    return "\n".join(lines)


def time_split(log: Path, wall: float) -> str:
    """quantkit's wall time (round 1), phase by phase from its --json report; the layers' by their stages."""
    report = last_json(log.read_text(errors="replace").splitlines()) or {}
    phases, layers = report.get("phase_seconds", {}), report.get("layers", [])
    stages: dict[str, float] = {}
    for layer in layers:
        for k, v in layer.get("stage_seconds", {}).items():
            stages[k] = stages.get(k, 0.0) + v
    rows = [("start-up: imports, command line", wall - report.get("seconds", wall)),
            *((f"{name}" + (f" ({len(layers)} steps)" if name == "layers" else ""), sec)
              for name, sec in phases.items())]
    lines = ["Where quantkit's wall time went (round 1; phases from its `--json` report's `phase_seconds`, the "
             "layers' stages summed from `layers[].stage_seconds`):", "", "| phase | s | share |", "|---|---:|---:|"]
    lines += [f"| {name} | {sec:.1f} | {100 * sec / wall:.0f}% |" for name, sec in rows]
    if "layers" in phases:  # what the stages do not count: each step's save, and the steps' bookkeeping
        stages["saving and the rest"] = phases["layers"] - sum(stages.values())
    lines += [f"| &nbsp;&nbsp;layers: {k} | {v:.1f} | {100 * v / wall:.0f}% |" for k, v in stages.items()]
    lines.append(f"| **whole command** | **{wall:.1f}** | |")
    return "\n".join(lines)


def targets(q: dict, peers: list[dict]) -> list[str]:
    """The Performance issue's bar, each measure against the best peer on it: wall time at most 0.5x the faster
    peer's, peak RSS at most 0.5x the leaner peer's, perplexity no worse than the better peer's."""
    if not peers:
        return []
    lines = ["", "Against the best peer on each measure (the Performance issue's bar):", ""]
    measures = [m for m in (("wall_s", "{:.0f} s", 0.5, "wall time"),
                            ("peak_rss_mb", "{:.0f} MB", 0.5, "peak RSS"),
                            ("ppl", "{:.3f}", 1.0, "perplexity"),
                            ("kl", "{:.4f}", 1.0, "KL mean from the base (a second view of quality)"))
                if m[0] in q]  # KL only where it was measured
    for key, shown, bound, what in measures:
        best = min(peers, key=lambda r: r[key])
        ratio = q[key] / best[key]
        lines.append(f"- {what}: {shown.format(q[key])} against {best['tool']}'s {shown.format(best[key])}, "
                     f"{ratio:.2f}x (target at most {bound:g}x): {'met' if ratio <= bound else '**not met**'}")
    return lines


if __name__ == "__main__":
    main()
