"""The text report of `quantkit estimate`: an Estimate laid out as aligned tables."""
from __future__ import annotations

from quantkit.tools.estimate import GIB, Estimate


def _count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def _table(rows: list[list[str]], indent: str = "  ", right: frozenset[int] = frozenset()) -> list[str]:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return [indent + "  ".join(cell.rjust(w) if c in right else cell.ljust(w)
                               for c, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}" if n >= GIB else f"{n / GIB:.3f}"


def format_estimate(e: Estimate) -> str:
    """The human-readable report of `quantkit estimate`."""
    s = e.shape
    where = f"{e.source}: {e.path}" if e.path else e.source
    lines = [f"{e.model}  ({where})",
             f"  {s.model_type}: {s.layers} layers, hidden {s.hidden}, intermediate {s.intermediate}, "
             f"{s.heads} heads / {s.kv_heads} KV heads x head_dim {s.head_dim}, vocab {s.vocab}, "
             f"lm_head {'tied to the embeddings' if s.tied else 'untied'}", ""]
    p = e.params
    rows = [["parameters", "count"], ["embeddings", _count(p["embeddings"])],
            ["lm_head", _count(p["lm_head"]) if p["lm_head"] else "tied"],
            ["attention q/k/v/o", _count(p["attention"])], ["MLP gate/up/down", _count(p["mlp"])],
            ["norms", _count(p["norms"])], ["total", _count(p["total"])]]
    lines += _table(rows, indent="", right=frozenset({1})) + [""]
    rows = [["weights (GiB)", "layer linears", "fp16 rest", "total", f"run: +KV +{e.overhead:.0%}"]]
    for w in e.weights:
        label = "16-bit fp16" if w.bits == 16 else f"{w.bits}-bit g{'row' if w.group_size == -1 else w.group_size}"
        rows.append([label, _gib(w.linear_bytes), _gib(w.fp16_bytes), _gib(w.total_bytes), _gib(w.run_bytes)])
    lines += _table(rows, indent="", right=frozenset({1, 2, 3, 4})) + [""]
    q = e.quantize_peak
    lines += [f"KV cache        {_gib(e.kv_cache_bytes)} GiB  (context {e.context} x batch {e.batch}, fp16)",
              f"quantize peak   {_gib(q['total'])} GiB = decoder layer fp32 {_gib(q['layer_fp32'])} + calibration "
              f"activations {_gib(q['activations'])} + the larger of the largest GPTQ solve {_gib(q['solve'])} and "
              f"a forward's Hessian + MLP activation {_gib(q['hessian'] + q['mlp_activation'])}  "
              f"({e.samples} x {e.seq_len} calibration tokens{', GPTAQ' if e.gptaq else ''}; a CPU run keeps the "
              "activations on disk instead)",
              f"quantize disk   {_gib(e.quantize_scratch_bytes)} GiB of scratch in the work directory on a CPU (the "
              "calibration activations, and down_proj's inputs kept for the propagation; without twice that free, "
              "the activations stay in memory and down_proj's inputs are not kept)",
              ""]
    header = ["fits one GPU?"] + [("fp16" if w.bits == 16 else f"{w.bits}-bit") for w in e.weights] + ["quantize"]
    rows = [header] + [[f"{g['gpu_gb']} GB"] + ["yes" if g["run"][w.bits] else "no" for w in e.weights]
                       + ["yes" if g["quantize"] else "no"] for g in e.gpus]
    lines += _table(rows, indent="")
    lines.append(f"run = (weights + KV cache) x {1 + e.overhead:.2f}; quantize = peak x {1 + e.overhead:.2f}; "
                 "a 'N GB' card counted as N GiB")
    return "\n".join(lines)
