"""Fine-grained FP8 (quantkit/formats/fp8.py): weights quantized by transformers' own FP8 quantize op
(integrations/finegrained_fp8.py Fp8Quantize, which FineGrainedFP8Config runs while loading; that path needs a GPU,
the op itself runs on CPU) dequantize to what transformers' Fp8Dequantize computes, bit for bit, on random tensors
and on a tiny Llama; transformers loads that checkpoint on CPU with the same weights and perplexity; damaged copies and
unsupported settings fail with one line naming the tensor or the key."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import float_model, make_tiny_model, nll
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, FineGrainedFP8Config
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize
from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

from quantkit.errors import QuantkitError
from quantkit.formats import fp8
from quantkit.formats.registry import detect_format, open_view

MODULE = "model.layers.0.mlp.up_proj"


def transformers_quantize(config: FineGrainedFP8Config, name: str, weight: torch.Tensor) -> dict:
    """{name: fp8 weight, <module>.weight_scale_inv: scales} as transformers' quantizer writes one weight."""
    return Fp8Quantize(FineGrainedFP8HfQuantizer(config)).convert({name: weight})


def transformers_dequantize(config: FineGrainedFP8Config, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Fp8Dequantize's per-weight step (what loading on CPU runs), asked for float32."""
    return Fp8Dequantize(FineGrainedFP8HfQuantizer(config))._dequantize_one(weight, scale, output_dtype=torch.float32)


def qcfg_of(config: FineGrainedFP8Config) -> dict:
    return json.loads(config.to_json_string())


@pytest.mark.parametrize("block, scale_fmt, shape", [
    ([128, 128], "float", (256, 384)), ([32, 32], "float", (64, 96)), ([16, 32], "ue8m0", (64, 64)),
    (None, "float", (48, 64))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_random_tensors_equal_transformers_dequantization(block, scale_fmt, shape, dtype):
    config = FineGrainedFP8Config(weight_block_size=block, scale_fmt=scale_fmt)
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0]), dtype=dtype)
    stored = transformers_quantize(config, "x.weight", weight)
    qweight, scale = stored["x.weight"], stored["x.weight_scale_inv"]
    layout = fp8.layout(qcfg_of(config))
    got = layout.dequantize({"weight": qweight, "weight_scale_inv": scale})
    assert got.dtype == torch.float32 and torch.equal(got, transformers_dequantize(config, qweight, scale))
    assert layout.weight_shape({"weight": tuple(qweight.shape), "weight_scale_inv": tuple(scale.shape)}) == shape


