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
Mixture-of-Experts (estimate_shape.MoEShape): parameters count every expert; "active" ones leave out the routed
experts a token does not run. A layer with experts holds one chunk of them in its layer term (they load a chunk
at a time, run/experts.py), and the experts' outputs summed per calibration token. A calibration pass sums
the Hessians of a chunk of its experts (memory/expert_chunks.py: --expert-chunk, or as many as
EXPERT_HESSIAN_BUDGET holds), each [in, in] of the widest expert input, in place of the dense forward's one
Hessian, beside the mini-batch's routed activation (4096 * active experts * expert intermediate * 4 bytes); the
chunk's experts are then solved one after another while the chunk's other Hessians wait. Where a model has both
kinds of layer, the peak is that of the kind that needs more.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from quantkit.calibrate.batch import MLP_BATCH_TOKENS
from quantkit.config import DEFAULT_ESTIMATE_BITS, ESTIMATE_BATCH, ESTIMATE_BITS, ESTIMATE_CONTEXT, CalibSpec, QuantSpec
from quantkit.errors import QuantkitError
from quantkit.memory import expert_chunks
from quantkit.solve.prepare import SHIFT_ROWS
from quantkit.tools.estimate_shape import LinearShape, ModelShape, count_params
from quantkit.untrusted import read_json

GIB = 2**30
GPU_SIZES_GB = (16, 24, 40, 48, 80)
OVERHEAD = 0.10           # CUDA context, allocator fragmentation, temporary buffers

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
    chunk_hessian_bytes: int        # that many float32 Hessians of the widest expert input

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
    quantize_peak: dict[str, int]   # layer_fp32, activations, hessian, mlp_activation, solve, total
    quantize_scratch_bytes: int = 0  # on disk, CPU runs only
    gpus: list[dict] = field(default_factory=list)   # {gpu_gb, run: {bits: bool}, quantize: bool}
    overhead: float = OVERHEAD
    gptaq: bool = False             # the quantize peak is that of quantize --gptaq
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
            "calibration": {"samples": self.samples, "seq_len": self.seq_len, "gptaq": self.gptaq},
            "quantize_peak": dict(self.quantize_peak),
            "quantize_peak_gib": self.quantize_peak["total"] / GIB,
            "quantize_scratch_disk_bytes": self.quantize_scratch_bytes,
            "gpus": [{**g, "run": {str(b): ok for b, ok in g["run"].items()}} for g in self.gpus],
            "overhead": self.overhead,
            "units": "bytes; *_gib = bytes / 2**30; a 'N GB' GPU is counted as N GiB",
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


def activation_bytes(config: dict) -> int:
    """Bytes per stored calibration activation: quantkit keeps them in the model's dtype when it is 16-bit."""
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float16")
    return 4 if dtype == "float32" else 2


def expert_pass(shape: ModelShape, chosen: int = 0) -> tuple[int, int]:
    """(experts per calibration pass, the bytes of their Hessians) of a layer with experts; `chosen` as
    QuantSpec.expert_chunk (0: as many as the budget holds)."""
    if shape.moe is None:
        return 0, 0
    widest = max(shape.hidden, shape.moe.expert_intermediate)
    chunk = expert_chunks.expert_chunk(shape.moe.experts, widest, chosen)
    return chunk, chunk * expert_chunks.expert_hessian_bytes(widest)


