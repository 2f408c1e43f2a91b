"""Memory arithmetic from config.json alone: parameters, weights at each bit width, KV cache, quantize peak.

Nothing here reads weights: config.json decides every size. Every figure is bytes; the *_gib helpers divide by
2**30 (GiB). A "16 GB" GPU is counted as 16 GiB: that is what such cards report (an 80 GB A100 has 81920 MiB).

Weights at b bits, group size G (G = K when -1), per quantized Linear W [out=N, in=K] of a decoder layer:
    K*N*b/8 (qweight) + ceil(K/G)*N*2 (fp16 scales) + ceil(K/G)*N*b/8 (packed zeros) + K*4 (int32 g_idx)
    + N*2 for a bias (kept in fp16)
Embeddings, lm_head and norms stay fp16 (2 bytes each). At 16 bits every tensor is fp16.
KV cache: 2 (K and V) * layers * kv_heads * head_dim * context * batch * 2 bytes (fp16).
Quantize peak (what quantkit holds at once): one decoder layer's weights in float32; the calibration activations
(samples * seq_len * hidden, twice: the layer inputs and o_proj's inputs, both alive between o_proj's Hessian and
the gate/up stage; 2 bytes each in a 16-bit model, 4 in a float32 one); and the larger of a forward's own
needs (the Hessian being collected, in_features^2 * 4 bytes, plus one intermediate MLP activation of a 4096-token
mini-batch, 4096 * intermediate * 4 bytes) and a GPTQ solve's (Linears reading one input are solved stacked, N
rows by K inputs: while factorizing, the Hessian, in whose memory the factor and its inverse are made, and its
copy kept for a retry with more damping, 2*K^2 floats; then the inverse factor, the float32 weight, which the
dequantized result overwrites, and its uint8 codes, K^2 + 1.25*N*K floats. On a GPU the copy waits in host
memory, and while a layer's save overlaps the next layer a second copy of the activations is held there: GPU
runs only, not counted below).
Quantize scratch (CPU runs only, on disk in the work directory, not in memory): the calibration activations
themselves (spill.ActivationsOnDisk: only the mini-batch being worked on is in memory), and the widest Linear's
inputs (down_proj's, samples * seq_len * intermediate, in the compute dtype: float32, or bfloat16 for a bfloat16
model on a CPU with AVX512-BF16/AMX, where this overstates by 2x) from its Hessian to the propagation. The
pipeline sizes these by the widest Linear the model has, which for a dense model is this. o_proj's
inputs go there too on a CPU, so the peak above (one formula for every device, sized for a GPU run, whose
activations wait in host memory) overstates a CPU run by the activations term.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from quantkit.calibrate.batch import MLP_BATCH_TOKENS
from quantkit.config import DEFAULT_ESTIMATE_BITS, ESTIMATE_BATCH, ESTIMATE_BITS, ESTIMATE_CONTEXT, CalibSpec, QuantSpec
from quantkit.errors import QuantkitError
from quantkit.solve.gptq import SHIFT_ROWS
from quantkit.untrusted import positive_int, read_json

GIB = 2**30
GPU_SIZES_GB = (16, 24, 40, 48, 80)
OVERHEAD = 0.10           # CUDA context, allocator fragmentation, temporary buffers

# Real config.json numbers of well-known checkpoints (hidden, intermediate, layers, heads, KV heads, vocab, tied).
BUILTIN_CONFIGS: dict[str, dict] = {
    "llama-2-7b": {"_repo": "meta-llama/Llama-2-7b-hf", "model_type": "llama", "hidden_size": 4096,
                   "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False},
    "llama-2-13b": {"_repo": "meta-llama/Llama-2-13b-hf", "model_type": "llama", "hidden_size": 5120,
                    "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
                    "num_key_value_heads": 40, "vocab_size": 32000, "tie_word_embeddings": False},
    "llama-2-70b": {"_repo": "meta-llama/Llama-2-70b-hf", "model_type": "llama", "hidden_size": 8192,
                    "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
                    "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False},
    "mistral-7b": {"_repo": "mistralai/Mistral-7B-v0.1", "model_type": "mistral", "hidden_size": 4096,
                   "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False},
    "llama-3-8b": {"_repo": "meta-llama/Meta-Llama-3-8B", "model_type": "llama", "hidden_size": 4096,
                   "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False},
    "llama-3-70b": {"_repo": "meta-llama/Meta-Llama-3-70B", "model_type": "llama", "hidden_size": 8192,
                    "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
                    "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False},
    "qwen2.5-7b": {"_repo": "Qwen/Qwen2.5-7B", "model_type": "qwen2", "hidden_size": 3584,
                   "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False},
    "smollm2-135m": {"_repo": "HuggingFaceTB/SmolLM2-135M", "model_type": "llama", "hidden_size": 576,
                     "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True},
}
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_OPTIONAL = ("num_key_value_heads", "head_dim")  # positive integers where set (null: the defaults below)


@dataclass(frozen=True)
class LinearShape:
    name: str
    in_features: int
    out_features: int
    bias: bool = False

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Llama-family config that decide every size below."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False

    @classmethod
    def from_config(cls, cfg: dict, where: str = "config") -> ModelShape:
        """The shape of a Llama-family config; `where` (the config's file) names it in a one-line error when a
        size is missing or is not a positive integer, or when the heads do not divide the hidden size that
        head_dim is derived from."""
        if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):
            cfg = {**cfg["text_config"], "tie_word_embeddings": cfg.get("tie_word_embeddings",
                                                                        cfg["text_config"].get("tie_word_embeddings"))}
        missing = [k for k in _REQUIRED if cfg.get(k) is None]
        if missing:
            raise QuantkitError(f"config lacks {', '.join(missing)} (model_type {cfg.get('model_type')!r}); estimate "
                                "understands Llama-family configs (llama, mistral, qwen2, qwen3, ...)")
        for key in (*_REQUIRED, *(k for k in _OPTIONAL if cfg.get(k) is not None)):
            positive_int(cfg, key, where)
        model_type = str(cfg.get("model_type") or "llama")
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        if cfg.get("head_dim") is None and cfg["hidden_size"] % heads:
            raise QuantkitError(f"{where}: 'num_attention_heads' ({heads}) does not divide 'hidden_size' "
                                f"({cfg['hidden_size']}), and there is no 'head_dim'")
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        attention_bias = bool(cfg.get("attention_bias", False))
        tied = cfg.get("tie_word_embeddings")
        return cls(model_type=model_type, hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"],
                   layers=cfg["num_hidden_layers"], heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                   vocab=cfg["vocab_size"], tied=bool(tied) if tied is not None else False,
                   qkv_bias=attention_bias or model_type == "qwen2", o_bias=attention_bias,
                   mlp_bias=bool(cfg.get("mlp_bias", False)), qk_norm=model_type == "qwen3")

    def layer_linears(self) -> list[LinearShape]:
        """The Linear modules of one decoder layer, as quantkit quantizes them."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [LinearShape("self_attn.q_proj", h, q, self.qkv_bias),
                LinearShape("self_attn.k_proj", h, kv, self.qkv_bias),
                LinearShape("self_attn.v_proj", h, kv, self.qkv_bias),
                LinearShape("self_attn.o_proj", q, h, self.o_bias),
                LinearShape("mlp.gate_proj", h, i, self.mlp_bias),
                LinearShape("mlp.up_proj", h, i, self.mlp_bias),
                LinearShape("mlp.down_proj", i, h, self.mlp_bias)]

    def layer_norm_params(self) -> int:
        return 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)

    def solves(self) -> list[tuple[int, int]]:
        """(rows, in_features) of each GPTQ solve of a layer: Linears that read one input are solved stacked
        (q/k/v, gate/up), so each distinct input is one solve."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [(q + 2 * kv, self.hidden), (self.hidden, q), (2 * self.intermediate, self.hidden),
                (self.hidden, self.intermediate)]

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def linear_bytes(lin: LinearShape, bits: int, group_size: int) -> int:
    """Bytes of one Linear on disk/in memory: fp16 at 16 bits, else the GPTQ tensors (module docstring)."""
    k, n = lin.in_features, lin.out_features
    bias = 2 * n if lin.bias else 0
    if bits == 16:
        return 2 * k * n + bias
    groups = 1 if group_size == -1 else math.ceil(k / group_size)
    qweight = (k * n * bits + 7) // 8
    scales = groups * n * 2
    qzeros = (groups * n * bits + 7) // 8
    g_idx = k * 4
    return qweight + scales + qzeros + g_idx + bias


@dataclass
class WeightEstimate:
    bits: int
    group_size: int | None          # None at 16 bits
    linear_bytes: int               # decoder-layer Linears (quantized unless 16-bit)
    fp16_bytes: int                 # embeddings, lm_head, norms
    total_bytes: int
    kv_cache_bytes: int
    run_bytes: int                  # (weights + KV cache) * (1 + OVERHEAD)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d.update(total_gib=self.total_bytes / GIB, run_gib=self.run_bytes / GIB)
        return d


@dataclass
class Estimate:
    """Everything `quantkit estimate` prints; sizes in bytes, *_gib fields in GiB (2**30 bytes)."""

    model: str
    source: str                     # "built-in", "directory", "config file", "hub cache", "dict"
    path: str | None
    shape: ModelShape
    params: dict[str, int]          # embeddings, lm_head, attention, mlp, norms, total
    weights: list[WeightEstimate]
    group_size: int
    context: int
    batch: int
    kv_cache_bytes: int
    samples: int
    seq_len: int
    quantize_peak: dict[str, int]   # layer_fp32, activations, hessian, mlp_activation, solve, total
    quantize_scratch_bytes: int = 0  # on disk, CPU runs only
    gpus: list[dict] = field(default_factory=list)   # {gpu_gb, run: {bits: bool}, quantize: bool}
    overhead: float = OVERHEAD
    gptaq: bool = False             # the quantize peak is that of quantize --gptaq

    @property
    def total_params(self) -> int:
        return self.params["total"]

    def weight(self, bits: int) -> WeightEstimate:
        for w in self.weights:
            if w.bits == bits:
                return w
        raise KeyError(bits)

    def to_dict(self) -> dict:
        return {
            "model": self.model, "source": self.source, "path": self.path, "config": self.shape.to_dict(),
            "params": dict(self.params),
            "weights": [w.to_dict() for w in self.weights],
            "group_size": self.group_size, "context": self.context, "batch": self.batch,
            "kv_cache_bytes": self.kv_cache_bytes, "kv_cache_gib": self.kv_cache_bytes / GIB,
            "calibration": {"samples": self.samples, "seq_len": self.seq_len, "gptaq": self.gptaq},
            "quantize_peak": dict(self.quantize_peak),
            "quantize_peak_gib": self.quantize_peak["total"] / GIB,
            "quantize_scratch_disk_bytes": self.quantize_scratch_bytes,
            "gpus": [{**g, "run": {str(b): ok for b, ok in g["run"].items()}} for g in self.gpus],
            "overhead": self.overhead,
            "units": "bytes; *_gib = bytes / 2**30; a 'N GB' GPU is counted as N GiB",
        }


def load_model_config(model_or_config: str | Path | dict) -> tuple[str, str, str | None, dict]:
    """(label, source, path, config dict) for a dict, a directory, a config.json path, a cached repo id or a
    built-in name (see BUILTIN_CONFIGS); local paths win over built-in names."""
    if isinstance(model_or_config, dict):
        return "config", "dict", None, dict(model_or_config)
    text = str(model_or_config)
    path = Path(text).expanduser()
    if path.is_file():
        return text, "config file", str(path), read_json(path, "config")
    from quantkit.source.checkpoint import read_config_dict, resolve_model_dir

    if path.is_dir():
        model_dir = resolve_model_dir(text)
        return text, "directory", str(model_dir), read_config_dict(model_dir)
    key = text.lower()
    by_repo = {cfg["_repo"].lower(): name for name, cfg in BUILTIN_CONFIGS.items()}
    try:
        cached = resolve_model_dir(text)
    except QuantkitError:
        cached = None
    if cached is not None:
        return text, "hub cache", str(cached), read_config_dict(cached)
    name = key if key in BUILTIN_CONFIGS else by_repo.get(key)
    if name is not None:
        cfg = {k: v for k, v in BUILTIN_CONFIGS[name].items() if not k.startswith("_")}
        return name, f"built-in table: config.json of {BUILTIN_CONFIGS[name]['_repo']}", None, cfg
    from quantkit.source.hub import hub_cache_dir

    raise QuantkitError(f"unknown model {text!r}: not a directory, a config.json file, a repo id in the hub cache "
                        f"({hub_cache_dir()}) or a built-in name ({', '.join(BUILTIN_CONFIGS)})")


def count_params(shape: ModelShape) -> dict[str, int]:
    lins = shape.layer_linears()
    attention = shape.layers * sum(lin.params for lin in lins if lin.name.startswith("self_attn."))
    mlp = shape.layers * sum(lin.params for lin in lins if lin.name.startswith("mlp."))
    norms = shape.layers * shape.layer_norm_params() + shape.hidden   # + the final norm
    embeddings = shape.vocab * shape.hidden
    lm_head = 0 if shape.tied else shape.vocab * shape.hidden
    return {"embeddings": embeddings, "lm_head": lm_head, "attention": attention, "mlp": mlp, "norms": norms,
            "total": embeddings + lm_head + attention + mlp + norms}


def kv_cache_bytes(shape: ModelShape, context: int, batch: int) -> int:
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * context * batch * 2


def activation_bytes(config: dict) -> int:
    """Bytes per stored calibration activation: quantkit keeps them in the model's dtype when it is 16-bit."""
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float16")
    return 4 if dtype == "float32" else 2


