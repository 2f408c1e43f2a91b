#!/usr/bin/env python
"""quantkit's GGUF files against llama.cpp's own, side by side in one run, judged by llama.cpp on held-out text.

llama.cpp's side, with the tools `scripts/build-llama-cpp` builds: the base model to an f16 GGUF with the vendored
convert_hf_to_gguf.py; an importance matrix by `llama-imatrix` on the text quantkit calibrates on (the same
SAMPLES windows of SEQ_LEN tokens, decoded, given to llama-imatrix with the same context and number of chunks);
`llama-quantize --imatrix` to each type. quantkit's side: `quantkit quantize BASE --format gguf --gguf-type TYPE`
with the same calibration settings. Every file, the f16 one included, is then scored by `llama-perplexity
--kl-divergence` against the f16 file's logits on `pydocs-eval` (llama.cpp scores the second half of each chunk):
mean KL divergence, how often the top token agrees with f16's, perplexity; and loaded by `llama-simple`, which
greedily generates a few tokens. Each command runs in its own process (scripts/bench/measure.py: wall clock and
peak RSS); their logs, the texts, results.md and results.json go to WORK. About 10 minutes for SmolLM2-135M on 2
CPU cores with the defaults, llama.cpp side alone, plus quantkit's quantize commands.

    python scripts/bench/gguf_vs_llamacpp.py --base /tmp/g27/demo --work /tmp/gg [--types Q4_K_M,Q4_0,Q8_0]
        [--llama-bin DIR] [--eval-ctx 512 --eval-chunks 32] [--samples 128 --seq-len 512] [--skip-quantkit]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from measure import QUANTKIT, CommandFailed, Measured, bench_env, run

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "scripts" / "build-llama-cpp"
DEFAULT_TYPES = "Q4_K_M,Q4_0,Q8_0"
GEN_PROMPT = "The Python function sorted() returns"
GEN_TOKENS = 24
MIB = 2**20
PAD_TOKENS = 64  # calibration text beyond SAMPLES x SEQ_LEN: re-tokenizing decoded windows can merge at the seams

# llama-perplexity --kl-divergence prints its summary as "Name : value ± error" lines (UTF-8 "±"; "Same top p"
# and the Δp lines are percentages followed by " %").
NUM = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|nan|-?inf)"
KLD_FIELDS = {
    "ppl_q": rf"^Mean PPL\(Q\)\s*:\s*{NUM}\s*±\s*{NUM}",
    "ppl_base": rf"^Mean PPL\(base\)\s*:\s*{NUM}\s*±\s*{NUM}",
    "ppl_ratio": rf"^Mean PPL\(Q\)/PPL\(base\)\s*:\s*{NUM}\s*±\s*{NUM}",
    "mean_kld": rf"^Mean\s+KLD:\s*{NUM}\s*±\s*{NUM}",
    "same_top_p": rf"^Same top p:\s*{NUM}\s*±\s*{NUM}\s*%",
}


def parse_kld(text: str) -> dict[str, float]:
    """The summary of one `llama-perplexity --kl-divergence` log: each field and its error (`FIELD_err`);
    same_top_p in percent. Raises ValueError naming the fields it could not find."""
    out: dict[str, float] = {}
    for name, pattern in KLD_FIELDS.items():
        m = re.search(pattern, text, re.MULTILINE)
        if m:
            out[name], out[f"{name}_err"] = float(m.group(1)), float(m.group(2))
    missing = [n for n in KLD_FIELDS if n not in out]
    if missing:
        raise ValueError(f"no {', '.join(missing)} in the llama-perplexity output")
    return out


def parse_chunks(text: str) -> int | None:
    """How many chunks llama-imatrix or llama-perplexity computed over ('computing over N chunks' or
    'calculating perplexity over N chunks'), or None."""
    m = re.search(r"(?:computing|calculating perplexity) over (\d+) chunks", text)
    return int(m.group(1)) if m else None


def parse_final_ppl(text: str) -> float | None:
    """The perplexity of a plain `llama-perplexity` run ('Final estimate: PPL = x +/- e'), or None."""
    m = re.search(rf"Final estimate: PPL = {NUM}", text)
    return float(m.group(1)) if m else None


def parse_decoded(stderr: str) -> int | None:
    """How many tokens llama-simple generated ('main: decoded N tokens in ...'), or None."""
    m = re.search(r"decoded (\d+) tokens", stderr)
    return int(m.group(1)) if m else None


@dataclass
class Row:
    type: str
    tool: str
    file: str
    size_bytes: int = 0
    quantize_s: float | None = None  # the command that wrote this file
    from_hf_s: float | None = None  # HF directory to this file (llama.cpp: convert + imatrix + quantize)
    peak_rss_mb: float | None = None
    kld: dict[str, float] = field(default_factory=dict)
    generates: bool = False
    generated: str = ""


def llama_bin(arg: str | None) -> Path:
    """The tools' folder: --llama-bin, else the last line `scripts/build-llama-cpp` prints (building if needed)."""
    if arg:
        return Path(arg).resolve()
    proc = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise CommandFailed(f"{BUILD_SCRIPT} failed ({proc.returncode})")
    return Path(proc.stdout.strip().splitlines()[-1])


