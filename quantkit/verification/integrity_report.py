"""What verify's integrity check found (`IntegrityReport`), and what a checkpoint without quantkit.json leaves
unchecked (`Unchecked`)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from quantkit.verification.compat import Limit, LoaderLimit

MAX_LISTED = 20  # problems of one kind listed individually before they are summarised


class Unchecked(enum.Enum):
    """What only quantkit.json records, and so goes unchecked in a checkpoint without one (another tool's)."""

    FILE_HASHES = "file_hashes"    # each file's sha256 and size
    BASE_MODEL = "base_model"      # the model it was quantized from
    CALIBRATION = "calibration"    # the calibration text and settings, and the per-layer GPTQ losses


UNCHECKED_WORDS = {Unchecked.FILE_HASHES: "each file's sha256", Unchecked.BASE_MODEL: "the base model it was made from",
                   Unchecked.CALIBRATION: "its calibration settings and per-layer losses"}


@dataclass
class IntegrityReport:
    path: str
    manifest: bool = False
    files_checked: int = 0
    quantization: dict | None = None   # bits, group_size, sym, desc_act, checkpoint_format
    quantized_modules: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    limits: list[LoaderLimit] = field(default_factory=list)  # known loader limits; their notes are in `notes`
    unchecked: list[Unchecked] = field(default_factory=list)  # what no manifest vouches for; said in `notes`
    settings_file: str | None = None  # where the quantization settings came from: config.json or quantize_config.json

    @property
    def ok(self) -> bool:
        return not self.errors

    def has_limit(self, kind: Limit) -> bool:
        return any(limit.kind is kind for limit in self.limits)

    def add_limits(self, limits: list[LoaderLimit]) -> None:
        """Record known loader limits and add their notes."""
        self.limits += limits
        self.notes += [limit.note for limit in limits]

    def to_dict(self) -> dict:
        return {"path": self.path, "manifest": self.manifest, "files_checked": self.files_checked,
                "quantization": self.quantization, "quantized_modules": self.quantized_modules,
                "errors": self.errors, "warnings": self.warnings, "notes": self.notes, "ok": self.ok,
                "unchecked": [u.value for u in self.unchecked], "settings_file": self.settings_file}
