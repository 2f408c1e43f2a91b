#!/usr/bin/env python
"""One quantize command in 1, 2, ... processes under torchrun, side by side in one run: wall time, each
process's peak RSS, and the output against the 1-process run's (GPTQ codes alike, perplexity on held-out windows).

    python scripts/bench/processes.py demo/SmolLM2-135M-Instruct --work /tmp/bench-processes --processes 1,2
    python scripts/bench/processes.py demo/SmolLM2-135M-Instruct --work /tmp/bp-exact --processes 1,2 \
        --exact-sums --threads 1
    python scripts/bench/processes.py --synthetic llama-3-8b --layers 32 --work /tmp/bp --processes 1,2,4,8 \
        --device cuda --samples 128 --seq-len 2048

On a CPU each process gets the cores divided between them (torchrun sets OMP_NUM_THREADS=1 per process where
the launcher leaves it unset; 1 process uses torch's default, every core; --threads N sets OMP_NUM_THREADS for
every process). --exact-sums runs quantize --exact-sums. On a GPU machine, pass
--device cuda: one GPU per process. --synthetic SHAPE writes a checkpoint of that built-in shape with random
bfloat16 weights into WORK (kept and reused) instead of MODEL; its perplexity says nothing and is not measured.
Besides the codes, the table counts the output files byte-identical to the first run's.
Writes WORK/bench_processes.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from measure import QUANTKIT, absolute, bench_env, run

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # quantkit from this checkout where it is not installed


def command(model: str, out: Path, processes: int, args: argparse.Namespace) -> list[str]:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
              "-m", "quantkit"] if processes > 1 else QUANTKIT
    return [*launch, "quantize", absolute(model), "--out", str(out), "--samples", str(args.samples), "--seq-len",
            str(args.seq_len), "--device", args.device, "--overwrite", "--json", *(["--exact-sums"] if args.exact_sums
                                                                                  else [])]


def same_files(a: Path, b: Path) -> str:
    """How many of a's output files b holds byte for byte, of how many."""
    names = sorted(p.name for p in a.iterdir())
    same = sum((b / n).is_file() and (a / n).read_bytes() == (b / n).read_bytes() for n in names)
    return f"{same}/{len(names)}"


def codes_alike(a: Path, b: Path) -> float:
    """The share of GPTQ codes (qweight, unpacked) two outputs of the same settings hold alike."""
    from safetensors.torch import load_file

    from quantkit.write.packing import unpack_qweight

    def tensors(out: Path) -> dict:
        found: dict = {}
        for shard in sorted(out.glob("*.safetensors")):
            found.update(load_file(str(shard)))
        return found

    ta, tb = tensors(a), tensors(b)
    bits = json.loads((a / "config.json").read_text())["quantization_config"]["bits"]
    same = total = 0
    for name, t in ta.items():
        if name.endswith(".qweight"):
            k = t.shape[0] * 32 // bits
            same += int((unpack_qweight(t, bits, k) == unpack_qweight(tb[name], bits, k)).sum())
            total += k * t.shape[1]
    return same / total


def perplexities(outputs: dict[int, Path], samples: int) -> dict[int, float]:
    """Each output's perplexity, dequantized to float32, on held-out windows of the calibration text (seed 7)."""
    import torch
    from transformers import AutoTokenizer

    from quantkit.config import CalibSpec
    from quantkit.source.calibration import calibration_batch
    from quantkit.verification.dequantized import load_dequantized
    from quantkit.verification.metrics import perplexity

    first = next(iter(outputs.values()))
    windows = calibration_batch(AutoTokenizer.from_pretrained(str(first)), CalibSpec(samples=samples, seq_len=512,
                                                                                     seed=7))
    with torch.no_grad():
        return {n: perplexity(load_dequantized(str(out)).eval(), windows) for n, out in outputs.items()}


def synthetic(work: Path, shape: str, layers: int | None, device: str) -> Path:
    """A checkpoint of a built-in shape with random bfloat16 weights, written once into WORK."""
    import torch

    from quantkit.tools.synthetic import shape_config, write_synthetic_checkpoint

    model = work / f"{shape}-{layers or 'all'}l"
    if not (model / "config.json").is_file():
        write_synthetic_checkpoint(model, shape_config(shape, layers), torch.bfloat16, device=device)
    return model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("--synthetic", help="a built-in shape (quantkit estimate's names) instead of MODEL")
    ap.add_argument("--layers", type=int, help="with --synthetic: this many decoder layers")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--exact-sums", action="store_true", help="quantize --exact-sums")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS of every process")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if (args.model is None) == (args.synthetic is None):
        ap.error("give MODEL or --synthetic SHAPE")
    if args.synthetic:
        args.model = str(synthetic(args.work.resolve(), args.synthetic, args.layers, args.device))
    counts = [int(n) for n in args.processes.split(",")]
    rows, outputs = [], {}
    for n in counts:
        out = args.work.resolve() / f"out-{n}"
        env = bench_env(OMP_NUM_THREADS=str(args.threads)) if args.threads else None
        m = run(command(args.model, out, n, args), args.work.resolve() / f"quantize-{n}.log", env).check()
        report = m.report()
        outputs[n] = out
        rows.append({"processes": n, "wall_s": round(m.wall_s, 1), "layers_s": report["phase_seconds"]["layers"],
                     "peak_rss_mb_per_process": report["peak_rss_mb"]})
        print(json.dumps(rows[-1]), flush=True)
    ppl = perplexities(outputs, args.eval_samples) if not args.synthetic else {}
    for row in rows:
        n = row["processes"]
        row["codes_alike"] = round(codes_alike(outputs[counts[0]], outputs[n]), 4)
        row["same_files"] = same_files(outputs[counts[0]], outputs[n])
        row["ppl"] = round(ppl[n], 4) if n in ppl else "-"
    what = f"--synthetic {args.synthetic} --layers {args.layers}" if args.synthetic else args.model
    lines = [f"`python scripts/bench/processes.py {what} --processes {args.processes} --samples {args.samples} "
             f"--seq-len {args.seq_len} --device {args.device}{' --exact-sums' if args.exact_sums else ''}"
             f"{f' --threads {args.threads}' if args.threads else ''}`", "",
             "| processes | wall s | layers s | peak RSS MB per process | codes alike (vs first) | files identical "
             "(vs first) | PPL |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['processes']} | {r['wall_s']} | {r['layers_s']} | {r['peak_rss_mb_per_process']} | "
              f"{r['codes_alike']} | {r['same_files']} | {r['ppl']} |" for r in rows]
    text = "\n".join(lines)
    print(text)
    (args.work / "bench_processes.md").write_text(text + "\n")
    (args.work / "bench_processes.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
