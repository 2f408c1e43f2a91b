"""Memory arithmetic from config.json alone: parameters, weights at each bit width, KV cache, quantize peak.

Nothing here reads weights: config.json decides every size. Every figure is bytes; the *_gib helpers divide by
2**30 (GiB). A "16 GB" GPU is counted as 16 GiB: that is what such cards report (an 80 GB A100 has 81920 MiB).

Weights at b bits, group size G (G = K when -1), per quantized Linear W [out=N, in=K] of a decoder layer:
    K*N*b/8 (qweight) + ceil(K/G)*N*2 (fp16 scales) + ceil(K/G)*N*b/8 (packed zeros) + K*4 (int32 g_idx)
    + N*2 for a bias (kept in fp16)
Embeddings, lm_head, norms and the routers of Mixture-of-Experts layers stay fp16 (2 bytes each). At 16 bits
every tensor is fp16.
KV cache: 2 (K and V) * layers * kv_heads * head_dim * context * batch * 2 bytes (fp16); with DeepSeek's latent
attention, the latent transformers caches: layers * (kv_lora_rank + qk_rope_head_dim) * context * batch * 2.
Quantize: where a run's memory lives (GPU allocation, what nvidia-smi shows, host, disk) for a CPU run, one GPU
and N GPUs, each term from the pipeline's own steps: estimate_memory.py's docstring. Given a card's and a host's
size (`gpu_mem`, `host_mem`), each mode says whether the run fits on each.
Mixture-of-Experts (estimate_shape.MoEShape): parameters count every expert; "active" ones leave out the routed
experts a token does not run; a calibration pass holds a chunk of the experts (memory/expert_chunks.py).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from quantkit.calibrate.precision import cpu_has_native_bf16
from quantkit.config import (
    DEFAULT_ESTIMATE_BITS,
    ESTIMATE_BATCH,
    ESTIMATE_BITS,
    ESTIMATE_CONTEXT,
    ESTIMATE_DEVICES,
    CalibSpec,
    QuantSpec,
)
from quantkit.errors import QuantkitError
from quantkit.tools.estimate_memory import Calibration, ModeMemory, cpu_mode, expert_pass, gpu_mode
from quantkit.tools.estimate_shape import LinearShape, ModelShape, count_params
from quantkit.untrusted import read_json

GIB = 2**30
GPU_SIZES_GB = (16, 24, 40, 48, 80)
OVERHEAD = 0.10           # running a model: CUDA context, allocator fragmentation, temporary buffers

# Real config.json numbers of well-known checkpoints (hidden, intermediate, layers, heads, KV heads, vocab, tied;
# the experts of Mixture-of-Experts ones, and DeepSeek-V3's latent attention; its multi-token-prediction layer,
# num_nextn_predict_layers, is not part of the model transformers builds, nor counted).
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
    "qwen3-30b-a3b": {"_repo": "Qwen/Qwen3-30B-A3B", "model_type": "qwen3_moe", "hidden_size": 2048,
                      "intermediate_size": 6144, "num_hidden_layers": 48, "num_attention_heads": 32,
                      "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": False,
                      "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
                      "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True},
    "mixtral-8x7b": {"_repo": "mistralai/Mixtral-8x7B-v0.1", "model_type": "mixtral", "hidden_size": 4096,
                     "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False,
                     "num_local_experts": 8, "num_experts_per_tok": 2},
    "deepseek-v3": {"_repo": "deepseek-ai/DeepSeek-V3", "model_type": "deepseek_v3", "hidden_size": 7168,
                    "intermediate_size": 18432, "num_hidden_layers": 61, "num_attention_heads": 128,
                    "num_key_value_heads": 128, "vocab_size": 129280, "tie_word_embeddings": False,
                    "first_k_dense_replace": 3, "n_routed_experts": 256, "n_shared_experts": 1,
                    "num_experts_per_tok": 8, "moe_intermediate_size": 2048, "n_group": 8, "topk_group": 4,
                    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                    "v_head_dim": 128, "num_nextn_predict_layers": 1},
}


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
    fp16_bytes: int                 # embeddings, lm_head, norms, routers
    total_bytes: int
    kv_cache_bytes: int
    run_bytes: int                  # (weights + KV cache) * (1 + OVERHEAD)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d.update(total_gib=self.total_bytes / GIB, run_gib=self.run_bytes / GIB)
        return d


@dataclass
class ExpertEstimate:
    """A Mixture-of-Experts model's experts: one routed expert's size, and what one calibration pass holds."""

    params: int                     # one routed expert's gate/up/down
    bytes: dict[int, int]           # {bits: one routed expert's bytes}, at each width sized
    chunk: int                      # experts per calibration pass
    chunk_hessian_bytes: int        # that many Hessians of the widest expert input, as summed

    def to_dict(self) -> dict:
        return {"params": self.params, "bytes": {str(b): n for b, n in self.bytes.items()}, "chunk": self.chunk,
                "chunk_hessian_bytes": self.chunk_hessian_bytes}


@dataclass
class Estimate:
    """Everything `quantkit estimate` prints; sizes in bytes, *_gib fields in GiB (2**30 bytes)."""

    model: str
    source: str                     # "built-in", "directory", "config file", "hub cache", "dict"
    path: str | None
    shape: ModelShape
    params: dict[str, int]          # embeddings, lm_head, attention, mlp, (experts, routers,) norms, total(, active)
    weights: list[WeightEstimate]
    group_size: int
    context: int
    batch: int
    kv_cache_bytes: int
    samples: int
    seq_len: int
    modes: list[ModeMemory] = field(default_factory=list)  # quantize's memory: a CPU run, 1 GPU, N GPUs
    quantize_bits: int = QuantSpec.bits  # the width whose output the modes' disk figures size
    gpu_mem: int | None = None      # the card (bytes) the modes' fits_gpu answer for
    host_mem: int | None = None     # the host (bytes) the modes' fits_host answer for
    gpus: list[dict] = field(default_factory=list)   # {gpu_gb, run: {bits: bool}, quantize: bool (1 GPU)}
    overhead: float = OVERHEAD
    gptaq: bool = False             # the quantize peak is that of quantize --gptaq
    exact_sums: bool = False        # and of quantize --exact-sums
    experts: ExpertEstimate | None = None  # Mixture-of-Experts models only

    @property
    def total_params(self) -> int:
        return self.params["total"]

    def weight(self, bits: int) -> WeightEstimate:
        for w in self.weights:
            if w.bits == bits:
                return w
        raise KeyError(bits)

    def to_dict(self) -> dict:
        """The JSON object of `estimate --json`; "experts" only for a Mixture-of-Experts model."""
        moe = {} if self.experts is None else {"experts": self.experts.to_dict()}
        return {
            "model": self.model, "source": self.source, "path": self.path, "config": self.shape.to_dict(),
            "params": dict(self.params),
            "weights": [w.to_dict() for w in self.weights],
            "group_size": self.group_size, "context": self.context, "batch": self.batch,
            "kv_cache_bytes": self.kv_cache_bytes, "kv_cache_gib": self.kv_cache_bytes / GIB,
            "calibration": {"samples": self.samples, "seq_len": self.seq_len, "gptaq": self.gptaq,
                            "exact_sums": self.exact_sums},
            "quantize": {"bits": self.quantize_bits, "gpu_mem": self.gpu_mem, "host_mem": self.host_mem,
                         "modes": [m.to_dict() for m in self.modes]},
            "gpus": [{**g, "run": {str(b): ok for b, ok in g["run"].items()}} for g in self.gpus],
            "overhead": self.overhead,
            "units": "bytes; *_gib = bytes / 2**30; a 'N GB' GPU (and --gpu-mem/--host-mem N GB) is N GiB",
            **moe,
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


def decoder_linear_bytes(shape: ModelShape, bits: int, group_size: int) -> int:
    """Bytes of every decoder layer's Linears, the routed experts' included."""
    def of(lins: list[LinearShape]) -> int:
        return sum(linear_bytes(lin, bits, group_size) for lin in lins)

    dense, sparse = shape.layer_counts()
    experts = shape.moe.experts if shape.moe is not None else 0
    return (dense * of(shape.layer_linears())
            + sparse * (of(shape.layer_linears(experts=True)) + experts * of(shape.expert_linears())))


def kv_cache_bytes(shape: ModelShape, context: int, batch: int) -> int:
    if shape.mla is not None:  # one latent (and its rotary key) per token, shared by every head
        return shape.layers * (shape.mla.kv_lora_rank + shape.mla.qk_rope_head_dim) * context * batch * 2
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * context * batch * 2


def model_dtype(config: dict) -> str:
    """The checkpoint's dtype as config.json names it (float16 where it names none)."""
    return str(config.get("torch_dtype") or config.get("dtype") or "float16")


