#!/usr/bin/env python
"""quantkit against llm-compressor and GPTQModel on the CPU, side by side, on the same checkpoint and the same tokens.

Run through `scripts/bench/peers.sh`, which prepares each tool's own virtual environment. Every tool quantizes
the same calibration windows (written once to a safetensors file) in its own process, measured by
scripts/bench/measure.py (wall clock and peak RSS of the whole command, imports included). The tools alternate
order between rounds. Each output's perplexity is then computed by scripts/bench/peer_runners/perplexity.py in the
tool's own environment, loading the checkpoint through transformers as its users would, on the same evaluation
windows. Takes about 15 minutes a round for SmolLM2-135M on 2 CPU cores (quantkit about 2, each peer about 5),
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
from pathlib import Path

from measure import QUANTKIT, bench_env, last_json, run

ROOT = Path(__file__).resolve().parents[2]
RUNNERS = Path(__file__).resolve().parent / "peer_runners"
MARK_START, MARK_END = "<!-- bench_peers:start -->", "<!-- bench_peers:end -->"


def perplexity(python: str, model_dir: Path, eval_file: Path, env: dict) -> float:
    proc = subprocess.run([python, str(RUNNERS / "perplexity.py"), str(model_dir), str(eval_file)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"perplexity of {model_dir} failed:\n{proc.stderr[-3000:]}")
    return last_json(proc.stdout.splitlines())["ppl"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="unquantized checkpoint directory")
    ap.add_argument("--llmcompressor-python", required=True)
    ap.add_argument("--gptqmodel-python", required=True)
    ap.add_argument("--tools", default="quantkit,llmcompressor,gptqmodel")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--work", type=Path, help="where outputs go (default: a temporary directory)")
    ap.add_argument("--write-docs", action="store_true", help="replace the bench_peers section of docs/BENCHMARKS.md")
    ap.add_argument("--reuse", action="store_true",
                    help="with --work: keep runs already finished there (same tokens), run only the missing ones")
    args = ap.parse_args()
    args.model = args.model.resolve()  # the tools run inside the work directory

    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from quantkit.config import CalibSpec
    from quantkit.source.calibration import calibration_batch, evaluation_windows

    work = (args.work or Path(tempfile.mkdtemp(prefix="quantkit-bench-peers-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    calib = calibration_batch(tokenizer, CalibSpec(samples=args.samples, seq_len=args.seq_len))
    windows = evaluation_windows(tokenizer, "pydocs-eval", args.seq_len, args.eval_tokens)
    save_file({"input_ids": calib.contiguous()}, str(work / "calib.safetensors"))
    save_file({"input_ids": windows.contiguous()}, str(work / "eval.safetensors"))
    env = bench_env(GPTQMODEL_CPU_WORKERS=os.environ.get("GPTQMODEL_CPU_WORKERS", "2"))
    q = ["--bits", str(args.bits), "--group-size", str(args.group_size)]
    commands = {
        # quantkit tokenizes the built-in calibration set itself, with the same function and seed as above
        "quantkit": lambda out: [*QUANTKIT, "quantize", str(args.model), "--out", str(out), "--overwrite", "--json",
                                 "--samples", str(args.samples), "--seq-len", str(args.seq_len), *q],
        "llmcompressor": lambda out: [args.llmcompressor_python, str(RUNNERS / "llmcompressor_gptq.py"),
                                      str(args.model), str(work / "calib.safetensors"), str(out), *q],
        "gptqmodel": lambda out: [args.gptqmodel_python, str(RUNNERS / "gptqmodel_gptq.py"), str(args.model),
                                  str(work / "calib.safetensors"), str(out), *q],
    }
    pythons = {"quantkit": sys.executable, "llmcompressor": args.llmcompressor_python,
               "gptqmodel": args.gptqmodel_python}
    tools = args.tools.split(",")
    runs: dict[str, list[tuple[float, float]]] = {t: [] for t in tools}
    for r in range(args.rounds):
        order = tools[r % len(tools):] + tools[:r % len(tools)]  # alternate who goes first
        for tool in order:
            out = work / f"{tool}-r{r}"
            timefile = work / f"{tool}-r{r}.time"
            if args.reuse and timefile.is_file() and (out / "config.json").is_file():
                wall, rss_kb = timefile.read_text().split()[-2:]
                runs[tool].append((float(wall), int(rss_kb) / 1024))
                print(f"round {r + 1}: {tool:14s} {float(wall):8.1f} s  {int(rss_kb) / 1024:7.0f} MB  (reused)")
                continue
            m = run(commands[tool](out), work / f"{tool}-r{r}.log", env).check()
            wall, rss = m.wall_s, m.peak_rss_mb
            timefile.write_text(f"{wall:.2f} {round(rss * 1024)}\n")  # seconds and KB, read back by --reuse
            runs[tool].append((wall, rss))
            print(f"round {r + 1}: {tool:14s} {wall:8.1f} s  {rss:7.0f} MB", flush=True)

    base_ppl = perplexity(sys.executable, args.model, work / "eval.safetensors", env)
    rows = []
    for tool in tools:
        ppl = perplexity(pythons[tool], work / f"{tool}-r0", work / "eval.safetensors", env)
        rows.append({"tool": tool, "wall_s": statistics.median(w for w, _ in runs[tool]),
                     "peak_rss_mb": max(m for _, m in runs[tool]), "ppl": ppl})
    versions = {t: subprocess.run([pythons[t], "-c", f"import importlib.metadata as m; print(m.version('{t}'))"],
                                  capture_output=True, text=True).stdout.strip() for t in tools}
    table = render(rows, base_ppl, versions, args, windows.numel())
    print(table)
    if args.write_docs:
        doc = ROOT / "docs" / "BENCHMARKS.md"
        text = doc.read_text()
        section = f"{MARK_START}\n{table}\n{MARK_END}"
        text = re.sub(re.escape(MARK_START) + ".*?" + re.escape(MARK_END), lambda _: section, text, flags=re.S) \
            if MARK_START in text else text.rstrip() + "\n\n" + section + "\n"
        doc.write_text(text)
        print(f"wrote {doc}")


def render(rows: list[dict], base_ppl: float, versions: dict, args, eval_tokens: int) -> str:
    by = {r["tool"]: r for r in rows}
    lines = [f"Measured {time.strftime('%Y-%m-%d')}, one run of `scripts/bench/peers.sh` ({args.rounds} round(s), "
             f"tools alternating), {args.bits}-bit, group {args.group_size}, symmetric, {args.samples} x "
             f"{args.seq_len} calibration tokens (the same windows for every tool), perplexity on {eval_tokens} "
             f"`pydocs-eval` tokens loaded through transformers; unquantized perplexity {base_ppl:.3f}.", "",
             "| tool | version | wall s | peak RSS MB | perplexity | vs unquantized |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tool']} | {versions.get(r['tool'], '?')} | {r['wall_s']:.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['ppl']:.3f} | {r['ppl'] / base_ppl:.3f} |")
    if "quantkit" in by:
        q, peers = by["quantkit"], [r for r in rows if r["tool"] != "quantkit"]
        lines += ["", "| quantkit / peer | wall time | peak RSS | perplexity |", "|---|---|---|---|"]
        for r in peers:
            lines.append(f"| {r['tool']} | {q['wall_s'] / r['wall_s']:.2f} | "
                         f"{q['peak_rss_mb'] / r['peak_rss_mb']:.2f} | {q['ppl'] / r['ppl']:.3f} |")
        lines += targets(q, peers)
    return "\n".join(lines)


def targets(q: dict, peers: list[dict]) -> list[str]:
    """The Performance issue's bar, each measure against the best peer on it: wall time at most 0.5x the faster
    peer's, peak RSS at most 0.5x the leaner peer's, perplexity no worse than the better peer's."""
    if not peers:
        return []
    lines = ["", "Against the best peer on each measure (the Performance issue's bar):", ""]
    for key, shown, bound, what in (("wall_s", "{:.0f} s", 0.5, "wall time"),
                                    ("peak_rss_mb", "{:.0f} MB", 0.5, "peak RSS"),
                                    ("ppl", "{:.3f}", 1.0, "perplexity")):
        best = min(peers, key=lambda r: r[key])
        ratio = q[key] / best[key]
        lines.append(f"- {what}: {shown.format(q[key])} against {best['tool']}'s {shown.format(best[key])}, "
                     f"{ratio:.2f}x (target at most {bound:g}x): {'met' if ratio <= bound else '**not met**'}")
    return lines


if __name__ == "__main__":
    main()
