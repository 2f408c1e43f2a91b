"""Loading the two models verify compares: memory budgets, quantkit's own loader or transformers, bitsandbytes."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from quantkit.errors import QuantkitError, first_line
from quantkit.formats import awq, bitsandbytes, compressed_tensors
from quantkit.formats.gptq import FORMAT as GPTQ
from quantkit.formats.registry import GGUF
from quantkit.source.checkpoint import QUANTIZE_CONFIG_NAME, read_config
from quantkit.verification.compat import WEIGHTS_NAME, Limit
from quantkit.verification.integrity_report import IntegrityReport
from quantkit.verification.memory_plan import available_memory
from quantkit.verification.qlinear import as_causal_lm, estimate_footprint, load_model
from quantkit.verification.report import VerifyReport
from quantkit.verification.sources import float_bytes, load_float, model_config

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

LOADERS = ("quantkit", "transformers")
# packages transformers' from_pretrained needs for a format (GPTQ's: _gptq_kwargs; bitsandbytes': run/bnb.py)
TRANSFORMERS_NEEDS = {awq.FORMAT: ("gptqmodel",), compressed_tensors.FORMAT: ("compressed_tensors",)}
IN_MEMORY_TIERS = (None, GPTQ)  # formats quantkit's own loader holds packed, dequantizing per Linear (qlinear.py)
RAM_HEADROOM = 0.9  # refuse without --max-memory when the models need more than this share of available RAM
SUGGESTED_SHARE = 0.7  # the share of available RAM the refusal suggests as --max-memory


def footprint(path: Path, fmt: str | None, config: PretrainedConfig | None = None) -> tuple[int, int]:
    """(bytes as stored, bytes in float32) the model at `path` needs in RAM (nothing loaded). GPTQ and unquantized
    checkpoints count quantkit's own loader's tiers; other formats load as float32 models (config: the model's
    configuration, required for a GGUF, whose skeleton is its base's)."""
    if fmt in IN_MEMORY_TIERS:
        return estimate_footprint(path)
    full = float_bytes(config if config is not None else model_config(path))
    on_disk = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.glob("*.safetensors"))
    return on_disk, full


def fits_in_memory(qpath: Path, fmt: str | None, bdir: Path | None, bfmt: str | None) -> bool:
    """Whether both models, whole and in float32, fit in the RAM available (with headroom)."""
    base_config = model_config(bdir) if bdir is not None else None
    need = footprint(qpath, fmt, base_config if fmt == GGUF else None)[1]
    need += footprint(bdir, bfmt)[1] if bdir is not None else 0
    avail = available_memory()
    return avail is None or need <= RAM_HEADROOM * avail


def memory_budgets(qdir: Path, bdir: Path | None, loader: str, max_memory: int | None, fmt: str | None = None,
                   bfmt: str | None = None) -> tuple[int | None, int | None]:
    """Split --max-memory between the two models; without it, refuse when both cannot fit in available RAM."""
    if max_memory is not None and (fmt not in IN_MEMORY_TIERS or bfmt not in IN_MEMORY_TIERS):
        fmt = fmt if fmt not in IN_MEMORY_TIERS else bfmt
        instead = ("drop --max-memory, or use --loader quantkit, which evaluates it layer by layer" if
                   loader == "transformers" else "drop --max-memory: layer by layer (the default) holds one layer "
                   "of each model")
        raise QuantkitError(f"--max-memory offloads layers of GPTQ and unquantized checkpoints only; for a {fmt} "
                            f"artifact {instead}")
    base_config = model_config(bdir) if bdir is not None and fmt == GGUF else None
    q_packed, q_full = footprint(qdir, fmt, base_config)
    b_full = footprint(bdir, bfmt)[1] if bdir is not None else 0
    if max_memory is None:
        need = (q_full if loader == "quantkit" else q_packed * 2) + b_full
        avail = available_memory()
        if avail is not None and need > RAM_HEADROOM * avail:
            raise QuantkitError(f"holding the models needs about {_size(need)} of RAM but {_size(avail)} is available; "
                                f"evaluate them layer by layer (--stream on), or pass --max-memory (e.g. --max-memory "
                                f"{_size(int(SUGGESTED_SHARE * avail)).replace(' ', '')}) to offload decoder layers "
                                "to disk")
        return None, None
    if q_full + b_full <= max_memory:
        return q_full, b_full if bdir is not None else None
    if bdir is None:
        return max_memory, None
    if q_packed + b_full <= max_memory:
        return max_memory - b_full, b_full
    q_share = int(max_memory * q_packed / (q_packed + b_full))
    return q_share, max_memory - q_share


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def load(path: Path, loader: str, budget: int | None, offload: Path, report: VerifyReport, fmt: str | None,
         config: PretrainedConfig | None = None) -> tuple[PreTrainedModel, dict]:
    """One model for evaluation, within `budget` bytes; returns it and what its loading did (report.json's load).
    config: the model's configuration where the artifact has none of its own (a GGUF: its base's)."""
    if loader == "transformers":
        return _load_transformers_any(path, fmt, budget, offload, report)
    if fmt not in IN_MEMORY_TIERS:
        model = load_float(config if config is not None else model_config(path), path, fmt)
        return model, {"loader": "quantkit", "path": str(path), "quantized": True, "format": fmt,
                       "dequantized": "float32"}
    offload.mkdir(parents=True, exist_ok=True)
    model, info = load_model(path, max_memory=budget, offload_dir=offload)
    if info.offloaded:
        report.notes.append(f"{path.name}: {len(info.offloaded)} decoder layers offloaded to disk to stay within "
                            "--max-memory (slower)")
    if info.quantized and not info.cached:
        report.notes.append(f"{path.name}: dequantized in every forward to stay within --max-memory (slow, above all "
                            "for generations: consider --no-generate)")
    return model, {"loader": "quantkit", **info.to_dict()}