def activation_bytes(config: dict) -> int:
    """Bytes per stored calibration activation: quantkit keeps them in the model's dtype when it is 16-bit."""
    return 4 if model_dtype(config) == "float32" else 2


def expert_estimate(shape: ModelShape, bits: Iterable[int], group_size: int, chosen_chunk: int = 0,
                    exact_sums: bool = False) -> ExpertEstimate | None:
    """One routed expert's size at each width, and a calibration pass's experts; None for a dense model."""
    if shape.moe is None:
        return None
    lins = shape.expert_linears()
    chunk, hessians = expert_pass(shape, chosen_chunk, exact_sums)
    return ExpertEstimate(params=sum(lin.params for lin in lins),
                          bytes={b: sum(linear_bytes(lin, b, group_size) for lin in lins) for b in bits},
                          chunk=chunk, chunk_hessian_bytes=hessians)


def _fits(need: int, gpu_gb: int) -> bool:
    return need <= gpu_gb * GIB


def quantize_modes(shape: ModelShape, cal: Calibration, device: str, gpus: int, output_bytes: int,
                   packed_bytes: int, gpu_mem: int | None, host_mem: int | None) -> list[ModeMemory]:
    """The modes shown: a CPU run (device "cpu" or "auto"), one GPU and, for gpus > 1, N GPUs (device "cuda" or
    "auto"); each with its fits answered where a size is given."""
    modes = [cpu_mode(shape, cal, output_bytes, packed_bytes)] if device in ("auto", "cpu") else []
    if device in ("auto", "cuda"):
        modes += [gpu_mode(shape, cal, n, output_bytes, packed_bytes) for n in dict.fromkeys((1, gpus))]
    for m in modes:
        m.fits_host = None if host_mem is None else m.host_total <= host_mem
        m.fits_gpu = None if gpu_mem is None or m.gpu_total is None else m.gpu_total <= gpu_mem
    return modes


