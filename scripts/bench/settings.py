#!/usr/bin/env python
"""One run over quantkit's settings on one model: 8/4/3-bit GPTQ (g64, g128, sym/asym, with/without act-order),
RTN at the same settings, and bitsandbytes nf4/int8, each verified against the base on the same evaluation tokens.

Every quantize and every verify is its own subprocess (`quantkit quantize --json` measured by
scripts/bench/measure.py, `quantkit verify --json`), so time and peak RSS are that run's own. Results go to
WORK/results.jsonl as they finish; a rerun skips the rows already there (delete the file to measure again).
--write-docs puts the table into docs/BENCHMARKS.md. All 38 rows take about 2 hours for SmolLM2-135M on 2 CPU
cores (a GPTQ row about 3 minutes, an RTN or bitsandbytes row about one); --only measures a subset.

    python scripts/bench/settings.py [MODEL_DIR] [--samples 16 --seq-len 512 --eval-tokens 4096] [--write-docs]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path

from measure import QUANTKIT, CommandFailed, absolute, quantkit_json, run

ROOT = Path(__file__).resolve().parents[2]
START, END = "<!-- bench_settings:start -->", "<!-- bench_settings:end -->"


def settings(bits_list: list[int]) -> list[dict]:
    rows = [{"method": m} for m in ("bnb-nf4", "bnb-int8")]
    rows += [{"method": "rtn", "bits": b, "group": g, "sym": s}
             for b, g, s in itertools.product(bits_list, (64, 128), (True, False))]
    rows += [{"method": "gptq", "bits": b, "group": g, "sym": s, "act_order": a}
             for b, g, s, a in itertools.product(bits_list, (64, 128), (True, False), (True, False))]
    return rows


def label(row: dict) -> str:
    if row["method"].startswith("bnb"):
        return row["method"]
    parts = [row["method"], f"{row['bits']}bit", f"g{row['group']}", "sym" if row["sym"] else "asym"]
    if row["method"] == "gptq":
        parts.append("actorder" if row["act_order"] else "plain")
    return "-".join(parts)


def quantize_args(row: dict, args) -> list[str]:
    if row["method"].startswith("bnb"):
        return ["--method", row["method"]]
    out = ["--method", row["method"], "--bits", str(row["bits"]), "--group-size", str(row["group"]),
           "--sym" if row["sym"] else "--asym"]
    if row["method"] == "gptq":
        out += ["--act-order" if row["act_order"] else "--no-act-order", "--samples", str(args.samples),
                "--seq-len", str(args.seq_len)]
    return out


def measure(row: dict, model_dir: str, work: Path, args) -> dict:
    out = work / label(row)
    m = run([*QUANTKIT, "quantize", model_dir, "--out", str(out), "--overwrite", "--json", *quantize_args(row, args)],
            work / f"{label(row)}.log").check()
    q = m.report()
    weights = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    # exit 1 = a threshold failed: still a measurement
    v = quantkit_json(["verify", str(out), "--base", model_dir, "--no-generate", "--seq-len", str(args.eval_seq_len),
                       "--max-tokens", str(args.eval_tokens)], ok=(0, 1))
    shutil.rmtree(out, ignore_errors=True)
    return {**row, "label": label(row), "quantize_s": round(q["seconds"], 1), "wall_s": round(m.wall_s, 1),
            "peak_rss_mb": q["peak_rss_mb"], "weights_mib": round(weights / 2**20, 1),
            "base_ppl": v["base"]["ppl"], "ppl": v["quantized"]["ppl"], "ppl_ratio": v["ppl_ratio"],
            "kl_mean": v["kl_mean"], "kl_p99": v["kl_p99"], "top1": v["top1_agreement"], "passed": v["passed"],
            "tokens": v["tokens"]}


def table(results: list[dict]) -> list[str]:
    lines = ["| setting | method | bits | group | sym | act-order | perplexity | ratio | KL mean | KL p99 | top-1 "
             "| verify | weights MiB | quantize s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {"bnb-nf4": 0, "bnb-int8": 1, "rtn": 2, "gptq": 3}
    for r in sorted(results, key=lambda r: (-r.get("bits", 4 if r["method"] == "bnb-nf4" else 8), r.get("group", 0),
                                            not r.get("sym", True), order[r["method"]], not r.get("act_order", False))):
        lines.append(
            f"| {r['label']} | {r['method']} | {r.get('bits', 4 if r['method'] == 'bnb-nf4' else 8)} | "
            f"{r.get('group', 'nf4 block 64' if r['method'] == 'bnb-nf4' else 'row')} | "
            f"{'' if 'sym' not in r else ('yes' if r['sym'] else 'no')} | "
            f"{'' if 'act_order' not in r else ('yes' if r['act_order'] else 'no')} | {r['ppl']:.3f} | "
            f"{r['ppl_ratio']:.3f} | {r['kl_mean']:.3f} | {r['kl_p99']:.2f} | {r['top1']:.3f} | "
            f"{'pass' if r['passed'] else 'fail'} | {r['weights_mib']:.1f} | {r['quantize_s']:.0f} | "
            f"{r['peak_rss_mb']:.0f} |")
    return lines


def gptq_vs_rtn(results: list[dict]) -> tuple[list[str], bool]:
    """At 3 and 4 bits, both GPTQ orders against RTN at the same bits, group and symmetry."""
    rtn = {(r["bits"], r["group"], r["sym"]): r["ppl"] for r in results if r["method"] == "rtn"}
    lines, all_better = [], True
    for r in sorted((r for r in results if r["method"] == "gptq" and r["bits"] in (3, 4)), key=lambda r: r["label"]):
        base = rtn.get((r["bits"], r["group"], r["sym"]))
        if base is None:
            continue
        better = r["ppl"] < base
        all_better &= better
        lines.append(f"{r['label']}: {r['ppl']:.3f} vs RTN {base:.3f} -> {'better' if better else 'NOT better'}")
    return lines, all_better


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", nargs="?", default=str(ROOT / "demo" / "SmolLM2-135M-Instruct"))
    p.add_argument("--bits", default="8,4,3", help="GPTQ and RTN bit widths (comma-separated)")
    p.add_argument("--samples", type=int, default=16, help="GPTQ calibration samples")
    p.add_argument("--seq-len", type=int, default=512, help="GPTQ calibration tokens per sample")
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--only", default=None, help="regular expression: measure only matching setting labels")
    p.add_argument("--work", default=str(Path.home() / ".cache" / "quantkit" / "bench-settings"))
    p.add_argument("--write-docs", action="store_true", help="write the table into docs/BENCHMARKS.md")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    args.model_dir = absolute(args.model_dir)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results_file = work / "results.jsonl"
    key = {"model": str(Path(args.model_dir).resolve()), "samples": args.samples, "seq_len": args.seq_len,
           "eval_tokens": args.eval_tokens, "eval_seq_len": args.eval_seq_len}
    done = {}
    if results_file.is_file():
        for line in results_file.read_text().splitlines():
            r = json.loads(line)
            if r.get("key") == key:
                done[r["label"]] = r
    rows = [r for r in settings([int(b) for b in args.bits.split(",")])
            if args.only is None or re.search(args.only, label(r))]
    t_start = time.perf_counter()
    measured = 0
    for n, row in enumerate(rows, 1):
        name = label(row)
        if name in done:
            continue
        try:
            result = {**measure(row, args.model_dir, work, args), "key": key}
        except CommandFailed as e:
            print(f"[{n}/{len(rows)}] {name}: FAILED {e}", flush=True)
            continue
        done[name] = result
        measured += 1
        with open(results_file, "a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"[{n}/{len(rows)}] {name}: ppl {result['ppl']:.3f} (ratio {result['ppl_ratio']:.3f}), "
              f"KL {result['kl_mean']:.3f}, top-1 {result['top1']:.3f}, {result['weights_mib']:.0f} MiB, "
              f"{result['quantize_s']:.0f} s", flush=True)
    results = [done[label(r)] for r in rows if label(r) in done]
    if not results:
        sys.exit("nothing measured")
    lines, all_better = gptq_vs_rtn(results)
    header = (f"{Path(args.model_dir).name}, base perplexity {results[0]['base_ppl']:.3f} on {results[0]['tokens']} "
              f"predicted tokens of pydocs-eval ({args.eval_seq_len}-token windows); GPTQ calibrated on "
              f"{args.samples} x {args.seq_len} tokens of pydocs-calib; {os.cpu_count()} CPU cores "
              f"({platform.processor() or platform.machine()}); {len(results)} rows, {measured} measured by this "
              f"invocation in {(time.perf_counter() - t_start) / 60:.0f} min (the rest read from results.jsonl).")
    print("\n" + header + "\n")
    print("\n".join(table(results)))
    print("\nGPTQ against RTN at 3 and 4 bits:\n" + "\n".join(lines))
    verdict = "n/a (no GPTQ/RTN pairs measured)" if not lines else ("yes" if all_better else "NO")
    print(f"verdict: GPTQ beats RTN at every 3/4-bit setting: {verdict}")
    if args.write_docs:
        block = "\n".join([START, "", "Command: `python scripts/bench/settings.py --write-docs` (defaults: "
                           f"--samples {args.samples} --seq-len {args.seq_len} --eval-tokens {args.eval_tokens}).", "",
                           header, "", *table(results), "",
                           f"GPTQ beats RTN at every 3- and 4-bit setting: **{verdict}**.", "",
                           *[f"- {line}" for line in lines], "", END])
        doc = ROOT / "docs" / "BENCHMARKS.md"
        text = doc.read_text()
        if START in text:
            text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
        else:
            text += "\n## Every setting on the demo model (scripts/bench/settings.py)\n\n" + block + "\n"
        doc.write_text(text)
        print(f"wrote {doc}")


if __name__ == "__main__":
    main()
