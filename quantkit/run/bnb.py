"""bitsandbytes outputs (--method bnb-nf4 / bnb-int8): transformers quantizes each Linear as it loads the base
checkpoint (BitsAndBytesConfig), and the result is saved serialized, so `from_pretrained` reloads it as is.

No calibration: NF4 is blockwise (64 values per absmax scale) and LLM.int8 is per-row absmax with outlier columns
kept in float16 at run time. bitsandbytes 0.50 runs both on CPU.
"""
from __future__ import annotations

import contextlib
import importlib.util
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from quantkit.config import QuantSpec
from quantkit.errors import QuantkitError, first_line

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig, PretrainedConfig

# LLM.int8 on CPU casts float32 inputs to float16 in every matmul and warns each time; the cast is by design
warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")


def require_bitsandbytes() -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantkitError("--method bnb-nf4/bnb-int8 needs bitsandbytes: pip install 'quantkit[bnb]' "
                            "(bitsandbytes>=0.50 runs on CPU)")


def bnb_config(spec: QuantSpec, skip_modules: list[str]) -> BitsAndBytesConfig:
    from transformers import BitsAndBytesConfig

    keep = ["lm_head", *skip_modules]
    if spec.method == "bnb-nf4":
        # float16 compute is what GPUs run; quantkit's own CPU evaluation switches modules to float32 (load_bnb)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16,
                                  bnb_4bit_use_double_quant=False, llm_int8_skip_modules=keep)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)


def skipped_module_names(model_dir: Path, config: PretrainedConfig, spec: QuantSpec) -> list[str]:
    """Full names of the Linears that --skip patterns keep unquantized (patterns are names within a layer)."""
    if not spec.skip:
        return []
    from quantkit.source.skeleton import build_skeleton, decoder_layers, linear_modules

    prefix, layers = decoder_layers(build_skeleton(config), config.num_hidden_layers)
    modules = linear_modules(layers[0])
    spec.check_skip_patterns(modules)
    return [f"{prefix}.{i}.{n}" for i in range(len(layers)) for n in modules if spec.skips(n)]


def quantize_bnb(model_dir: Path, config: PretrainedConfig, spec: QuantSpec, staging: Path,
                 device: torch.device) -> int:
    """Quantize the checkpoint in `model_dir` with bitsandbytes and save it into `staging`; returns weight bytes."""
    require_bitsandbytes()
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from quantkit.write.shards import umask

    hf_logging.disable_progress_bar()
    quant_config = bnb_config(spec, skipped_module_names(model_dir, config, spec))
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=quant_config,
                                                         dtype=torch.float16, device_map=str(device),
                                                         trust_remote_code=False)
            model.save_pretrained(str(staging), safe_serialization=True)
    except QuantkitError:
        raise
    except Exception as e:
        raise QuantkitError(f"bitsandbytes could not quantize {model_dir}: "
                            f"{first_line(e)}") from None
    for p in staging.iterdir():  # save_pretrained creates its shards 0600; match the other files
        p.chmod(0o666 & ~umask())
    return sum(p.stat().st_size for p in staging.glob("*.safetensors"))


def load_bnb(path: Path, dtype: torch.dtype = torch.float32, **kwargs) -> torch.nn.Module:
    """Reload a bitsandbytes checkpoint; on CPU, 4-bit modules compute in `dtype` (float16 matmuls are slow there)."""
    require_bitsandbytes()
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=False, **kwargs)
    if next(model.parameters()).device.type == "cpu":
        for module in model.modules():
            if hasattr(module, "compute_dtype") and type(module).__name__ == "Linear4bit":
                # torch's stubs type every Module attribute as Tensor | Module
                module.compute_dtype = dtype  # type: ignore[assignment]
    return model.eval()