def staged_base(base: Path, work: Path) -> Path:
    """A folder of links to base's files for the converter, whose config.json names the architecture: the
    converter picks its model class from config["architectures"], which quantkit import-gguf does not write."""
    config = json.loads((base / "config.json").read_text())
    if config.get("architectures"):
        return base
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise CommandFailed(f"{base / 'config.json'}: no 'architectures' and no causal-LM class for model_type "
                            f"{model_type!r}")
    staged = work / "hf" / base.name
    staged.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        link = staged / f.name
        if f.name != "config.json" and not link.exists():
            link.symlink_to(f.resolve())
    config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
    (staged / "config.json").write_text(json.dumps(config, indent=2))
    return staged


def write_texts(base: Path, work: Path, args: argparse.Namespace) -> dict[str, object]:
    """calib.txt: quantkit's calibration windows (SAMPLES x SEQ_LEN of --calib, chosen with --seed, as `quantkit
    quantize` chooses them) decoded and joined, then PAD_TOKENS of the text that follows the last window;
    eval.txt: the documents of pydocs-eval joined as quantkit joins them."""
    from quantkit.config import DEFAULT_EVAL, CalibSpec
    from quantkit.run.first_inputs import load_tokenizer
    from quantkit.source.calibration import calibration_batch, load_documents, text_budget, token_stream

    tok = load_tokenizer(base)
    spec = CalibSpec(source=args.calib, samples=args.samples, seq_len=args.seq_len, seed=args.seed)
    windows = calibration_batch(tok, spec)
    stream = token_stream(tok, load_documents(spec.source, text_budget(spec.tokens_needed)))
    last = windows[-1]
    ends = [i + spec.seq_len for i in range(0, stream.numel() - spec.seq_len + 1, spec.seq_len)
            if bool((stream[i:i + spec.seq_len] == last).all())]
    tail = stream[ends[-1]:ends[-1] + PAD_TOKENS] if ends else stream[:PAD_TOKENS]
    text = "".join(tok.decode(w, clean_up_tokenization_spaces=False) for w in windows.tolist())
    text += tok.decode(tail.tolist(), clean_up_tokenization_spaces=False)
    (work / "calib.txt").write_text(text, encoding="utf-8")
    eval_docs = load_documents(DEFAULT_EVAL)
    (work / "eval.txt").write_text("\n\n".join(d for d in eval_docs if d.strip()), encoding="utf-8")
    retok = len(tok(text, add_special_tokens=False)["input_ids"])
    return {"calib_windows": list(windows.shape), "calib_text_tokens": retok, "calib_chars": len(text)}


