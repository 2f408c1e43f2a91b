"""compressed-tensors (quantkit/formats/compressed_tensors.py): weights compressed by compressed-tensors' own
compressors dequantize to what its own decompression computes, bit for bit: on random tensors for every format,
strategy and scale dtype quantkit reads, and on a tiny Llama compressed and saved as llm-compressor does
(ModelCompressor.compress_model, save_pretrained, update_config); transformers loads those checkpoints on CPU with
the perplexity of quantkit's float model; damaged copies and unsupported settings fail with one line."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

ct = pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors import BaseCompressor, ModelCompressor  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
)
from compressed_tensors.quantization.utils import calculate_qparams, maybe_pad_tensor_for_block_quant  # noqa: E402
from conftest import float_model, make_tiny_model, nll  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from quantkit.errors import QuantkitError  # noqa: E402
from quantkit.formats import compressed_tensors  # noqa: E402
from quantkit.formats.registry import detect_format, open_view  # noqa: E402

A = QuantizationArgs
# transformers says so whenever from_pretrained is given loading attributes (dequantize) for a quantized checkpoint
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
MODULE = "model.layers.0.mlp.up_proj"


def min_max(weight: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """The ranges a min-max observer records for one weight under `args` (llm-compressor's default observer)."""
    if args.strategy == "group":
        x = weight.unflatten(-1, (-1, args.group_size))
        return x.amin(-1), x.amax(-1)
    if args.strategy == "channel":
        return weight.amin(1, keepdim=True), weight.amax(1, keepdim=True)
    if args.strategy == "block":
        rows, cols = args.block_structure
        x = maybe_pad_tensor_for_block_quant(weight, (rows, cols))
        x = x.reshape(x.shape[0] // rows, rows, x.shape[1] // cols, cols)
        return x.amin((1, 3)), x.amax((1, 3))
    return weight.amin(), weight.amax()


def compress(fmt: str, args: QuantizationArgs, weight: torch.Tensor, activations=None):
    """(stored tensors, scheme) for one weight, through compressed-tensors' own qparams and compressor."""
    scheme = QuantizationScheme(targets=["Linear"], weights=args, input_activations=activations, format=fmt)
    scale, zero_point = calculate_qparams(*min_max(weight.float(), args), args)
    state = {"weight": weight, "weight_scale": scale.to(weight.dtype)}
    if not args.symmetric:
        state["weight_zero_point"] = zero_point.to(torch.int8)
    return BaseCompressor.get_value_from_registry(fmt).compress(state, scheme), scheme


def decompress(stored: dict, scheme: QuantizationScheme) -> torch.Tensor:
    return BaseCompressor.get_value_from_registry(scheme.format).decompress(dict(stored), scheme)["weight"]


def qcfg_of(scheme: QuantizationScheme, **extra) -> dict:
    config = QuantizationConfig(config_groups={"group_0": scheme}, format=scheme.format,
                                quantization_status="compressed", ignore=["lm_head"])
    return {**config.model_dump(), **extra}


CASES = [
    ("pack-quantized", A(num_bits=4, symmetric=True, strategy="group", group_size=32), (48, 128)),
    ("pack-quantized", A(num_bits=4, symmetric=False, strategy="group", group_size=32), (48, 128)),
    ("pack-quantized", A(num_bits=8, symmetric=False, strategy="channel"), (40, 64)),
    ("pack-quantized", A(num_bits=3, symmetric=False, strategy="group", group_size=32), (50, 96)),
    ("pack-quantized", A(num_bits=2, symmetric=True, strategy="channel"), (16, 64)),
    ("pack-quantized", A(num_bits=4, symmetric=False, strategy="tensor"), (16, 64)),
    ("pack-quantized", A(num_bits=4, symmetric=True, strategy="block", block_structure=[16, 32]), (40, 96)),
    ("naive-quantized", A(num_bits=8, symmetric=True, strategy="tensor"), (16, 64)),
    ("naive-quantized", A(num_bits=8, symmetric=False, strategy="group", group_size=16), (16, 64)),
    ("int-quantized", A(num_bits=8, symmetric=True, strategy="channel"), (24, 64)),
    ("float-quantized", A(num_bits=8, type="float", strategy="channel"), (24, 64)),
    ("float-quantized", A(num_bits=8, type="float", strategy="tensor"), (24, 64)),
    ("float-quantized", A(num_bits=8, type="float", strategy="block", block_structure=[32, 32]), (70, 100)),
    ("naive-quantized", A(num_bits=8, type="float", strategy="group", group_size=32), (24, 64)),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fmt, args, shape", CASES,
                         ids=[f"{f}-{getattr(a.type, 'value', a.type)}{a.num_bits}-{a.strategy}-"
                              f"{'sym' if a.symmetric else 'asym'}" for f, a, _ in CASES])
def test_random_tensors_equal_compressed_tensors_decompression(fmt, args, shape, dtype):
    weight = (torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0])) * 0.05).to(dtype)
    stored, scheme = compress(fmt, args, weight)
    layout = compressed_tensors.layout(qcfg_of(scheme))
    got = layout.dequantize(dict(stored))
    assert got.dtype == torch.float32 and torch.equal(got, decompress(stored, scheme).float())
    assert layout.weight_shape({k: tuple(v.shape) for k, v in stored.items()}) == shape
    assert layout.settings["activations_quantized"] is False