def _check_settings(bits: tuple[int, ...], group_size: int, sizes: dict[str, int], expert_chunk: int,
                    device: str) -> None:
    bad = [b for b in bits if b not in ESTIMATE_BITS]
    if bad or not bits:
        raise QuantkitError(f"bits must be among {', '.join(map(str, ESTIMATE_BITS))}, got {bad or 'none'}")
    if group_size != -1 and group_size <= 0:
        raise QuantkitError(f"group size must be -1 (per row) or positive, got {group_size}")
    for name, value in sizes.items():
        if value <= 0:
            raise QuantkitError(f"{name} must be positive, got {value}")
    if expert_chunk < 0:
        raise QuantkitError(f"expert chunk must be 0 (automatic) or positive, got {expert_chunk}")
    if device not in ESTIMATE_DEVICES:
        raise QuantkitError(f"device must be one of {', '.join(ESTIMATE_DEVICES)}, got {device!r}")


def estimate(model_or_config: str | Path | dict, bits: Iterable[int] = DEFAULT_ESTIMATE_BITS,
             group_size: int = QuantSpec.group_size, context: int = ESTIMATE_CONTEXT, batch: int = ESTIMATE_BATCH,
             samples: int = CalibSpec.samples, seq_len: int = CalibSpec.seq_len, gptaq: bool = False,
             expert_chunk: int = QuantSpec.expert_chunk, device: str = "auto", gpus: int = 1,
             gpu_mem: int | None = None, host_mem: int | None = None, cpu_bf16: bool | None = None,
             exact_sums: bool = False) -> Estimate:
    """Parameter count, weight memory per bit width, KV cache, and quantize's memory per mode, from config.json.

    :param model_or_config: a directory with config.json, a config.json path, a repo id in the local hub cache,
        a built-in name (llama-2-7b, llama-2-70b, mistral-7b, llama-3-8b, qwen2.5-7b, smollm2-135m,
        qwen3-30b-a3b, mixtral-8x7b, deepseek-v3, ...) or a dict.
    :param gptaq: size `quantize --gptaq`.
    :param exact_sums: size `quantize --exact-sums` (Hessians summed in float64).
    :param expert_chunk: size `quantize --expert-chunk N` (0: as many experts per pass as the Hessian budget holds).
    :param device: the modes sized: "auto" (a CPU run and GPU runs), "cpu" or "cuda".
    :param gpus: also size a `torchrun --nproc-per-node N` run on N GPUs (per process).
    :param gpu_mem: bytes of one GPU, :param host_mem: bytes of the host: each mode says whether it fits them.
    :param cpu_bf16: whether the CPU multiplies bfloat16 natively (a bfloat16 model then computes in it); None:
        this machine's CPU.
    """
    bits = tuple(dict.fromkeys(int(b) for b in bits))
    sizes = {"context": context, "batch": batch, "samples": samples, "seq_len": seq_len, "gpus": gpus,
             **{k: v for k, v in (("gpu_mem", gpu_mem), ("host_mem", host_mem)) if v is not None}}
    _check_settings(bits, group_size, sizes, expert_chunk, device)
    label, source, path, cfg = load_model_config(model_or_config)
    if path is None:
        where = label
    else:
        where = path if source == "config file" else f"{path}/config.json"
    shape = ModelShape.from_config(cfg, where)
    params = count_params(shape)
    kv = kv_cache_bytes(shape, context, batch)
    fp16_rest = 2 * (params["embeddings"] + params["lm_head"] + params["norms"] + params.get("routers", 0))
    weights = []
    for b in bits:
        linears = decoder_linear_bytes(shape, b, group_size)
        total = linears + fp16_rest
        weights.append(WeightEstimate(bits=b, group_size=None if b == 16 else group_size, linear_bytes=linears,
                                      fp16_bytes=fp16_rest, total_bytes=total, kv_cache_bytes=kv,
                                      run_bytes=math.ceil((total + kv) * (1 + OVERHEAD))))
    widths = [b for b in bits if b != 16]
    qbits = QuantSpec.bits if QuantSpec.bits in widths or not widths else widths[0]
    packed = decoder_linear_bytes(shape, qbits, group_size)
    if cpu_bf16 is None:
        cpu_bf16 = cpu_has_native_bf16()
    cal = Calibration(samples, seq_len, gptaq, expert_chunk, activation_bytes(cfg),
                      cpu_bf16 and model_dtype(cfg) == "bfloat16", exact_sums)
    modes = quantize_modes(shape, cal, device, gpus, packed + fp16_rest, packed, gpu_mem, host_mem)
    one_gpu = gpu_mode(shape, cal, 1, packed + fp16_rest, packed).gpu_total or 0
    table = [{"gpu_gb": g, "run": {w.bits: _fits(w.run_bytes, g) for w in weights}, "quantize": _fits(one_gpu, g)}
             for g in GPU_SIZES_GB]
    return Estimate(model=label, source=source, path=path, shape=shape, params=params, weights=weights,
                    group_size=group_size, context=context, batch=batch, kv_cache_bytes=kv, samples=samples,
                    seq_len=seq_len, modes=modes, quantize_bits=qbits, gpu_mem=gpu_mem, host_mem=host_mem,
                    gpus=table, gptaq=gptaq, exact_sums=exact_sums,
                    experts=expert_estimate(shape, bits, group_size, expert_chunk, exact_sums))