def _solve_floats(solves: list[tuple[int, int]], gptaq: bool) -> int:
    """Floats the largest of these GPTQ solves holds at once (module docstring); with GPTAQ, the cross term beside
    every phase, and while W is shifted, two blocks of rows times C."""
    if gptaq:
        return max(max(3 * k * k, 2 * k * k + n * k + n * k // 4 + 2 * min(n, SHIFT_ROWS) * k) for n, k in solves)
    return max(max(2 * k * k, k * k + n * k + n * k // 4) for n, k in solves)


def layer_peak_bytes(shape: ModelShape, experts: bool, samples: int, seq_len: int, act_bytes: int = 2,
                     gptaq: bool = False, chosen_chunk: int = 0) -> dict[str, int]:
    """The parts of quantkit's peak while quantizing a dense layer, or one with experts, and their total (module
    docstring). GPTAQ doubles the layer (its unquantized copy) and the activations (the unquantized model's), and
    sums a cross term of each Hessian's size beside it, which a solve holds throughout
    (gptq.gptq_quantize_shared's `cross`)."""
    streams, solves = (2 if gptaq else 1), shape.solves(experts)
    layer_params = sum(lin.params for lin in shape.layer_linears(experts)) + shape.layer_norm_params()
    hessian, solve = max(k for _, k in solves) ** 2 * 4, _solve_floats(solves, gptaq) * 4
    mlp_width, sums = shape.intermediate, 0
    if experts and shape.moe is not None:
        moe = shape.moe
        chunk, chunk_hessians = expert_pass(shape, chosen_chunk)
        # the experts load a chunk at a time (run/experts.py), and their outputs are summed per mini-batch in float32
        layer_params += chunk * sum(lin.params for lin in shape.expert_linears()) + shape.router_params()
        sums = streams * samples * seq_len * shape.hidden * 4
        hessian = max(hessian, chunk_hessians)
        mlp_width = max(moe.shared_intermediate, moe.active * moe.expert_intermediate)
        waiting = streams * (chunk_hessians - chunk_hessians // chunk)  # the chunk's other experts' Hessians
        solve = max(solve, _solve_floats(shape.expert_solves(), gptaq) * 4 + waiting)
    peak = {"layer_fp32": streams * layer_params * 4,
            "activations": streams * 2 * samples * seq_len * shape.hidden * act_bytes + sums,
            "hessian": streams * hessian,
            "mlp_activation": MLP_BATCH_TOKENS * mlp_width * 4,
            "solve": solve}
    peak["total"] = (peak["layer_fp32"] + peak["activations"]
                     + max(peak["hessian"] + peak["mlp_activation"], peak["solve"]))
    return peak


def quantize_peak_bytes(shape: ModelShape, samples: int, seq_len: int, act_bytes: int = 2,
                        gptaq: bool = False, chosen_chunk: int = 0) -> dict[str, int]:
    """The peak of the kind of decoder layer (dense, with experts) that needs more."""
    dense, sparse = shape.layer_counts()
    peaks = [layer_peak_bytes(shape, experts, samples, seq_len, act_bytes, gptaq, chosen_chunk)
             for experts, n in ((False, dense), (True, sparse)) if n]
    return max(peaks, key=lambda p: p["total"])


def quantize_scratch_bytes(shape: ModelShape, samples: int, seq_len: int, act_bytes: int = 2,
                           gptaq: bool = False) -> int:
    """Disk a CPU run borrows: the calibration activations, and per layer the widest Linear's inputs (float32,
    as the pipeline keeps them); GPTAQ keeps the unquantized model's of both too."""
    dense, sparse = shape.layer_counts()
    lins = (shape.layer_linears() if dense else []) + (
        shape.layer_linears(experts=True) + shape.expert_linears() if sparse else [])
    per_token = max(lin.in_features for lin in lins) * 4 + shape.hidden * act_bytes
    return (2 if gptaq else 1) * samples * seq_len * per_token


def expert_estimate(shape: ModelShape, bits: Iterable[int], group_size: int, chosen_chunk: int = 0
                    ) -> ExpertEstimate | None:
    """One routed expert's size at each width, and a calibration pass's experts; None for a dense model."""
    if shape.moe is None:
        return None
    lins = shape.expert_linears()
    chunk, hessians = expert_pass(shape, chosen_chunk)
    return ExpertEstimate(params=sum(lin.params for lin in lins),
                          bytes={b: sum(linear_bytes(lin, b, group_size) for lin in lins) for b in bits},
                          chunk=chunk, chunk_hessian_bytes=hessians)


def _fits(need: int, gpu_gb: int) -> bool:
    return need <= gpu_gb * GIB


def estimate(model_or_config: str | Path | dict, bits: Iterable[int] = DEFAULT_ESTIMATE_BITS,
             group_size: int = QuantSpec.group_size, context: int = ESTIMATE_CONTEXT, batch: int = ESTIMATE_BATCH,
             samples: int = CalibSpec.samples, seq_len: int = CalibSpec.seq_len, gptaq: bool = False,
             expert_chunk: int = QuantSpec.expert_chunk) -> Estimate:
    """Parameter count, weight memory per bit width, KV cache, quantize peak and GPU fit, from config.json alone.

    :param model_or_config: a directory with config.json, a config.json path, a repo id in the local hub cache,
        a built-in name (llama-2-7b, llama-2-70b, mistral-7b, llama-3-8b, qwen2.5-7b, smollm2-135m,
        qwen3-30b-a3b, mixtral-8x7b, deepseek-v3, ...) or a dict.
    :param gptaq: size the quantize peak of `quantize --gptaq`.
    :param expert_chunk: size the quantize peak of `quantize --expert-chunk N` (0: as many experts per pass as
        the Hessian budget holds).
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
    if expert_chunk < 0:
        raise QuantkitError(f"expert chunk must be 0 (automatic) or positive, got {expert_chunk}")
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
    peak = quantize_peak_bytes(shape, samples, seq_len, activation_bytes(cfg), gptaq, expert_chunk)
    quantize_need = math.ceil(peak["total"] * (1 + OVERHEAD))
    gpus = [{"gpu_gb": g, "run": {w.bits: _fits(w.run_bytes, g) for w in weights},
             "quantize": _fits(quantize_need, g)} for g in GPU_SIZES_GB]
    return Estimate(model=label, source=source, path=path, shape=shape, params=params, weights=weights,
                    group_size=group_size, context=context, batch=batch, kv_cache_bytes=kv, samples=samples,
                    seq_len=seq_len, quantize_peak=peak, gpus=gpus,
                    quantize_scratch_bytes=quantize_scratch_bytes(shape, samples, seq_len, activation_bytes(cfg),
                                                                          gptaq), gptaq=gptaq,
                    experts=expert_estimate(shape, bits, group_size, expert_chunk))
