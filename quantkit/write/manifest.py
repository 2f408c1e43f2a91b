"""The manifest quantkit writes beside every checkpoint it makes: what it was made from and how, and the sha256 and
size of every other file in the directory (verification/integrity.py checks them)."""
from __future__ import annotations

from pathlib import Path

from quantkit import __version__
from quantkit.config import CalibSpec, QuantSpec
from quantkit.untrusted import sha256_file
from quantkit.write.shards import write_json

MANIFEST_NAME = "quantkit.json"


def write_manifest(directory: Path, *, source: str, model_type: str | None, spec: QuantSpec,
                   calib: CalibSpec | None, compute: dict | None, layers: list[dict],
                   hashes: dict[str, str]) -> str:
    """MANIFEST_NAME in `directory`, beside the files `hashes` gives the sha256 of; returns the manifest's own.
    source: the base model as the user named it; compute: where and in which dtype the calibration ran (the last
    bits depend on it); layers: each step's report, without timings."""
    manifest = {
        "quantkit_version": __version__,
        "source": {"model": source, "model_type": model_type},
        "quantization": spec.to_dict(),
        "calibration": calib.__dict__ if spec.method == "gptq" and calib is not None else None,
        "compute": compute,
        "layers": layers,
        "files": {name: {"sha256": digest, "size": (directory / name).stat().st_size}
                  for name, digest in hashes.items()},
    }
    path = directory / MANIFEST_NAME
    write_json(path, manifest)
    return sha256_file(path)
