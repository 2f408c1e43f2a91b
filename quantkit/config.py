"""Validated settings for one quantization run. Core modules take these, never CLI objects."""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass

# dtypes of the calibration forwards (--compute-dtype; precision.compute_dtype decides "auto")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")

SUPPORTED_BITS = (2, 3, 4, 8)  # what the GPTQ packing holds (quantkit.write.packing); here so settings need no torch
METHODS = ("gptq", "rtn", "bnb-nf4", "bnb-int8")
BNB_BITS = {"bnb-nf4": 4, "bnb-int8": 8}  # bitsandbytes methods and the bits they store
# llama.cpp file types quantize writes as one GGUF file (--gguf-type): the block types, and llama.cpp's mixes of
# them by name (write/gguf_mix.py holds which tensor gets which type)
GGUF_FILE_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q4_K_S", "Q4_K_M", "Q5_K_S",
                   "Q5_K_M")
DEFAULT_GGUF_TYPE = "Q4_K_M"  # --gguf-type unless told; what convert's refusals suggest
GGUF_METHODS = ("gptq", "rtn")  # the methods that can write GGUF blocks

ESTIMATE_BITS = (2, 3, 4, 8, 16)  # the widths `estimate` sizes (16 = unquantized float16)
DEFAULT_ESTIMATE_BITS = (16, 8, 4, 3, 2)  # and the ones it shows unless told
ESTIMATE_DEVICES = ("auto", "cpu", "cuda")  # the quantize modes `estimate` sizes: auto = a CPU run and GPU runs
IMPORT_DTYPES = ("float32", "float16", "bfloat16")  # import-gguf's output dtypes (float32 keeps GGUF values exactly)
ESTIMATE_CONTEXT = 4096  # tokens of KV cache per sequence `estimate` sizes unless told
ESTIMATE_BATCH = 1  # and concurrent sequences

DEFAULT_CALIB = "pydocs-calib"  # the built-in calibration text (source/calibration.py)
DEFAULT_EVAL = "pydocs-eval"  # the disjoint built-in evaluation text; never calibrate on it
DEFAULT_SHARD_SIZE = "2GB"  # largest safetensors shard written
# bytes of expert Hessians (float32, [in, in] each) one calibration pass sums, unless --expert-chunk says how many
# experts (memory/expert_chunks.py)
EXPERT_HESSIAN_BUDGET = 2 << 30
DEFAULT_EXPERT_MIN_TOKENS = 32  # an expert routed fewer calibration tokens is rounded to nearest, not GPTQ-solved