def test_partial_blocks_and_exponent_bytes():
    """Scales for blocks cut short at the edges ([ceil(out/B0), ceil(in/B1)], as FP8Linear allocates them), against
    the dequantization transformers runs for them (its backward pass); ue8m0 scales stored as exponent bytes."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(70, 100, generator=g) * 40).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 4, generator=g) + 0.01
    got = fp8.layout({"quant_method": "fp8", "weight_block_size": [32, 32]}).dequantize(
        {"weight": weight, "weight_scale_inv": scale})
    assert torch.equal(got, _dequantize_fp8_weight(weight, scale, [32, 32], torch.float32))
    exponents = torch.randint(110, 130, (2, 2), generator=g, dtype=torch.uint8)
    square = weight[:64, :64].contiguous()
    config = FineGrainedFP8Config(weight_block_size=[32, 32], scale_fmt="ue8m0")
    got = fp8.layout(qcfg_of(config)).dequantize({"weight": square, "weight_scale_inv": exponents})
    assert torch.equal(got, transformers_dequantize(config, square, exponents))


# --- a tiny Llama quantized by transformers' op, loaded back by transformers ---------------------------------------

@pytest.fixture(scope="module")
def base(tiny_tokenizer, tmp_path_factory) -> Path:
    # a wider init gives peaked logits, so that a wrong dequantization shows in the perplexity
    return make_tiny_model(tmp_path_factory.mktemp("fp8-base"), tiny_tokenizer, initializer_range=0.2)


def quantized_copy(base: Path, out: Path, config: FineGrainedFP8Config, static: bool = False) -> Path:
    """base with every decoder Linear quantized as transformers' FP8 quantizer stores it (lm_head, which transformers
    keeps unconverted, stays float), and the quantization_config transformers writes."""
    shutil.copytree(base, out)
    tensors = {}
    for name, tensor in load_file(base / "model.safetensors").items():
        if name.endswith("_proj.weight"):
            tensors.update(transformers_quantize(config, name, tensor))
            if static:
                tensors[name.removesuffix("weight") + "activation_scale"] = torch.tensor(0.5)
        else:
            tensors[name] = tensor
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    model_config = json.loads((out / "config.json").read_text())
    model_config["quantization_config"] = qcfg_of(config)
    (out / "config.json").write_text(json.dumps(model_config))
    return out


@pytest.fixture(scope="module")
def artifact(base, tmp_path_factory) -> Path:
    return quantized_copy(base, tmp_path_factory.mktemp("fp8") / "model", FineGrainedFP8Config(weight_block_size=[32, 32]))


@pytest.mark.slow
def test_tiny_llama_reads_bit_for_bit_and_as_transformers_loads_it(artifact):
    assert detect_format(artifact) == "fp8"
    view, stored = open_view(artifact, "fp8"), load_file(artifact / "model.safetensors")
    assert view.layout.settings == {"weight_block_size": [32, 32], "activation_scheme": "dynamic",
                                    "scale_fmt": "float", "activations_quantized": True}
    assert len(view.modules) == 14 and not any(n.endswith("weight_scale_inv") for n in view.names())
    config = FineGrainedFP8Config(weight_block_size=[32, 32])
    for module in view.modules:
        reference = transformers_dequantize(config, stored[f"{module}.weight"], stored[f"{module}.weight_scale_inv"])
        assert torch.equal(view.get(f"{module}.weight"), reference), module
    # on CPU transformers dequantizes while loading (FineGrainedFP8HfQuantizer sets dequantize=True without a GPU)
    hf = AutoModelForCausalLM.from_pretrained(artifact, device_map="cpu").eval()
    ours = float_model(artifact, "fp8")
    for name, param in hf.state_dict().items():
        assert torch.equal(param.float(), ours.state_dict()[name]), name
    ids = torch.randint(3, 500, (4, 64), generator=torch.Generator().manual_seed(1))
    assert abs(math.exp(nll(ours, ids) - nll(hf, ids)) - 1) < 0.01


@pytest.mark.slow
def test_static_activation_scales_are_read_past(base, tmp_path):
    config = FineGrainedFP8Config(weight_block_size=[32, 32], activation_scheme="static")
    path = quantized_copy(base, tmp_path / "static", config, static=True)
    view = open_view(path, "fp8")
    assert view.layout.settings["activation_scheme"] == "static"
    assert f"{MODULE}.activation_scale" not in view and not any("activation_scale" in n for n in view.names())
    float_model(path, "fp8")  # every name the view shows is one the float model has, and none is missing


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def damaged(artifact: Path, tmp_path: Path, change) -> Path:
    path = shutil.copytree(artifact, tmp_path / "damaged")
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors")
    return path


@pytest.mark.slow
def test_scales_of_the_wrong_shape(artifact, tmp_path):
    path = damaged(artifact, tmp_path, lambda t: t.__setitem__(f"{MODULE}.weight_scale_inv", torch.ones(4, 1)))
    with pytest.raises(QuantkitError) as e:
        open_view(path, "fp8").shape(f"{MODULE}.weight")
    assert one_line(e) == (f"{MODULE}: weight_scale_inv is [4, 1], expected [4, 2] for a [128, 64] weight in blocks "
                           "of [32, 32]")


@pytest.mark.slow
def test_a_weight_that_is_not_fp8(artifact, tmp_path):
    path = damaged(artifact, tmp_path, lambda t: t.__setitem__(f"{MODULE}.weight", t[f"{MODULE}.weight"].half()))
    with pytest.raises(QuantkitError) as e:
        open_view(path, "fp8").get(f"{MODULE}.weight")
    assert one_line(e) == f"{MODULE}: weight is torch.float16, expected torch.float8_e4m3fn"


@pytest.mark.slow
def test_a_missing_weight(artifact, tmp_path):
    path = damaged(artifact, tmp_path, lambda t: t.pop(f"{MODULE}.weight"))
    with pytest.raises(QuantkitError) as e:
        open_view(path, "fp8")
    assert one_line(e) == (f"tensor {MODULE}.weight is missing from the checkpoint (fp8 stores weight, "
                           "weight_scale_inv for each quantized Linear)")


@pytest.mark.parametrize("change, message", [
    ({"weight_block_size": [128]}, "quantization_config.weight_block_size = [128]: expected two positive integers"),
    ({"activation_scheme": "token"}, "quantization_config.activation_scheme = 'token': expected one of dynamic, "
                                     "static"),
    ({"scale_fmt": "e8m0"}, "quantization_config.scale_fmt = 'e8m0': expected 'float' or 'ue8m0'"),
    ({"fmt": "e5m2"}, "quantization_config.fmt = 'e5m2': quantkit reads float8_e4m3fn weights ('e4m3')"),
    ({"expert_dtype": "fp4"}, "quantization_config.expert_dtype = 'fp4': quantkit reads FP8 experts only"),
    ({"modules_to_convert": ["model.embed_tokens"]}, "quantization_config.modules_to_convert lists modules beyond "
                                                     "the Linears (FP8 embeddings), which quantkit does not read"),
])
def test_unsupported_settings_are_refused(change, message):
    with pytest.raises(QuantkitError) as e:
        fp8.layout({"quant_method": "fp8", **change})
    assert one_line(e) == message


def test_scales_of_a_dtype_the_scale_format_does_not_store():
    layout = fp8.layout({"quant_method": "fp8", "weight_block_size": [32, 32], "scale_fmt": "ue8m0"})
    weight = torch.zeros(32, 32, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"^weight_scale_inv is torch.float32, but scale_fmt 'ue8m0' stores "
                                         r"torch.float8_e8m0fnu or torch.uint8$"):
        layout.dequantize({"weight": weight, "weight_scale_inv": torch.ones(1, 1)})