def _load_transformers_any(path: Path, fmt: str | None, budget: int | None, offload: Path,
                           report: VerifyReport) -> tuple[PreTrainedModel, dict]:
    """The deploy path for every format: transformers' own loading (with bitsandbytes, optimum + gptqmodel, ...)."""
    if fmt == bitsandbytes.FORMAT:
        from quantkit.run.bnb import load_bnb

        with contextlib.redirect_stdout(sys.stderr):
            model = as_causal_lm(load_bnb(path, device_map="cpu"))
        four_bit = bool((read_config(path)[0].get("quantization_config") or {}).get("load_in_4bit"))
        report.notes.append(f"{path.name}: bitsandbytes checkpoint, loaded with transformers + bitsandbytes"
                            + (" (4-bit modules compute in float32 on CPU)" if four_bit else ""))
        return model, {"loader": "transformers+bitsandbytes", "path": str(path), "quantized": True}
    if fmt in IN_MEMORY_TIERS:
        config_dict, settings_file = read_config(path)
        qcfg = config_dict.get("quantization_config") or {}
        unread = qcfg if settings_file == QUANTIZE_CONFIG_NAME else None
        return _load_transformers(path, fmt is not None, budget, offload, report, unread)
    return _load_transformers_format(path, fmt)


def _load_transformers_format(path: Path, fmt: str | None) -> tuple[PreTrainedModel, dict]:
    """AWQ, compressed-tensors, FP8 and GGUF artifacts through from_pretrained's own quantizers (which may also
    quantize activations, as at deployment); a GGUF is dequantized by transformers while loading."""
    from transformers import AutoModelForCausalLM

    missing = [m for m in TRANSFORMERS_NEEDS.get(str(fmt), ()) if importlib.util.find_spec(m) is None]
    if missing:
        raise QuantkitError(f"--loader transformers needs {', '.join(missing)} for {fmt} artifacts (pip install "
                            f"{' '.join(m.replace('_', '-') for m in missing)}), or use --loader quantkit")
    kwargs: dict = {"device_map": "cpu", "trust_remote_code": False}
    target = path
    if fmt == GGUF:
        target, kwargs["gguf_file"], kwargs["dtype"] = path.parent, path.name, torch.float32
    try:
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for module in TRANSFORMERS_NEEDS.get(str(fmt), ()):
                importlib.import_module(module)
            model = as_causal_lm(AutoModelForCausalLM.from_pretrained(str(target), **kwargs))
    except Exception as e:
        raise QuantkitError(f"transformers cannot load {path}: {first_line(e)}") from None
    return model.eval(), {"loader": "transformers", "path": str(path), "quantized": True, "format": fmt}