class InvalidSetting(ValueError):
    """A setting out of range; `option` names the field (and, with dashes, the CLI flag) at fault."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option

    @property
    def flag(self) -> str:
        return "--" + self.option.replace("_", "-")


@dataclass(frozen=True)
class QuantSpec:
    """How each Linear weight is quantized.

    :param bits: bits per weight (2, 3, 4 or 8).
    :param group_size: input channels sharing one scale/zero; -1 = one group per output row.
    :param sym: symmetric grid with a fixed zero point (2**(bits-1)); asymmetric otherwise.
    :param damp: Hessian damping as a fraction of mean(diag(H)).
    :param act_order: process columns by decreasing Hessian diagonal (GPTQ "desc_act").
    :param static_groups: with act_order, fix group parameters before the pass so g_idx stays i // group_size.
    :param true_sequential: quantize a layer's Linears stage by stage, each seeing the quantized earlier ones.
    :param method: "gptq" (calibrated), "rtn" (round-to-nearest, no calibration), or bitsandbytes "bnb-nf4" /
        "bnb-int8" (quantized by transformers at load, saved serialized; group and GPTQ settings do not apply).
    :param clip_search: shrink each group's range where that lowers its rounding error (solve.grid.group_qparams).
    :param skip: glob patterns of Linear names within a decoder layer (e.g. "mlp.down_proj", "self_attn.*")
        kept unquantized in float16, in every layer.
    :param lm_head: quantize the output head too (GPTQ-calibrated on the final hidden states; a tied head is
        untied). Written as "lm_head": true, which gptqmodel and vLLM read; optimum does not load it.
    :param gptaq: asymmetric calibration (GPTAQ): each Linear is solved against the unquantized model's outputs on
        the unquantized model's own activations, so it also corrects the error of the Linears and layers quantized
        before it. Costs an unquantized copy of each layer's forwards and a second set of activations. With
        lm_head, the head is calibrated as plain GPTQ, on the quantized model's final hidden states.
    :param expert_chunk: Mixture-of-Experts layers: how many experts' Hessians one calibration pass sums (peak
        memory holds that many); 0 = as many as EXPERT_HESSIAN_BUDGET bytes hold.
    :param expert_min_tokens: an expert the router sent fewer calibration tokens than this is quantized by
        round-to-nearest (its Hessian would describe too few inputs); recorded per expert in the manifest.
    :param exact_sums: sum each Hessian (and GPTAQ's cross term) in float64 from each calibration mini-batch's
        float32 product, and share the windows among torchrun's processes in whole mini-batches: the output is then
        the same bytes whatever the number of processes. Costs 8 bytes an entry instead of 4 while a Hessian is
        summed (solve/hessian.py).
    :param gguf_type: write one GGUF file of this llama.cpp type (GGUF_FILE_TYPES) instead of a GPTQ checkpoint:
        each tensor's block type and grid are llama.cpp's, and GPTQ (or round-to-nearest) picks the codes; bits,
        group size and sym are then the types' own.
    :param gguf_importance: with gguf_type, choose each block's grid weighted by the Hessian's diagonal (the
        inputs' mean square, what llama.cpp's importance matrix holds); without, as llama.cpp does with none.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    damp: float = 0.01
    act_order: bool = True
    static_groups: bool = False
    true_sequential: bool = True
    method: str = "gptq"
    clip_search: bool = True
    skip: tuple[str, ...] = ()
    lm_head: bool = False
    gptaq: bool = False
    expert_chunk: int = 0
    expert_min_tokens: int = DEFAULT_EXPERT_MIN_TOKENS
    exact_sums: bool = False
    gguf_type: str | None = None
    gguf_importance: bool = True

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise InvalidSetting("bits", f"bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise InvalidSetting("group_size", f"group size must be -1 (per row) or positive, got {self.group_size}")
        if not 0 < self.damp < 1:
            raise InvalidSetting("damp", f"damp must be in (0, 1), got {self.damp}")
        if self.method not in METHODS:
            raise InvalidSetting("method", f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if any(not p or p != p.strip() for p in self.skip):
            raise InvalidSetting("skip", f"skip patterns must be non-empty names or globs, got {list(self.skip)}")
        if self.method in BNB_BITS and self.bits != BNB_BITS[self.method]:
            raise InvalidSetting("bits", f"{self.method} stores {BNB_BITS[self.method]}-bit weights; "
                                         f"got bits={self.bits}")
        if self.lm_head and self.method in BNB_BITS:
            raise InvalidSetting("lm_head", "--lm-head applies to GPTQ and RTN outputs; bitsandbytes keeps the head in "
                                            "float")
        if self.gptaq and self.method != "gptq":
            raise InvalidSetting("gptaq", "GPTAQ is a calibration method: it applies to --method gptq only")
        if self.exact_sums and self.method != "gptq":
            raise InvalidSetting("exact_sums", "exact sums are of calibration Hessians: they apply to --method gptq "
                                               "only")
        if self.expert_chunk < 0:
            raise InvalidSetting("expert_chunk",
                                 f"expert chunk must be 0 (automatic) or positive, got {self.expert_chunk}")
        if self.expert_min_tokens < 0:
            raise InvalidSetting("expert_min_tokens",
                                 f"expert min tokens must be 0 or more, got {self.expert_min_tokens}")
        if self.static_groups and not self.act_order:
            raise InvalidSetting("static_groups", "static groups only apply with act-order")
        if self.gguf_type is not None:
            self._check_gguf()

    def _check_gguf(self) -> None:
        if self.gguf_type not in GGUF_FILE_TYPES:
            raise InvalidSetting("gguf_type", f"--gguf-type must be one of {', '.join(GGUF_FILE_TYPES)}, "
                                              f"got {self.gguf_type!r}")
        if self.method not in GGUF_METHODS:
            raise InvalidSetting("method", f"GGUF files are written by {' or '.join(GGUF_METHODS)}; "
                                           f"got --method {self.method}")
        if self.lm_head:
            raise InvalidSetting("lm_head", "--lm-head applies to GPTQ checkpoints; a GGUF file's output tensor "
                                            "gets llama.cpp's type for it, rounded to nearest")

    @property
    def desc_act(self) -> bool:
        """Whether g_idx is permuted (act-order with dynamic groups); loaders must then honour g_idx."""
        return self.method == "gptq" and self.act_order and not self.static_groups and not self.is_gguf

    @property
    def is_gguf(self) -> bool:
        return self.gguf_type is not None

    @property
    def is_bnb(self) -> bool:
        return self.method in BNB_BITS

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def effective_group_size(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def skips(self, module_name: str) -> bool:
        """Whether a Linear (named within its decoder layer) stays unquantized."""
        return any(fnmatch.fnmatchcase(module_name, p) for p in self.skip)

    def check_skip_patterns(self, module_names: Iterable[str]) -> None:
        """Every --skip pattern matches one of a decoder layer's Linears, and something is left to quantize."""
        from quantkit.errors import QuantkitError

        names = list(module_names)
        for pattern in self.skip:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                shown = dict.fromkeys(re.sub(r"\.\d+\.", ".*.", name) for name in names)  # experts.*.w1 once
                raise QuantkitError(f"--skip {pattern!r} matches none of the decoder layer's Linears "
                                    f"({', '.join(shown)})")
        if names and all(self.skips(name) for name in names):
            raise QuantkitError(f"--skip {' '.join(self.skip)} leaves no Linear to quantize")

    def to_dict(self) -> dict:
        """The settings as the manifest and the resume state record them; a GPTQ run's leave out the GGUF ones,
        which do not apply to it."""
        settings = {**asdict(self), "skip": list(self.skip)}
        if not self.is_gguf:
            del settings["gguf_type"], settings["gguf_importance"]
        return settings


@dataclass(frozen=True)
class CalibSpec:
    """Which text calibrates the run and how it is cut into samples."""

    source: str = DEFAULT_CALIB
    samples: int = 128
    seq_len: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples <= 0:
            raise InvalidSetting("samples", f"samples must be positive, got {self.samples}")
        if self.seq_len < 8:
            raise InvalidSetting("seq_len", f"seq-len must be at least 8, got {self.seq_len}")

    @property
    def tokens_needed(self) -> int:
        return self.samples * self.seq_len