def test_group_order_from_weight_g_idx():
    """actorder "group" (compressed-tensors before 0.20 wrote weight_g_idx, 0.20 refuses the setting): input i takes
    the scale of group g_idx[i]. Older compressed-tensors computed this by sorting the inputs by group, running the
    contiguous-group dequantization and unsorting, which is the reference here, through 0.20's own decompress."""
    g = torch.Generator().manual_seed(0)
    n_out, n_in, size = 32, 128, 32
    g_idx = torch.randperm(n_in, generator=g) // size                                 # each group: 32 scattered inputs
    perm = torch.argsort(g_idx)
    weight = torch.randn(n_out, n_in, generator=g).to(torch.bfloat16)
    args = A(num_bits=4, symmetric=False, strategy="group", group_size=size)
    stored, scheme = compress("pack-quantized", args, weight[:, perm])               # groups contiguous once sorted
    reference = decompress(stored, scheme)[:, torch.argsort(perm)]
    codes = compressed_tensors.unpack_rows(stored["weight_packed"], 4, n_in) + 8
    stored["weight_packed"] = pack_codes(codes[:, torch.argsort(perm)])             # on disk in column order
    stored["weight_g_idx"] = g_idx.to(torch.int32)
    qcfg = qcfg_of(scheme)
    qcfg["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    layout = compressed_tensors.layout(qcfg)
    assert torch.equal(layout.dequantize(dict(stored)), reference.float())
    stored["weight_g_idx"] = torch.full((n_in,), -1, dtype=torch.int32)             # never set: column order
    column_order = {k: v for k, v in stored.items() if k != "weight_g_idx"}
    assert torch.equal(layout.dequantize(dict(stored)), decompress(column_order, scheme).float())


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit codes [rows, cols] -> int32 words, eight a word, low nibble first (pack-quantized's layout)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32((codes - 8).to(torch.int8), 4)


# --- a tiny Llama compressed by compressed-tensors and saved as llm-compressor saves it -----------------------------

SCHEMES = {
    "w4a16-asym": dict(weights=A(num_bits=4, symmetric=False, strategy="group", group_size=32)),
    "w4a16-sym": dict(weights=A(num_bits=4, symmetric=True, strategy="group", group_size=32)),
    "w8a8-int": dict(weights=A(num_bits=8, symmetric=True, strategy="channel"),
                     input_activations=A(num_bits=8, symmetric=True, strategy="token", dynamic=True)),
    "fp8-block": dict(weights=A(num_bits=8, type="float", strategy="block", block_structure=[32, 32]),
                      input_activations=A(num_bits=8, type="float", strategy="group", group_size=32, dynamic=True)),
}
FORMATS = {"w4a16-asym": "pack-quantized", "w4a16-sym": "pack-quantized", "w8a8-int": "int-quantized",
           "fp8-block": "float-quantized"}


def llm_compressor_save(base: Path, out: Path, scheme: dict) -> Path:
    """llm-compressor's steps with compressed-tensors' APIs: apply the scheme, set each weight's qparams from its
    range (min-max observer), then save_pretrained_wrapper's compress_model, save_pretrained, update_config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], **scheme)},
                                ignore=["lm_head"])
    apply_quantization_config(model, config)
    for module in model.modules():
        args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
        if args is not None:
            scale, zero_point = calculate_qparams(*min_max(module.weight.data.float(), args), args)
            module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data = zero_point.to(module.weight_zero_point.dtype).reshape(
                    module.weight_zero_point.shape)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def artifacts(tiny_tokenizer, tmp_path_factory) -> dict[str, Path]:
    # a wider init gives peaked logits, so that a wrong dequantization shows in the perplexity
    base = make_tiny_model(tmp_path_factory.mktemp("ct-base"), tiny_tokenizer, initializer_range=0.2)
    root = tmp_path_factory.mktemp("ct")
    return {name: llm_compressor_save(base, root / name, scheme) for name, scheme in SCHEMES.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCHEMES))
def test_tiny_llama_reads_bit_for_bit(artifacts, name):
    path = artifacts[name]
    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert detect_format(path) == "compressed-tensors" and qcfg["format"] == FORMATS[name]
    view, stored = open_view(path, "compressed-tensors"), load_file(path / "model.safetensors")
    assert view.layout.settings["activations_quantized"] is ("input_activations" in SCHEMES[name])
    assert len(view.modules) == 14
    scheme = QuantizationConfig.model_validate(qcfg).config_groups["group_0"]
    for module in view.modules:
        local = {n[len(module) + 1:]: t for n, t in stored.items() if n.rpartition(".")[0] == module}
        assert torch.equal(view.get(f"{module}.weight"), decompress(local, scheme).float()), module
    if FORMATS[name] == "pack-quantized":  # the checkpoint-level dequantizer (it matches unpacked formats by name,
        from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

        whole = CompressedTensorsDequantizer(path, dtype=torch.float32).process(dict(stored))  # embeddings too)
        assert sorted(whole) == sorted(view.names())
        assert all(torch.equal(view.get(n), whole[n].to(view.get(n).dtype)) for n in whole)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCHEMES))
def test_view_model_perplexity_matches_transformers(artifacts, name):
    """transformers dequantizes while loading (CompressedTensorsConfig(dequantize=True)): weight-only, as quantkit
    reads it. Its default path keeps the weights compressed until the first forward and quantizes activations too;
    it cannot load the asymmetric pack-quantized checkpoint (compressed-tensors 0.20.1 compresses the empty model's
    zero points without packing them, so their shapes disagree with the file's)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    path = artifacts[name]
    hf = AutoModelForCausalLM.from_pretrained(path, device_map="cpu",
                                              quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    ids = torch.randint(3, 500, (4, 64), generator=torch.Generator().manual_seed(1))
    ours, theirs = nll(float_model(path, "compressed-tensors"), ids), nll(hf, ids)
    assert abs(math.exp(ours - theirs) - 1) < 0.01, (math.exp(ours), math.exp(theirs))
    if name == "w4a16-sym":  # the default path: compressed modules, decompressed by a hook on the first forward
        default = AutoModelForCausalLM.from_pretrained(path, device_map="cpu").eval()
        assert abs(math.exp(ours - nll(default, ids)) - 1) < 0.01


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def damaged(path: Path, tmp_path: Path, change) -> Path:
    copy = shutil.copytree(path, tmp_path / "damaged")
    tensors = load_file(copy / "model.safetensors")
    change(tensors)
    save_file(tensors, copy / "model.safetensors")
    return copy


@pytest.mark.slow
def test_scales_of_the_wrong_shape(artifacts, tmp_path):
    path = damaged(artifacts["w4a16-asym"], tmp_path,
                   lambda t: t.__setitem__(f"{MODULE}.weight_scale", t[f"{MODULE}.weight_scale"][:, :1].contiguous()))
    with pytest.raises(QuantkitError) as e:
        open_view(path, "compressed-tensors").get(f"{MODULE}.weight")
    assert one_line(e) == (f"{MODULE}: weight_packed is [128, 8], but weight_scale [128, 1] implies 32 inputs of 4 "
                           "bits")


@pytest.mark.slow
def test_a_missing_zero_point(artifacts, tmp_path):
    path = damaged(artifacts["w4a16-asym"], tmp_path, lambda t: t.pop(f"{MODULE}.weight_zero_point"))
    with pytest.raises(QuantkitError) as e:
        open_view(path, "compressed-tensors").get(f"{MODULE}.weight")
    assert one_line(e) == f"{MODULE}: weight_zero_point is missing (the config says symmetric: false)"


@pytest.mark.slow
def test_a_missing_weight_shape(artifacts, tmp_path):
    path = damaged(artifacts["w4a16-sym"], tmp_path, lambda t: t.pop(f"{MODULE}.weight_shape"))
    with pytest.raises(QuantkitError) as e:
        open_view(path, "compressed-tensors")
    assert one_line(e) == (f"tensor {MODULE}.weight_shape is missing from the checkpoint (compressed-tensors stores "
                           "weight_packed, weight_scale, weight_shape for each quantized Linear)")


def test_int8_codes_out_of_range():
    args = A(num_bits=4, symmetric=True, strategy="channel")  # an int4 scheme that stores int8 weights
    stored, scheme = compress("naive-quantized", args, torch.randn(8, 32))
    stored["weight"][0, 0] = 9
    with pytest.raises(ValueError, match=r"^weight holds codes outside int4's \[-8, 7\]$"):
        compressed_tensors.layout(qcfg_of(scheme)).dequantize(dict(stored))


def group(weights: dict | None = None, **extra) -> dict:
    base = {"targets": ["Linear"], "format": "pack-quantized", "input_activations": None, "output_activations": None,
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128,
                        "dynamic": False, **(weights or {})}}
    return {**base, **extra}


def config(groups: dict | None = None, **extra) -> dict:
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": groups or {"group_0": group()}, "ignore": ["lm_head"], "kv_cache_scheme": None, **extra}


G0 = "quantization_config.config_groups.group_0"


@pytest.mark.parametrize("qcfg, message", [
    (config(quantization_status="frozen"), "quantization_config.quantization_status = 'frozen': quantkit reads "
     "'compressed' checkpoints only (the others store float weights that are not yet packed)"),
    (config({"group_0": group(format="nvfp4-pack-quantized")}), f"{G0}.weights: format 'nvfp4-pack-quantized' is not "
     "one quantkit reads (pack-quantized, int-quantized, float-quantized, naive-quantized)"),
    (config({"group_0": group({"num_bits": 16})}), f"{G0}.weights.num_bits = 16: quantkit reads int weights of 2 to 8 "
     "bits"),
    (config({"group_0": group({"strategy": "tensor_group"})}), f"{G0}.weights.strategy = 'tensor_group': quantkit "
     "reads tensor, channel, group, block weights"),
    (config({"group_0": group({"dynamic": True})}), f"{G0}.weights.dynamic = True: weights are quantized once, not "
     "dynamically"),
    (config({"group_0": group({"strategy": "channel", "actorder": "group", "group_size": None})}),
     f"{G0}.weights.actorder = 'group' needs strategy group, not channel"),
    (config({"group_0": group({"strategy": "block"})}), f"{G0}.weights.block_structure = None with strategy block: "
     "strategy block needs two positive integers, the others none"),
    (config({"group_0": group(), "group_1": group({"num_bits": 8})}), "quantization_config.config_groups: group_1 "
     "and group_0 quantize weights differently (num_bits 8 vs 4); quantkit reads checkpoints whose quantized Linears "
     "share one weights scheme"),
    (config({"W4A16": ["Linear"]}), "quantization_config.config_groups.W4A16 is ['Linear'], not a scheme (quantkit "
     "does not expand preset names)"),
    (config({"group_0": {**group(), "weights": None}}), "quantization_config.config_groups: no group "
     "quantizes weights"),
    (config(transform_config={"config_groups": {"R1": {}}}), "quantization_config.transform_config holds rotations, "
     "which quantkit does not apply"),
    (config(sparsity_config={"format": "sparse-24-bitmask"}), "quantization_config.sparsity_config.format = "
     "'sparse-24-bitmask': quantkit does not read sparse compressed-tensors checkpoints"),
])
def test_unsupported_settings_are_refused(qcfg, message):
    with pytest.raises(QuantkitError) as e:
        compressed_tensors.layout(qcfg)
    assert one_line(e) == message


def test_activation_and_kv_cache_quantization_are_flagged():
    int8 = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    w8a8 = compressed_tensors.layout(config({"group_0": group(input_activations=int8)}))
    kv = compressed_tensors.layout(config(kv_cache_scheme={"num_bits": 8, "type": "float", "strategy": "tensor"}))
    plain = compressed_tensors.layout(config())
    assert (w8a8.settings["activations_quantized"], w8a8.settings["kv_cache_quantized"]) == (True, False)
    assert (kv.settings["activations_quantized"], kv.settings["kv_cache_quantized"]) == (True, True)
    assert (plain.settings["activations_quantized"], plain.settings["kv_cache_quantized"]) == (False, False)
    assert "input_scale" in w8a8.optional  # static activation scales are read past, not passed to the float model


def test_packed_inputs_that_do_not_fill_the_last_word_are_refused():
    """Without groups the headers give in_features only up to the last word's spare codes: weight_shape decides."""
    stored, scheme = compress("pack-quantized", A(num_bits=4, symmetric=True, strategy="channel"), torch.randn(8, 36))
    layout = compressed_tensors.layout(qcfg_of(scheme))
    assert layout.weight_shape({k: tuple(v.shape) for k, v in stored.items()}) == (8, 40)
    with pytest.raises(ValueError, match=r"^weight_shape says \[8, 36\], its packed width and scales imply \[8, 40\] "
                                         r"\(without groups quantkit reads in_features that fill whole int32 words\)$"):
        layout.dequantize(dict(stored))


@pytest.mark.slow
def test_a_scale_changed_to_nan(artifacts, tmp_path):
    def poison(t):
        t[f"{MODULE}.weight_scale"][3, 1] = float("nan")

    path = damaged(artifacts["fp8-block"], tmp_path, poison)
    with pytest.raises(QuantkitError) as e:
        open_view(path, "compressed-tensors").get(f"{MODULE}.weight")
    assert one_line(e) == f"{MODULE}: its compressed-tensors tensors dequantize to NaN or Inf values"


def test_zero_points_of_a_symmetric_scheme_must_be_zero():
    """Older compressed-tensors stored symmetric schemes' (zero) zero points too: read past, unless they are not zero."""
    stored, scheme = compress("int-quantized", A(num_bits=8, symmetric=True, strategy="channel"), torch.randn(8, 32))
    layout = compressed_tensors.layout(qcfg_of(scheme))
    expected = layout.dequantize(dict(stored))
    stored["weight_zero_point"] = torch.zeros(8, 1, dtype=torch.int8)
    assert torch.equal(layout.dequantize(dict(stored)), expected)
    stored["weight_zero_point"][2] = 1
    with pytest.raises(ValueError, match=r"^weight_zero_point holds non-zero values, but the config says "
                                         r"symmetric: true$"):
        layout.dequantize(dict(stored))
