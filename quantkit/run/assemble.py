"""The output directory assembled in staging from the finished steps: the shards (packed layers, and every other
base tensor as the output stores it), config files, the base's tokenizer files, the model card and the manifest."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path

import torch

from quantkit import __version__
from quantkit.config import CalibSpec, QuantSpec
from quantkit.errors import QuantkitError
from quantkit.run.model import Source
from quantkit.run.resume import RunState
from quantkit.run.step_report import without_timings
from quantkit.source.checkpoint import SafetensorsCheckpoint
from quantkit.source.hub import model_root
from quantkit.untrusted import inside, sha256_file
from quantkit.write.gptq_format import checkpoint_format, quantization_config
from quantkit.write.manifest import MANIFEST_NAME, write_manifest
from quantkit.write.model_card import render_model_card
from quantkit.write.shards import ShardWriter, write_json

# tokenizer, chat template and generation files carried over from the base model as they are
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
              "generation_config.json")
OUTPUT_DTYPE = torch.float16  # dtype of unquantized tensors in GPTQ checkpoints (what the kernels expect)


def side_files(model_dir: Path) -> list[Path]:
    """The tokenizer, chat template and generation files of the base that the output carries, each refused (one
    line) when it is a link leading outside the model: the base's folder, or for a hub-cache snapshot its repo
    folder (whose snapshot files are links to ../../blobs). A link to a file elsewhere would be published."""
    root = model_root(model_dir)
    found = []
    for name in SIDE_FILES:
        path = model_dir / name
        if path.is_symlink() and not inside(path, root):
            raise QuantkitError(f"{path} is a link to {path.resolve()}, outside the model; quantkit copies "
                                "only files that belong to the model into its output")
        if path.is_file():
            found.append(path)
    return found


@contextlib.contextmanager
def tokenizer_copy(model_dir: Path, config: dict) -> Iterator[Path]:
    """A private temporary folder holding the base's side files (side_files: each checked not to lead outside the
    model) and its checked config, for readers that open files of their own choosing and follow links
    (transformers' tokenizer, gguf's SpecialVocab): they read these copies and nothing else of the model's."""
    with tempfile.TemporaryDirectory(prefix="quantkit-tokenizer-") as folder:
        copy = Path(folder)
        for path in side_files(model_dir):
            shutil.copyfile(path, copy / path.name)
        write_json(copy / "config.json", config)
        yield copy


def write_shards(source: Source, state: RunState, steps: int, staging: Path, shard_bytes: int,
                 discarded: Collection[str] = frozenset()) -> int:
    """The finished steps' packed tensors, then every base tensor they do not replace (embeddings, norms, an
    unquantized lm_head, skipped Linears) in OUTPUT_DTYPE, streamed into shards: one step in memory at a time.
    Returns the bytes of weights written."""
    writer = ShardWriter(staging, shard_bytes)
    quantized: set[str] = set()  # base tensors replaced by packed ones; everything else is copied as it is
    for i in range(steps):
        tensors = state.layer_tensors(i)
        writer.add(tensors)
        quantized |= {f"{n.removesuffix('.qweight')}.{p}" for n in tensors if n.endswith(".qweight")
                      for p in ("weight", "bias")}
    for name in source.checkpoint.names():
        if name not in quantized and name not in discarded:
            writer.add({name: output_tensor(source.checkpoint, name)})
    source.unmap()
    writer.finish()
    return writer.total_bytes


def output_tensor(checkpoint: SafetensorsCheckpoint, name: str) -> torch.Tensor:
    """Base tensor `name` as the output holds it unquantized: floats in OUTPUT_DTYPE, refused (one line) when they
    are not finite there, whether the base holds NaN/Inf or values beyond float16's range."""
    if not checkpoint.is_floating(name):
        return checkpoint.get(name)
    tensor = checkpoint.get_as(name, OUTPUT_DTYPE)
    flat, step = tensor.reshape(-1), 4 << 20  # checked a block at a time: a small boolean temporary
    if not all(bool(torch.isfinite(flat[i:i + step]).all()) for i in range(0, flat.numel(), step)):
        raise _not_finite(checkpoint, name)
    return tensor


def check_output_tensors(source: Source, layers_prefix: str, discarded: Collection[str] = frozenset()) -> None:
    """What output_tensor would refuse among the tensors copied into the output as they are (all but the decoder
    layers'), found now, not after every layer ran: a block of rows at a time, so neither a tensor nor its
    conversion is ever held whole."""
    checkpoint = source.checkpoint
    for name in checkpoint.names():
        if name.startswith(layers_prefix + ".") or name in discarded:
            continue  # the layers' tensors are checked as each layer is read; the discarded are not written
        if checkpoint.is_floating(name) and not all(
                bool(torch.isfinite(block).all()) for _, block in checkpoint.blocks_as(name, OUTPUT_DTYPE)):
            raise _not_finite(checkpoint, name)


def _not_finite(checkpoint: SafetensorsCheckpoint, name: str) -> QuantkitError:
    """Why tensor `name` is not finite in OUTPUT_DTYPE: NaN/Inf in the base, or values beyond the dtype's range."""
    largest = 0.0
    for _, block in checkpoint.blocks_as(name, torch.float32):
        if not torch.isfinite(block).all():
            return QuantkitError(f"tensor {name} holds NaN or Inf values ({checkpoint.model_dir})")
        largest = max(largest, float(block.abs().max())) if block.numel() else largest
    return QuantkitError(f"tensor {name} holds values up to {largest:.4g}, beyond "
                         f"{str(OUTPUT_DTYPE).removeprefix('torch.')}'s range ({torch.finfo(OUTPUT_DTYPE).max:.0f}), "
                         "which GPTQ checkpoints store it in; rescale or skip this model")


def write_side_files(source: Source, spec: QuantSpec, calib: CalibSpec | None, staging: Path, repo_id: str | None,
                     reports: list[dict], weight_bytes: int, modules_in_block: list[list[str]] | None = None,
                     compute: dict | None = None) -> dict[str, str]:
    """config.json, quantize_config.json, tokenizer/generation files, model card and manifest beside the shards in
    `staging`; returns the sha256 of every file there. compute: where and in which dtype the calibration ran."""
    if not spec.is_bnb:  # bitsandbytes: save_pretrained wrote config.json with its own quantization_config
        qcfg = quantization_config(spec, __version__, modules_in_block)
        config = {k: v for k, v in source.config_dict.items() if k not in ("torch_dtype",)}
        config.update(dtype="float16", use_cache=True, quantization_config=qcfg)
        if spec.lm_head:
            config["tie_word_embeddings"] = False  # the head is now its own packed tensor
        write_json(staging / "config.json", config)
        write_json(staging / "quantize_config.json", qcfg)
    for path in side_files(source.model_dir):
        shutil.copyfile(path, staging / path.name)
    (staging / "README.md").write_text(render_model_card(
        repo_id=repo_id, source=source.label(), spec=spec, calib=calib, version=__version__,
        fmt=checkpoint_format(spec), layer_losses=[r for r in reports if r["losses"]], size_bytes=weight_bytes))
    hashes = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
    hashes[MANIFEST_NAME] = write_manifest(staging, source=source.label(),
                                           model_type=source.config_dict.get("model_type"), spec=spec, calib=calib,
                                           compute=compute, layers=[without_timings(r) for r in reports],
                                           hashes=hashes)
    return hashes