def measured(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Measured:
    print("$", shlex.join(cmd), flush=True)
    return run(cmd, log, env=env).check()


def llama_side(args: argparse.Namespace, bin_dir: Path, work: Path, logs: Path, info: dict) -> list[Row]:
    """Convert, imatrix, quantize each type: the f16 row and one row per type."""
    src = bin_dir.parent.parent
    env = bench_env(PYTHONPATH=os.pathsep.join([str(src / "gguf-py"), str(src / "convert-deps")]))
    f16 = work / "f16.gguf"
    hf = staged_base(Path(args.base).resolve(), work)
    conv = measured([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf), "--outtype", "f16",
                     "--outfile", str(f16)], logs / "convert.log", env=env)
    imatrix = work / "imatrix.gguf"
    imx = measured([str(bin_dir / "llama-imatrix"), "-m", str(f16), "-f", str(work / "calib.txt"),
                    "-c", str(args.seq_len), "--chunks", str(args.samples), "-o", str(imatrix),
                    "-t", str(args.threads), "--no-ppl"], logs / "imatrix.log")
    info["imatrix_chunks"] = parse_chunks(imx.log.read_text(errors="replace"))
    if info["imatrix_chunks"] != args.samples:
        raise CommandFailed(f"llama-imatrix computed over {info['imatrix_chunks']} chunks, not {args.samples}: "
                            f"see {imx.log}")
    info.update(convert_s=round(conv.wall_s, 2), imatrix_s=round(imx.wall_s, 2))
    rows = [Row("F16", "llama.cpp", str(f16), f16.stat().st_size, conv.wall_s, conv.wall_s, conv.peak_rss_mb)]
    for t in args.types:
        out = work / f"llamacpp-{t}.gguf"
        q = measured([str(bin_dir / "llama-quantize"), "--imatrix", str(imatrix), str(f16), str(out), t,
                      str(args.threads)], logs / f"quantize-llamacpp-{t}.log")
        rows.append(Row(t, "llama.cpp", str(out), out.stat().st_size, q.wall_s,
                        conv.wall_s + imx.wall_s + q.wall_s, q.peak_rss_mb))
    return rows


def quantkit_side(args: argparse.Namespace, work: Path, logs: Path) -> list[Row]:
    """`quantkit quantize --format gguf` per type, with the calibration llama-imatrix saw."""
    helptext = subprocess.run([*QUANTKIT, "quantize", "--help"], env=bench_env(), capture_output=True,
                              text=True).stdout
    if "--gguf-type" not in helptext:
        raise CommandFailed("this quantkit has no `quantize --format gguf --gguf-type`; run with --skip-quantkit")
    rows = []
    for t in args.types:
        out = work / f"quantkit-{t}.gguf"
        q = measured([*QUANTKIT, "quantize", str(Path(args.base).resolve()), "--format", "gguf", "--gguf-type", t,
                      "--out", str(out), "--overwrite", "--calib", args.calib, "--samples", str(args.samples),
                      "--seq-len", str(args.seq_len), "--seed", str(args.seed)], logs / f"quantize-quantkit-{t}.log")
        rows.append(Row(t, "quantkit", str(out), out.stat().st_size, q.wall_s, q.wall_s, q.peak_rss_mb))
    return rows


def judge(rows: list[Row], args: argparse.Namespace, bin_dir: Path, work: Path, logs: Path, info: dict) -> None:
    """f16's logits once, then every file's KL divergence against them and a short generation."""
    base_logits = work / "kld-base.bin"
    ppl = [str(bin_dir / "llama-perplexity"), "-c", str(args.eval_ctx), "-t", str(args.threads)]
    b = measured([*ppl, "-m", rows[0].file, "-f", str(work / "eval.txt"), "--chunks", str(args.eval_chunks),
                  "--kl-divergence-base", str(base_logits)], logs / "perplexity-f16-base.log")
    text = b.log.read_text(errors="replace")
    info.update(eval_chunks=parse_chunks(text), f16_ppl=parse_final_ppl(text), kld_base_s=round(b.wall_s, 2))
    for r in rows:
        name = Path(r.file).stem
        k = measured([*ppl, "-m", r.file, "--kl-divergence-base", str(base_logits), "--kl-divergence"],
                     logs / f"kld-{name}.log")
        r.kld = parse_kld(k.log.read_text(errors="replace"))
        cmd = [str(bin_dir / "llama-simple"), "-m", r.file, "-n", str(GEN_TOKENS), GEN_PROMPT]
        print("$", shlex.join(cmd), flush=True)
        g = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
        (logs / f"generate-{name}.log").write_text(f"{g.stdout}\n--- stderr\n{g.stderr}")
        r.generated = g.stdout.strip()
        r.generates = g.returncode == 0 and (parse_decoded(g.stderr) or 0) > 0
        print(f"   {'ok' if r.generates else 'FAILED'}: {r.generated!r}", flush=True)


def fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def table(rows: list[Row]) -> str:
    lines = ["| type | tool | size MiB | quantize s | from HF s | peak RSS MB | mean KL | top-1 % | PPL | PPL / f16 "
             "| generates |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        k = r.kld
        lines.append(f"| {r.type} | {r.tool} | {r.size_bytes / MIB:.1f} | {fmt(r.quantize_s, '.1f')} | "
                     f"{fmt(r.from_hf_s, '.1f')} | {fmt(r.peak_rss_mb, '.0f')} | {fmt(k.get('mean_kld'), '.5f')} | "
                     f"{fmt(k.get('same_top_p'), '.2f')} | {fmt(k.get('ppl_q'), '.4f')} | "
                     f"{fmt(k.get('ppl_ratio'), '.4f')} | {'yes' if r.generates else 'NO'} |")
    return "\n".join(lines)


def summary(rows: list[Row], args: argparse.Namespace, info: dict, command: str) -> str:
    stamp = Path(args.llama_bin_resolved).parent / ".quantkit-built"
    built = stamp.read_text().strip() if stamp.is_file() else "llama.cpp (build stamp not found)"
    return "\n".join([
        f"Measured {time.strftime('%Y-%m-%d')}, one run of `{command}`; {built}; {args.threads} threads.",
        f"Calibration: {info['calib_windows'][0]} x {info['calib_windows'][1]} tokens of `{args.calib}` (seed "
        f"{args.seed}), llama-imatrix over {info['imatrix_chunks']} chunks of {args.seq_len}. Evaluation: "
        f"{info['eval_chunks']} chunks of {args.eval_ctx} `pydocs-eval` tokens (the second half of each scored), "
        f"f16 perplexity {info['f16_ppl']}. llama.cpp's chain: convert {info['convert_s']} s, imatrix "
        f"{info['imatrix_s']} s, then quantize per type; `from HF s` adds them up.", "", table(rows)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the unquantized Hugging Face model directory")
    ap.add_argument("--types", default=DEFAULT_TYPES, help=f"comma-separated GGUF file types [{DEFAULT_TYPES}]")
    ap.add_argument("--work", required=True, type=Path, help="where files, logs and results go")
    ap.add_argument("--llama-bin", help="llama.cpp's bin folder [what scripts/build-llama-cpp prints]")
    ap.add_argument("--calib", default="pydocs-calib", help="calibration set, as quantkit's --calib")
    ap.add_argument("--samples", type=int, default=128, help="calibration windows (llama-imatrix chunks)")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per window (llama-imatrix context)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-ctx", type=int, default=512, help="llama-perplexity context")
    ap.add_argument("--eval-chunks", type=int, default=32, help="llama-perplexity chunks of pydocs-eval")
    ap.add_argument("--threads", type=int, default=2, help="threads for llama.cpp's tools")
    ap.add_argument("--skip-quantkit", action="store_true", help="llama.cpp's side alone")
    args = ap.parse_args()
    args.types = [t.strip() for t in args.types.split(",") if t.strip()]
    command = shlex.join(["python", *sys.argv])
    print(command, flush=True)
    work = args.work.resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    bin_dir = llama_bin(args.llama_bin)
    args.llama_bin_resolved = str(bin_dir)
    info = write_texts(Path(args.base).resolve(), work, args)
    rows = llama_side(args, bin_dir, work, logs, info)
    if not args.skip_quantkit:
        rows += quantkit_side(args, work, logs)
    rows = rows[:1] + sorted(rows[1:], key=lambda r: (args.types.index(r.type), r.tool))
    judge(rows, args, bin_dir, work, logs, info)
    text = summary(rows, args, info, command)
    print("\n" + text)
    (work / "results.md").write_text(text + "\n")
    (work / "results.json").write_text(json.dumps({"command": command, "info": info,
                                                   "rows": [asdict(r) for r in rows]}, indent=2))
    failed = [Path(r.file).name for r in rows if not r.generates]
    if failed:
        print(f"llama-simple failed to generate from: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
