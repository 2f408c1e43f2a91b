"""The text report of `quantkit estimate`: an Estimate laid out as aligned tables."""
from __future__ import annotations

from quantkit.tools.estimate import GIB, Estimate
from quantkit.tools.estimate_shape import ModelShape


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


def _width(bits: int, group_size: int) -> str:
    return "16-bit fp16" if bits == 16 else f"{bits}-bit g{'row' if group_size == -1 else group_size}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _shape_lines(s: ModelShape) -> list[str]:
    """The config's numbers: one line, and for a Mixture-of-Experts model one on its experts."""
    dense, sparse = s.layer_counts()
    attention = (f"{s.heads} heads / {s.kv_heads} KV heads x head_dim {s.head_dim}" if s.mla is None else
                 f"{s.heads} heads of latent attention (q_lora_rank {s.mla.q_lora_rank or 'none'}, kv_lora_rank "
                 f"{s.mla.kv_lora_rank}, qk head_dim {s.mla.qk_nope_head_dim} + {s.mla.qk_rope_head_dim} rope, "
                 f"v_head_dim {s.mla.v_head_dim})")
    lines = [f"  {s.model_type}: {s.layers} layers, hidden {s.hidden}, "
             + (f"intermediate {s.intermediate}, " if dense and s.moe is None else "")
             + f"{attention}, vocab {s.vocab}, lm_head {'tied to the embeddings' if s.tied else 'untied'}"]
    if s.moe is not None:
        m = s.moe
        shared = f"shared expert intermediate {m.shared_intermediate}" if m.shared_intermediate else "no shared expert"
        others = f" (the {dense} others dense, intermediate {s.intermediate})" if dense else ""
        lines.append(f"  experts: {m.experts} experts per layer, {m.active} active per token, in {sparse} of "
                     f"{s.layers} layers{others}; each gate/up/down {s.hidden} -> {m.expert_intermediate} -> "
                     f"{s.hidden}; {shared}")
    return lines


def _params_table(e: Estimate) -> list[str]:
    p, moe = e.params, e.shape.moe is not None
    rows = [["parameters", "count"], ["embeddings", _count(p["embeddings"])],
            ["lm_head", _count(p["lm_head"]) if p["lm_head"] else "tied"],
            ["attention q/k/v/o" if e.shape.mla is None else "latent attention", _count(p["attention"])],
            ["MLP gate/up/down", _count(p["mlp"])]]
    if moe:
        rows = rows[:-1] + ([["dense and shared MLPs", _count(p["mlp"])]] if p["mlp"] else [])
        rows += [["routed experts", _count(p["experts"])], ["routers", _count(p["routers"])]]
    rows += [["norms", _count(p["norms"])], ["total", _count(p["total"])]]
    if moe:
        rows.append(["active per token", _count(p["active"])])
    return _table(rows, indent="", right=frozenset({1}))


def format_estimate(e: Estimate) -> str:
    """The human-readable report of `quantkit estimate`."""
    where = f"{e.source}: {e.path}" if e.path else e.source
    lines = [f"{e.model}  ({where})", *_shape_lines(e.shape), ""]
    lines += _params_table(e) + [""]
    rows = [["weights (GiB)", "layer linears", "fp16 rest", "total", f"run: +KV +{e.overhead:.0%}"]]
    for w in e.weights:
        label = _width(w.bits, e.group_size)
        rows.append([label, _gib(w.linear_bytes), _gib(w.fp16_bytes), _gib(w.total_bytes), _gib(w.run_bytes)])
    lines += _table(rows, indent="", right=frozenset({1, 2, 3, 4}))
    if e.experts is not None:
        sizes = ", ".join(f"{_mib(n)} {_width(b, e.group_size)}" for b, n in e.experts.bytes.items())
        lines.append(f"one routed expert: {_count(e.experts.params)} parameters, {sizes}")
    lines.append("")
    lines += [f"KV cache        {_gib(e.kv_cache_bytes)} GiB  (context {e.context} x batch {e.batch}, fp16)", ""]
    lines += _quantize_lines(e)
    if e.experts is not None and e.shape.moe is not None:
        widest = max(e.shape.hidden, e.shape.moe.expert_intermediate)
        lines.append(f"expert chunk    {e.experts.chunk} experts per calibration pass (of {e.shape.moe.experts}; "
                     f"--expert-chunk sets it): only their weights are held in a pass, and their "
                     f"Hessians, float32 [{widest}, {widest}] each, {_gib(e.experts.chunk_hessian_bytes)} GiB, are "
                     "the passes' Hessian term where they outweigh the layer's others")
    lines.append("")
    header = ["fits one GPU?"] + [("fp16" if w.bits == 16 else f"{w.bits}-bit") for w in e.weights] + ["quantize"]
    rows = [header] + [[f"{g['gpu_gb']} GB"] + ["yes" if g["run"][w.bits] else "no" for w in e.weights]
                       + ["yes" if g["quantize"] else "no"] for g in e.gpus]
    lines += _table(rows, indent="")
    lines.append(f"run = (weights + KV cache) x {1 + e.overhead:.2f}; quantize = one GPU's nvidia-smi figure above; "
                 "a 'N GB' card counted as N GiB")
    return "\n".join(lines)


def _fit(ok: bool | None) -> str:
    return "-" if ok is None else "yes" if ok else "no"


def _quantize_lines(e: Estimate) -> list[str]:
    """quantize's memory per mode: GPU allocation and nvidia-smi's figure, host, disk, and the fits asked for."""
    what = f"{e.samples} x {e.seq_len} calibration tokens{', GPTAQ' if e.gptaq else ''}" \
        f"{', exact sums' if e.exact_sums else ''}"
    lines = [f"quantize memory (GiB; {what}; per process; disk at {_width(e.quantize_bits, e.group_size)})"]
    asked = e.gpu_mem is not None or e.host_mem is not None
    header = ["mode", "compute", "GPU alloc", "GPU nvidia-smi", "host", "host (all)", "disk work", "disk out"]
    if asked:
        header += [f"fits GPU {_gib(e.gpu_mem)}" if e.gpu_mem else "fits GPU",
                   f"fits host {_gib(e.host_mem)}" if e.host_mem else "fits host"]
    rows = [header]
    for m in e.modes:
        row = [m.mode, m.compute_dtype, "-" if m.gpu_allocated is None else _gib(m.gpu_allocated),
               "-" if m.gpu_total is None else _gib(m.gpu_total), _gib(m.host), _gib(m.host_total),
               _gib(m.disk_work), _gib(m.disk_output)]
        rows.append(row + ([_fit(m.fits_gpu), _fit(m.fits_host)] if asked else []))
    lines += _table(rows, indent="  ", right=frozenset(range(2, 8)))
    lines.append("  cpu: the layer in float32 (bfloat16 for a bfloat16 model on a CPU with native bfloat16 matmuls); "
                 "the activations and kept inputs sit in scratch files (page cache, counted as disk work)")
    if any(m.gpus for m in e.modes):
        lines.append("  gpu: the layer in the model's 16-bit dtype; nvidia-smi = allocation + CUDA context + the "
                     "allocator's reserve (a floor); host holds the activations and the next layer read ahead in "
                     "pinned memory")
    if any(m.gpus > 1 for m in e.modes):
        lines.append("  N gpus (torchrun): each rank 1/N of the activations, a whole layer and the full solves; "
                     "host (all) = every rank's, rank 0 assembling the output")
    return lines
