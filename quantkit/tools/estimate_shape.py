"""The numbers of a config.json that decide every size `estimate` computes: the Linears, norms and routers of each
kind of decoder layer (a dense MLP, or Mixture-of-Experts with routed and shared experts), with grouped-query or
DeepSeek's multi-head latent attention. What is counted is what transformers builds from the config."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from quantkit.errors import QuantkitError
from quantkit.untrusted import field, positive_int

_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_OPTIONAL = ("num_key_value_heads", "head_dim")  # positive integers where set (null: the defaults below)

# Mixture-of-Experts model types: the keys that may hold the routed experts' count (config.json's name first, then
# the one transformers' to_dict writes), and the key of each expert's intermediate size
MOE_KEYS: dict[str, tuple[tuple[str, ...], str]] = {
    "mixtral": (("num_local_experts", "num_experts"), "intermediate_size"),
    "olmoe": (("num_experts", "num_local_experts"), "intermediate_size"),
    "qwen2_moe": (("num_experts",), "moe_intermediate_size"),
    "qwen3_moe": (("num_experts", "num_local_experts"), "moe_intermediate_size"),
    "deepseek_v2": (("n_routed_experts", "num_experts"), "moe_intermediate_size"),
    "deepseek_v3": (("n_routed_experts", "num_local_experts"), "moe_intermediate_size"),
}
MLA_TYPES = ("deepseek_v2", "deepseek_v3")  # multi-head latent attention; first_k_dense_replace dense layers
SPARSE_STEP_TYPES = ("qwen2_moe", "qwen3_moe")  # experts every decoder_sparse_step layers, not in mlp_only_layers
_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


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
class MLAShape:
    """DeepSeek's multi-head latent attention: queries through a rank-q_lora_rank projection (0: q_proj reads the
    hidden states), keys and values from a rank-kv_lora_rank latent, which with the rotary part is what the KV
    cache holds."""

    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class MoEShape:
    """`moe_layers` decoder layers hold a router [experts, hidden], `experts` routed experts (gate/up/down of
    expert_intermediate) of which `active` run per token, and a shared expert MLP of shared_intermediate (0: none;
    Qwen2-MoE's is scaled by a [1, hidden] gate); the model's other layers hold a dense MLP."""

    experts: int
    active: int
    expert_intermediate: int
    moe_layers: int
    shared_intermediate: int = 0
    shared_gate: bool = False


def _count(cfg: dict, key: str, where: str) -> int:
    value = field(cfg, key, int, where)
    if value < 0:
        raise QuantkitError(f"{where}: {key!r} is {value}, expected an integer >= 0")
    return value


def _sparse_step_layers(cfg: dict, layers: int, where: str) -> int:
    """Qwen-MoE: how many of the layers hold experts, layer i when (i + 1) % decoder_sparse_step == 0 and i is not
    in mlp_only_layers."""
    step = positive_int(cfg, "decoder_sparse_step", where) if cfg.get("decoder_sparse_step") is not None else 1
    only = field(cfg, "mlp_only_layers", list, where) if cfg.get("mlp_only_layers") is not None else []
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
        raise QuantkitError(f"{where}: 'mlp_only_layers' must list layer indexes (integers)")
    dense = {i for i in only if 0 <= i < layers and (i + 1) % step == 0}
    return layers // step - len(dense)


def moe_from_config(cfg: dict, model_type: str, layers: int, where: str) -> MoEShape | None:
    """The experts of a Mixture-of-Experts config, None for a dense one; a config with an experts count whose
    model_type estimate cannot lay out is refused rather than counted as dense."""
    if model_type not in MOE_KEYS:
        named = [k for k in _EXPERT_COUNT_KEYS if isinstance(cfg.get(k), int) and cfg[k] > 0]
        if named:
            raise QuantkitError(f"{where}: {named[0]!r} says model_type {model_type!r} has experts, and estimate "
                                f"knows the experts of {', '.join(MOE_KEYS)} only")
        return None
    count_keys, width_key = MOE_KEYS[model_type]
    experts = positive_int(cfg, next((k for k in count_keys if cfg.get(k) is not None), count_keys[0]), where)
    active = positive_int(cfg, "num_experts_per_tok", where)
    if active > experts:
        raise QuantkitError(f"{where}: 'num_experts_per_tok' ({active}) exceeds the {experts} experts")
    width = positive_int(cfg, width_key, where)
    moe_layers, shared = layers, 0
    if model_type in MLA_TYPES:
        moe_layers = max(0, layers - _count(cfg, "first_k_dense_replace", where))
        shared = _count(cfg, "n_shared_experts", where) * width
    elif model_type in SPARSE_STEP_TYPES:
        moe_layers = _sparse_step_layers(cfg, layers, where)
        if model_type == "qwen2_moe":
            shared = _count(cfg, "shared_expert_intermediate_size", where)
    return MoEShape(experts=experts, active=active, expert_intermediate=width, moe_layers=moe_layers,
                    shared_intermediate=shared, shared_gate=model_type == "qwen2_moe")


def mla_from_config(cfg: dict, model_type: str, where: str) -> MLAShape | None:
    if model_type not in MLA_TYPES:
        return None
    q_lora = positive_int(cfg, "q_lora_rank", where) if cfg.get("q_lora_rank") is not None else 0
    dims = {k: positive_int(cfg, k, where) for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                                    "v_head_dim")}
    return MLAShape(q_lora_rank=q_lora, **dims)


def mlp_linears(prefix: str, hidden: int, intermediate: int, bias: bool = False) -> list[LinearShape]:
    return [LinearShape(f"{prefix}.gate_proj", hidden, intermediate, bias),
            LinearShape(f"{prefix}.up_proj", hidden, intermediate, bias),
            LinearShape(f"{prefix}.down_proj", intermediate, hidden, bias)]


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a config that decide every size: a Llama-family decoder, with experts (`moe`) and latent
    attention (`mla`) where the config has them."""

    model_type: str
    hidden: int
    intermediate: int               # the dense MLP's (the layers without experts)
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
    moe: MoEShape | None = None
    mla: MLAShape | None = None

    @classmethod
    def from_config(cls, cfg: dict, where: str = "config") -> ModelShape:
        """The shape of a config; `where` (the config's file) names it in a one-line error when a size is missing
        or is not a positive integer, or when the heads do not divide the hidden size that head_dim is derived
        from."""
        if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):
            cfg = {**cfg["text_config"], "tie_word_embeddings": cfg.get("tie_word_embeddings",
                                                                        cfg["text_config"].get("tie_word_embeddings"))}
        missing = [k for k in _REQUIRED if cfg.get(k) is None]
        if missing:
            raise QuantkitError(f"config lacks {', '.join(missing)} (model_type {cfg.get('model_type')!r}); estimate "
                                "understands Llama-family configs (llama, mistral, qwen2, qwen3, ...) and their "
                                f"Mixture-of-Experts kin ({', '.join(MOE_KEYS)})")
        for key in (*_REQUIRED, *(k for k in _OPTIONAL if cfg.get(k) is not None)):
            positive_int(cfg, key, where)
        model_type = str(cfg.get("model_type") or "llama")
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        mla = mla_from_config(cfg, model_type, where)
        if mla is None and cfg.get("head_dim") is None and cfg["hidden_size"] % heads:
            raise QuantkitError(f"{where}: 'num_attention_heads' ({heads}) does not divide 'hidden_size' "
                                f"({cfg['hidden_size']}), and there is no 'head_dim'")
        head_dim = (mla.qk_nope_head_dim + mla.qk_rope_head_dim if mla is not None
                    else cfg.get("head_dim") or cfg["hidden_size"] // heads)
        attention_bias = bool(cfg.get("attention_bias", False))
        qkv_bias = bool(cfg.get("qkv_bias", True)) if model_type == "qwen2_moe" else attention_bias
        tied = cfg.get("tie_word_embeddings")
        return cls(model_type=model_type, hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"],
                   layers=cfg["num_hidden_layers"], heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                   vocab=cfg["vocab_size"], tied=bool(tied) if tied is not None else False,
                   qkv_bias=qkv_bias or model_type == "qwen2", o_bias=attention_bias,
                   mlp_bias=bool(cfg.get("mlp_bias", False)),
                   qk_norm=model_type in ("qwen3", "qwen3_moe", "olmoe"),
                   moe=moe_from_config(cfg, model_type, cfg["num_hidden_layers"], where), mla=mla)

    def layer_counts(self) -> tuple[int, int]:
        """(dense layers, layers with experts)."""
        sparse = self.moe.moe_layers if self.moe is not None else 0
        return self.layers - sparse, sparse

    def attention_linears(self) -> list[LinearShape]:
        h = self.hidden
        if self.mla is None:
            q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
            return [LinearShape("self_attn.q_proj", h, q, self.qkv_bias),
                    LinearShape("self_attn.k_proj", h, kv, self.qkv_bias),
                    LinearShape("self_attn.v_proj", h, kv, self.qkv_bias),
                    LinearShape("self_attn.o_proj", q, h, self.o_bias)]
        m, q = self.mla, self.heads * self.head_dim
        query = ([LinearShape("self_attn.q_a_proj", h, m.q_lora_rank, self.qkv_bias),
                  LinearShape("self_attn.q_b_proj", m.q_lora_rank, q)] if m.q_lora_rank
                 else [LinearShape("self_attn.q_proj", h, q)])
        return [*query,
                LinearShape("self_attn.kv_a_proj_with_mqa", h, m.kv_lora_rank + m.qk_rope_head_dim, self.qkv_bias),
                LinearShape("self_attn.kv_b_proj", m.kv_lora_rank,
                            self.heads * (m.qk_nope_head_dim + m.v_head_dim)),
                LinearShape("self_attn.o_proj", self.heads * m.v_head_dim, h, self.o_bias)]

    def layer_linears(self, experts: bool = False) -> list[LinearShape]:
        """The Linear modules of one decoder layer, as quantkit quantizes them: attention, then the dense MLP, or
        in a layer with experts the shared expert's (the routed experts apart: expert_linears)."""
        if not experts:
            return self.attention_linears() + mlp_linears("mlp", self.hidden, self.intermediate, self.mlp_bias)
        shared = self.moe.shared_intermediate if self.moe is not None else 0
        return self.attention_linears() + (mlp_linears("mlp.shared_expert", self.hidden, shared, self.mlp_bias)
                                           if shared else [])

    def expert_linears(self) -> list[LinearShape]:
        """One routed expert's gate/up/down (none in a dense model)."""
        return [] if self.moe is None else mlp_linears("mlp.experts", self.hidden, self.moe.expert_intermediate)

    def router_params(self) -> int:
        """The float parameters routing one layer's tokens: the router and Qwen2-MoE's shared expert gate."""
        if self.moe is None:
            return 0
        return self.moe.experts * self.hidden + (self.hidden if self.moe.shared_gate else 0)

    def layer_norm_params(self) -> int:
        mla = self.mla.kv_lora_rank + self.mla.q_lora_rank if self.mla is not None else 0
        if not self.qk_norm:
            return 2 * self.hidden + mla
        if self.model_type == "olmoe":  # q_norm over all heads, k_norm over the KV heads (of hidden // heads each)
            return 3 * self.hidden + self.hidden // self.heads * self.kv_heads
        return 2 * self.hidden + 2 * self.head_dim

    def solves(self, experts: bool = False) -> list[tuple[int, int]]:
        """(rows, in_features) of each GPTQ solve of a layer (`experts`: of one with experts, the routed ones
        apart): Linears that read one input are solved stacked (q/k/v, gate/up, MLA's q_a/kv_a), so each distinct
        input is one solve."""
        stacked: dict[tuple[str, int], int] = {}
        for lin in self.layer_linears(experts):
            block, name = lin.name.rsplit(".", 1)
            reads_hidden = name in ("q_proj", "k_proj", "v_proj", "q_a_proj", "kv_a_proj_with_mqa", "gate_proj",
                                    "up_proj")
            key = (block if reads_hidden else lin.name, lin.in_features)
            stacked[key] = stacked.get(key, 0) + lin.out_features
        return [(rows, k) for (_, k), rows in stacked.items()]

    def expert_solves(self) -> list[tuple[int, int]]:
        """(rows, in_features) of one routed expert's solves: gate/up stacked, then down."""
        if self.moe is None:
            return []
        return [(2 * self.moe.expert_intermediate, self.hidden), (self.hidden, self.moe.expert_intermediate)]

    def to_dict(self) -> dict:
        """The fields; moe and mla only where the config has them."""
        return {k: v for k, v in asdict(self).items() if v is not None or k not in ("moe", "mla")}


def count_params(shape: ModelShape) -> dict[str, int]:
    """Parameters by part, as transformers builds them; a Mixture-of-Experts model's also its routed experts and
    routers, and those a token runs ("active": all but the routed experts it is not sent to)."""
    dense, sparse = shape.layer_counts()
    kinds = [(dense, shape.layer_linears()), (sparse, shape.layer_linears(experts=True))]
    attention = sum(n * sum(lin.params for lin in lins if lin.name.startswith("self_attn.")) for n, lins in kinds)
    mlp = sum(n * sum(lin.params for lin in lins if lin.name.startswith("mlp.")) for n, lins in kinds)
    norms = shape.layers * shape.layer_norm_params() + shape.hidden   # + the final norm
    embeddings = shape.vocab * shape.hidden
    lm_head = 0 if shape.tied else shape.vocab * shape.hidden
    params = {"embeddings": embeddings, "lm_head": lm_head, "attention": attention, "mlp": mlp}
    expert = sum(lin.params for lin in shape.expert_linears())
    if shape.moe is not None:
        params.update(experts=sparse * shape.moe.experts * expert, routers=sparse * shape.router_params())
    params.update(norms=norms, total=sum(params.values()) + norms)
    if shape.moe is not None:
        params["active"] = params["total"] - sparse * (shape.moe.experts - shape.moe.active) * expert
    return params