def torch_backend_reason(integrity: IntegrityReport) -> str | None:
    """Why transformers must run this checkpoint with gptqmodel's torch backend, or None when its default does."""
    if integrity.has_limit(Limit.RAGGED_GROUPS):
        return "partial last groups"
    if integrity.has_limit(Limit.TORCH_BACKEND):
        return "4-bit asymmetric per row"
    return None


def _gptq_kwargs(path: Path, report: VerifyReport) -> dict:
    """from_pretrained arguments for a GPTQ checkpoint: optimum + gptqmodel, their torch backend where needed."""
    from transformers import GPTQConfig

    missing = [m for m in ("optimum", "gptqmodel") if importlib.util.find_spec(m) is None]
    if missing:
        raise QuantkitError(f"--loader transformers needs optimum and gptqmodel for GPTQ checkpoints "
                            f"({', '.join(missing)} missing): pip install 'quantkit[hf]', or use --loader quantkit")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    q = report.integrity.quantization or {}
    if report.integrity.has_limit(Limit.WEIGHTS_FILE_NAME):
        found = next(path.glob("*.safetensors")).name
        raise QuantkitError(f"transformers cannot load {path}: its weights are in {found} without an index, and "
                            f"from_pretrained looks for {WEIGHTS_NAME} or an index only; use --loader quantkit")
    if report.integrity.has_limit(Limit.MOE_FUSED_EXPERTS):
        raise QuantkitError(f"{path} has quantized Mixture-of-Experts experts, which transformers' from_pretrained "
                            "does not load (it would leave them randomly initialised); use --loader quantkit")
    if q.get("lm_head"):
        raise QuantkitError(f"{path} has a quantized lm_head, which transformers + optimum do not load (they "
                            "convert only the decoder blocks); use --loader quantkit")
    reason = torch_backend_reason(report.integrity)
    if reason is None:
        return {}
    report.notes.append(f"{reason}: loaded through transformers with GPTQConfig(backend=\"torch\")")
    return {"quantization_config": GPTQConfig(bits=q["bits"], group_size=q["group_size"], desc_act=q["desc_act"],
                                              sym=q["sym"], backend="torch")}


def _load_transformers(path: Path, quantized: bool, budget: int | None, offload: Path, report: VerifyReport,
                       unread: dict | None = None) -> tuple[PreTrainedModel, dict]:
    """The deploy path: AutoModelForCausalLM.from_pretrained, with optimum + gptqmodel for GPTQ checkpoints.
    `unread`: GPTQ settings that only quantize_config.json holds, which from_pretrained does not read; they are
    given to it in the model's config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs: dict = {"device_map": "cpu", "trust_remote_code": False}
    if quantized:
        kwargs.update(_gptq_kwargs(path, report))
    else:
        kwargs["dtype"] = torch.float32
    if unread is not None:
        try:
            kwargs["config"] = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
        except Exception as e:
            raise QuantkitError(f"cannot read {path}/config.json: {first_line(e)}") from None
        kwargs["config"].quantization_config = unread
    if budget is not None:
        offload.mkdir(parents=True, exist_ok=True)
        kwargs.update(device_map="auto", max_memory={"cpu": budget}, offload_folder=str(offload))
    try:
        with contextlib.redirect_stdout(sys.stderr):  # gptqmodel prints banners and logs on stdout (set at import)
            if quantized:
                import gptqmodel  # noqa: F401
            model = as_causal_lm(AutoModelForCausalLM.from_pretrained(str(path), **kwargs))
    except Exception as e:
        raise QuantkitError(f"transformers cannot load {path}: {first_line(e)}") from None
    return model.eval(), {"loader": "transformers", "path": str(path), "quantized": quantized,
                          "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}


def _vocab_size(model: PreTrainedModel) -> int | None:
    head = model.get_output_embeddings()
    return head.out_features if hasattr(head, "out_features") else None


def check_vocab(qmodel: PreTrainedModel, bmodel: PreTrainedModel | None) -> None:
    """Refuse models that predict over different vocabularies: their next-token distributions cannot be compared."""
    if bmodel is None:
        return
    qv, bv = _vocab_size(qmodel), _vocab_size(bmodel)
    if qv is not None and bv is not None and qv != bv:
        raise QuantkitError(f"the quantized model predicts over {qv} tokens and the base over {bv}: not the same "
                            "vocabulary")