def quantize_peak_bytes(shape: ModelShape, samples: int, seq_len: int, act_bytes: int = 2,
                        gptaq: bool = False) -> dict[str, int]:
    """The parts of quantkit's peak while quantizing a layer, and their total (module docstring). GPTAQ doubles the
    layer (its unquantized copy) and the activations (the unquantized model's), and sums a cross term of the
    Hessian's size beside it, which a solve holds throughout (gptq.gptq_quantize_shared's `cross`)."""
    streams = 2 if gptaq else 1
    layer_params = sum(lin.params for lin in shape.layer_linears()) + shape.layer_norm_params()
    solves = shape.solves()
    widest = max(k for _, k in solves)
    peak = {"layer_fp32": streams * layer_params * 4,
            "activations": streams * 2 * samples * seq_len * shape.hidden * act_bytes,
            "hessian": streams * widest ** 2 * 4,
            "mlp_activation": MLP_BATCH_TOKENS * shape.intermediate * 4,
            "solve": max(max(2 * k * k, k * k + n * k + n * k // 4) for n, k in solves) * 4}
    if gptaq:  # the cross term beside every phase of a solve; while W is shifted, two blocks of rows times C
        peak["solve"] = max(max(3 * k * k, 2 * k * k + n * k + n * k // 4 + 2 * min(n, SHIFT_ROWS) * k)
                            for n, k in solves) * 4
    peak["total"] = (peak["layer_fp32"] + peak["activations"]
                     + max(peak["hessian"] + peak["mlp_activation"], peak["solve"]))
    return peak


def quantize_scratch_bytes(shape: ModelShape, samples: int, seq_len: int, act_bytes: int = 2,
                           gptaq: bool = False) -> int:
    """Disk a CPU run borrows: the calibration activations, and per layer the widest Linear's inputs (float32,
    as the pipeline keeps them); GPTAQ keeps the unquantized model's of both too."""
    per_token = max(shape.intermediate, shape.hidden) * 4 + shape.hidden * act_bytes
    return (2 if gptaq else 1) * samples * seq_len * per_token


def _fits(need: int, gpu_gb: int) -> bool:
    return need <= gpu_gb * GIB


def estimate(model_or_config: str | Path | dict, bits: Iterable[int] = DEFAULT_ESTIMATE_BITS,
             group_size: int = QuantSpec.group_size, context: int = ESTIMATE_CONTEXT, batch: int = ESTIMATE_BATCH,
             samples: int = CalibSpec.samples, seq_len: int = CalibSpec.seq_len, gptaq: bool = False) -> Estimate:
    """Parameter count, weight memory per bit width, KV cache, quantize peak and GPU fit, from config.json alone.

    :param model_or_config: a directory with config.json, a config.json path, a repo id in the local hub cache,
        a built-in name (llama-2-7b, llama-2-70b, mistral-7b, llama-3-8b, qwen2.5-7b, smollm2-135m, ...) or a dict.
    :param gptaq: size the quantize peak of `quantize --gptaq`.
    """
    bits = tuple(dict.fromkeys(int(b) for b in bits))
    bad = [b for b in bits if b not in ESTIMATE_BITS]
    if bad or not bits:
        raise QuantkitError(f"bits must be among {', '.join(map(str, ESTIMATE_BITS))}, got {bad or 'none'}")
    if group_size != -1 and group_size <= 0:
        raise QuantkitError(f"group size must be -1 (per row) or positive, got {group_size}")
    for name, value in (("context", context), ("batch", batch), ("samples", samples), ("seq_len", seq_len)):
        if value <= 0:
            raise QuantkitError(f"{name} must be positive, got {value}")
    label, source, path, cfg = load_model_config(model_or_config)
    if path is None:
        where = label
    else:
        where = path if source == "config file" else f"{path}/config.json"
    shape = ModelShape.from_config(cfg, where)
    params = count_params(shape)
    kv = kv_cache_bytes(shape, context, batch)
    fp16_rest = 2 * (params["embeddings"] + params["lm_head"] + params["norms"])
    weights = []
    for b in bits:
        linears = shape.layers * sum(linear_bytes(lin, b, group_size) for lin in shape.layer_linears())
        total = linears + fp16_rest
        weights.append(WeightEstimate(bits=b, group_size=None if b == 16 else group_size, linear_bytes=linears,
                                      fp16_bytes=fp16_rest, total_bytes=total, kv_cache_bytes=kv,
                                      run_bytes=math.ceil((total + kv) * (1 + OVERHEAD))))
    peak = quantize_peak_bytes(shape, samples, seq_len, activation_bytes(cfg), gptaq)
    quantize_need = math.ceil(peak["total"] * (1 + OVERHEAD))
    gpus = [{"gpu_gb": g, "run": {w.bits: _fits(w.run_bytes, g) for w in weights},
             "quantize": _fits(quantize_need, g)} for g in GPU_SIZES_GB]
    return Estimate(model=label, source=source, path=path, shape=shape, params=params, weights=weights,
                    group_size=group_size, context=context, batch=batch, kv_cache_bytes=kv, samples=samples,
                    seq_len=seq_len, quantize_peak=peak, gpus=gpus,
                    quantize_scratch_bytes=quantize_scratch_bytes(shape, samples, seq_len, activation_bytes(cfg),
                                                                          gptaq), gptaq=gptaq)
