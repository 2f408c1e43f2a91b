"""What verify reports: the pass criteria, the generations side by side, and the VerifyReport with its JSON form."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from quantkit import __version__
from quantkit.verification.integrity_report import IntegrityReport

# The ratio limit is the 10% a CI gate asks for; the KL and top-1 limits are set to reject checkpoints no better than
# round-to-nearest (docs/VERIFY.md has the measurements behind them). Small models lose the most at 4 bits, so
# larger models can be held to stricter values.
DEFAULT_MAX_PPL_RATIO = 1.10
DEFAULT_MAX_KL = 0.25
DEFAULT_MIN_TOP1 = 0.70
EVAL_SEQ_LEN = 512  # tokens per evaluation window
EVAL_MAX_TOKENS = 16384  # tokens evaluated at most (whole windows)
MAX_NEW_TOKENS = 32  # tokens generated per prompt
Progress = Callable[[str, int, int], None]  # progress(stage, done, total) during long steps


def no_progress(stage: str, done: int, total: int) -> None:
    """The progress callback that reports nothing."""


@dataclass(frozen=True)
class Thresholds:
    """Pass criteria; None disables one. KL applies to the mean over positions."""

    max_ppl_ratio: float | None = DEFAULT_MAX_PPL_RATIO
    max_kl: float | None = DEFAULT_MAX_KL
    min_top1: float | None = DEFAULT_MIN_TOP1


DEFAULT_THRESHOLDS = Thresholds()


@dataclass
class Generation:
    kind: str                      # "text" or "chat"
    prompt: str                    # the user's text (chat prompts: before the template)
    quantized: str
    base: str | None = None
    quantized_stop: str = ""       # "eos" or "length"
    base_stop: str | None = None
    match: bool | None = None      # identical token ids
    first_difference: int | None = None  # index of the first differing generated token


@dataclass
class VerifyReport:
    quantized: str
    quantized_path: str
    loader: str
    integrity: IntegrityReport
    thresholds: Thresholds
    format: str | None = None                 # formats.registry: None for an unquantized model
    eval: dict = field(default_factory=dict)
    base: str | None = None
    base_path: str | None = None
    base_origin: str | None = None            # "argument" or "manifest"
    quantized_ppl: float | None = None
    base_ppl: float | None = None
    ppl_ratio: float | None = None
    kl_mean: float | None = None
    kl_p99: float | None = None
    top1_agreement: float | None = None
    tokens: int = 0                           # predicted positions each metric averages over
    per_window: list[dict] = field(default_factory=list)
    kl_histogram: dict | None = None
    layers: list[dict] = field(default_factory=list)
    layer_errors: list[dict] = field(default_factory=list)  # streamed.py: per decoder layer, against the base
    generations: list[Generation] = field(default_factory=list)
    generation_config: dict = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    load: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        """JSON-ready (non-finite floats become null; the failures say why)."""
        load = self.load
        fields = {
            "quantkit_version": __version__,
            "passed": self.passed,
            "failures": self.failures,
            "quantized": {"model": self.quantized, "path": self.quantized_path, "loader": self.loader,
                          "format": self.format, "ppl": self.quantized_ppl, "load": load.get("quantized")},
            "base": {"model": self.base, "path": self.base_path, "origin": self.base_origin, "ppl": self.base_ppl,
                     "load": load.get("base")},
            "ppl_ratio": self.ppl_ratio,
            "kl_mean": self.kl_mean,
            "kl_p99": self.kl_p99,
            "top1_agreement": self.top1_agreement,
            "tokens": self.tokens,
            "eval": self.eval,
            "thresholds": asdict(self.thresholds),
            "integrity": self.integrity.to_dict(),
            "per_window": self.per_window,
            "kl_histogram": self.kl_histogram,
            "layers": self.layers,
            "layer_errors": self.layer_errors,
            "generation_config": self.generation_config,
            "generations": [asdict(g) for g in self.generations],
            "notes": self.notes,
            "seconds": self.seconds,
        }
        return {key: json_safe(value) for key, value in fields.items()}


def json_safe(obj: object) -> object:
    """obj with every non-finite float replaced by None, tuples as lists (JSON has neither NaN nor Inf)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
